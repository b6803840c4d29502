"""Mechanism M1: noisy aggregate of per-image vectors (docs/privacy.md §2).

Adjacency: add or remove one image. Each image i contributes one vector v_i computed from
image i alone; it is bounded around a public centre c to norm at most C, so adding or
removing one image changes the float64 sum by at most C (L2 sensitivity C). The sum gets
isotropic Gaussian noise N(0, (z C)^2 I_D) (the Gaussian mechanism) and is divided by the
public q n. With Poisson sampling at rate q the release is the Poisson-subsampled Gaussian
mechanism, whose DpEvent is ``accounting.release_event``. The noise is OpenDP's Gaussian
mechanism applied to the float64 sum (OpenSSL randomness, exact sampling, resistant to the
floating-point attacks of Mironov 2012) and the Poisson sample takes its bits straight from
the OS CSPRNG: fresh per release, never a workflow seed, never a torch generator, on any
device (``dp.noise``, docs/privacy.md §6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import dp_accounting as dpa
import numpy as np
import torch

from .accounting import release_event
from .errors import InvalidParameterError
from .noise import GaussianMechanism, bernoulli
from .validation import (
    check_clip_norm,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
)

logger = logging.getLogger(__name__)


class BoundMode(str, Enum):
    """How each contribution is bounded to norm <= C around the centre (docs/privacy.md §2.2)."""

    CLIP = "clip"  # u = (v - c) min(1, C / ||v - c||): vectors inside the ball unchanged
    NORMALIZE = "normalize"  # u = C (v - c) / ||v - c||: the paper's choice


def _bound_mode(mode: BoundMode | str) -> BoundMode:
    try:
        return BoundMode(mode)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in BoundMode)
        raise InvalidParameterError(f"mode must be one of {allowed}, got mode={mode!r}.") from None


@dataclass(frozen=True, repr=False)
class PoissonSample:
    """Which images take part in a release: PRIVATE under Poisson sampling.

    ``indices`` (sorted, as a list usable to index a tensor) and their number must never be
    output, logged or stored; ``repr`` shows neither.
    """

    _indices: tuple[int, ...]
    dataset_size: int

    @property
    def indices(self) -> list[int]:
        return list(self._indices)

    def __repr__(self) -> str:
        return f"PoissonSample(dataset_size={self.dataset_size}, indices=<private>)"

    __str__ = __repr__


def poisson_sample(dataset_size: int, *, sampling_rate: float) -> PoissonSample:
    """Keep each of n images independently with probability q (q = 1 keeps all).

    Call this FIRST and compute per-image vectors only for the kept images. Each image is
    kept with probability exactly q, its bits straight from the OS CSPRNG, fresh per call
    (``noise.bernoulli``; docs/privacy.md §2.1, 6).
    """
    n = check_positive_int("dataset_size", dataset_size)
    q = check_sampling_rate(sampling_rate)
    kept = np.flatnonzero(bernoulli(n, q)).tolist()
    return PoissonSample(_indices=tuple(kept), dataset_size=n)


# --- bounding -----------------------------------------------------------------------------


def _as_float64(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as float64 on its device, or on the CPU where float64 is unsupported (MPS)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidParameterError(
            f"{name} must be a torch.Tensor, got {name} of type {type(tensor).__name__}."
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidParameterError(f"{name} must be a real tensor, got dtype {tensor.dtype}.")
    tensor = tensor.detach()
    try:
        return tensor.to(torch.float64)
    except (TypeError, RuntimeError):  # e.g. "MPS framework doesn't support float64"
        return tensor.cpu().to(torch.float64)


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidParameterError(
            f"{name} contains {bad} NaN or infinite value(s); every value must be finite."
        )


def _validated_inputs(
    vectors: torch.Tensor, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    v = _as_float64(vectors, "vectors")
    if v.dim() != 2:
        raise InvalidParameterError(
            f"vectors must be 2-D (m, D), one row per kept image, got shape {tuple(v.shape)}."
        )
    if v.shape[1] < 1:
        raise InvalidParameterError(
            f"vectors must have dimension D >= 1, got shape {tuple(v.shape)}."
        )
    c = _as_float64(centre, "centre")
    if tuple(c.shape) != (v.shape[1],):
        raise InvalidParameterError(
            f"centre must have shape (D,) = ({v.shape[1]},) to match vectors {tuple(v.shape)}, "
            f"got centre shape {tuple(c.shape)}."
        )
    _check_finite(c, "centre")
    c = c.to(v.device)
    return v, c


def _bound(v: torch.Tensor, c: torch.Tensor, clip_norm: float, mode: BoundMode) -> torch.Tensor:
    diff = v - c
    # A row that is not finite (diverged training, fp16 overflow, or 1e308 - (-1e308))
    # contributes 0, silently (docs/privacy.md §2.4): an error, a warning or a count would make
    # whether and how the release happens depend on that one image.
    finite_rows = torch.isfinite(diff).all(dim=1, keepdim=True)
    diff = torch.where(finite_rows, diff, torch.zeros_like(diff))
    # Norms via the largest entry so that neither huge nor subnormal rows over/underflow.
    scale = diff.abs().amax(dim=1, keepdim=True)
    nonzero = scale > 0
    scaled = diff / torch.where(nonzero, scale, torch.ones_like(scale))
    scaled_norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    direction = scaled / torch.where(nonzero, scaled_norm, torch.ones_like(scaled_norm))
    if mode is BoundMode.CLIP:
        inside = scale * scaled_norm <= clip_norm
        bounded = torch.where(inside, diff, clip_norm * direction)
    else:
        # A vector equal to the centre has no direction: it contributes 0, which keeps
        # ||u|| <= C and so the sensitivity (the paper leaves this case open).
        bounded = torch.where(nonzero, clip_norm * direction, torch.zeros_like(diff))
    # Rounding can leave a norm an ulp above C; shrink those rows until the float64 norm
    # is <= C exactly, so the stated bound holds for the numbers actually summed.
    for _ in range(8):
        norms = torch.linalg.vector_norm(bounded, dim=1, keepdim=True)
        over = norms > clip_norm
        if not bool(over.any()):
            break
        shrink = torch.nextafter(clip_norm / norms, torch.zeros_like(norms))
        bounded = torch.where(over, bounded * shrink, bounded)
    return bounded


def bound_contributions(
    vectors: torch.Tensor,
    *,
    centre: torch.Tensor,
    clip_norm: float,
    mode: BoundMode | str = BoundMode.CLIP,
) -> torch.Tensor:
    """Bounded contributions u_i, ||u_i|| <= C (docs/privacy.md §2.2).

    vectors: (m, D), any real dtype and device; centre: (D,). Returns (m, D) float64 on the
    vectors' device (CPU where the device has no float64). ``clip``: u = (v - c) min(1,
    C/||v - c||); ``normalize``: u = C (v - c)/||v - c||, and u = 0 when v = c exactly.
    A row with a non-finite value gives u = 0.
    """
    clip_norm = check_clip_norm(clip_norm)
    mode = _bound_mode(mode)
    v, c = _validated_inputs(vectors, centre)
    return _bound(v, c, clip_norm, mode)


# --- release ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregateRelease:
    """A finished M1 release: the estimate and everything public about it.

    ``estimate``: (D,) float64 CPU tensor, after any post-processing. Deliberately holds
    neither the sampled indices nor how many images were kept: under Poisson sampling the
    count is private (only the noisy sum is released).
    """

    estimate: torch.Tensor
    event: dpa.DpEvent
    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    dataset_size: int
    mode: BoundMode
    dimension: int


def release_noisy_aggregate(
    vectors: torch.Tensor,
    *,
    centre: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    sampling_rate: float,
    dataset_size: int,
    mode: BoundMode | str = BoundMode.CLIP,
    before_noise: Callable[[dpa.DpEvent], None] | None = None,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AggregateRelease:
    """Mechanism M1 on the kept images' vectors: a DP estimate of the mean around c.

    vectors: (m, D), the per-image vectors of the images kept by ``poisson_sample`` (m may
    be 0: the noise is still released). centre c: (D,), public. Adjacency: add/remove one
    image. Sensitivity of the sum: C (each ||u_i|| <= C). Noise: N(0, (z C)^2 I_D) on the
    float64 sum, so the release is ``release_event(z, q)`` (Gaussian mechanism, Poisson
    subsampled when q < 1), then estimate = c + (sum_i u_i + noise) / (q n) with n the
    declared dataset size.

    Order: every argument is validated first (nothing happens on bad input); the
    contributions are bounded and summed; ``before_noise(event)`` is called exactly once
    (the caller records the release in the ledger there; if it raises, the exception
    propagates, no noise is drawn and nothing is released); the sum goes through OpenDP's
    Gaussian mechanism (``noise.GaussianMechanism``, built and checked before the hook, fresh
    OpenSSL randomness); ``postprocess`` (free: docs/privacy.md §2.5) maps the (D,) estimate to a
    (D,) tensor.
    """
    clip_norm = check_clip_norm(clip_norm)
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    n = check_positive_int("dataset_size", dataset_size)
    mode = _bound_mode(mode)
    for name, hook in (("before_noise", before_noise), ("postprocess", postprocess)):
        if hook is not None and not callable(hook):
            raise InvalidParameterError(f"{name} must be callable or None, got {name}={hook!r}.")
    # No check of m against n: n is the DECLARED size, and the true count is private, so
    # an error when m > n would publish it (docs/privacy.md §1, 2.4).
    v, c = _validated_inputs(vectors, centre)
    event = release_event(noise_multiplier=z, sampling_rate=q)
    dimension = int(v.shape[1])

    # Built before the ledger hook: nothing after the record may fail for a checkable reason.
    gaussian = GaussianMechanism(dimension=dimension, scale=z * clip_norm)

    bounded = _bound(v, c, clip_norm, mode)
    total = bounded.sum(dim=0).cpu()  # float64 sum (docs/privacy.md §6)

    if before_noise is not None:
        before_noise(event)

    estimate = c.cpu() + gaussian(total) / (q * n)

    if postprocess is not None:
        processed = postprocess(estimate)
        if not isinstance(processed, torch.Tensor) or tuple(processed.shape) != (dimension,):
            raise InvalidParameterError(
                f"postprocess must return a tensor of shape ({dimension},), got "
                f"{getattr(processed, 'shape', type(processed).__name__)}."
            )
        estimate = processed.detach().to(device="cpu", dtype=torch.float64)
    return AggregateRelease(
        estimate=estimate,
        event=event,
        noise_multiplier=z,
        clip_norm=clip_norm,
        sampling_rate=q,
        dataset_size=n,
        mode=mode,
        dimension=dimension,
    )


# --- post-processing (free of privacy cost: docs/privacy.md §2.5) --------------------------------


def renormalize_unit(estimate: torch.Tensor) -> torch.Tensor:
    """A CLIP target projected to the unit sphere: x / ||x|| (shape unchanged)."""
    norm = float(torch.linalg.vector_norm(estimate.to(torch.float64)))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidParameterError(
            f"cannot renormalise an estimate of norm {norm!r} to unit norm."
        )
    return estimate / norm


def rescale_to_norm(
    target_norm: float | Sequence[float],
    *,
    rows: int = 1,
    widths: Sequence[int] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A post-processing that gives each of ``rows`` vectors the public ``target_norm``.

    For a TI estimate of k tokens flattened to (k * d,), use ``rows=k``: the estimate is
    viewed as (k, d) and each row rescaled (e.g. to the vocabulary's typical token-embedding
    norm). With ``widths`` (one per text encoder, summing to d: SDXL's 768 + 1280) each row
    is cut into those parts and part j rescaled to ``target_norm[j]``, since every encoder has
    its own embedding scale. Post-processing of a DP release: no privacy cost. The returned
    callable keeps the input's shape.
    """
    targets = (target_norm,) if isinstance(target_norm, (int, float)) else tuple(target_norm)
    targets = tuple(check_clip_norm(t, name="target_norm") for t in targets)
    rows = check_positive_int("rows", rows)
    widths = None if widths is None else tuple(check_positive_int("widths", w) for w in widths)
    if len(targets) != (1 if widths is None else len(widths)):
        raise InvalidParameterError(
            f"need one target norm per part, got target_norm={target_norm!r} for widths={widths!r}."
        )

    def rescale(estimate: torch.Tensor) -> torch.Tensor:
        if estimate.numel() % rows != 0:
            raise InvalidParameterError(
                f"an estimate of {estimate.numel()} values cannot be split into rows={rows} "
                "equal vectors."
            )
        matrix = estimate.reshape(rows, -1)
        parts = (matrix,) if widths is None else torch.split(matrix, list(widths), dim=1)
        if widths is not None and sum(widths) != matrix.shape[1]:
            raise InvalidParameterError(
                f"widths={widths} do not add up to the vector width {matrix.shape[1]}."
            )
        scaled = []
        for part, target in zip(parts, targets, strict=True):
            norms = torch.linalg.vector_norm(part, dim=1, keepdim=True)
            if not bool((norms > 0).all()):
                raise InvalidParameterError("cannot rescale a zero row of the estimate to a norm.")
            scaled.append(part * (target / norms))
        return torch.cat(scaled, dim=1).reshape(estimate.shape)

    return rescale
