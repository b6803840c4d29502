"""Mechanism M1: noisy aggregate of per-image vectors (DP_SPEC section 2).

Adjacency: add or remove one image. Each image i contributes one vector v_i computed from
image i alone; it is bounded around a public centre c to norm at most C, so adding or
removing one image changes the float64 sum by at most C (L2 sensitivity C). The sum gets
isotropic Gaussian noise N(0, (z C)^2 I) -- the Gaussian mechanism -- and is divided by the
public q n. With Poisson sampling at rate q the release is the Poisson-subsampled Gaussian;
its DpEvent is ``accounting.release_event``. Randomness (sampling and noise) comes from OS
entropy, fresh per release, never from a workflow seed (DP_SPEC 6).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import dp_accounting as dpa
import torch

from .accounting import release_event
from .errors import InvalidParameterError
from .validation import (
    check_clip_norm,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
)


class BoundMode(str, Enum):
    """How each contribution is bounded to norm C around the centre."""

    CLIP = "clip"  # u = (v - c) * min(1, C / ||v - c||): vectors inside the ball are unchanged
    NORMALIZE = "normalize"  # u = C (v - c) / ||v - c||: the paper's choice


def os_entropy_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy (63 random bits from ``secrets``), fresh per use."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


@dataclass(frozen=True)
class PoissonSample:
    """Which images take part in a release. PRIVATE: never output, log or store it."""

    indices: list[int] = field(repr=False)
    dataset_size: int

    def __repr__(self) -> str:
        return f"PoissonSample(dataset_size={self.dataset_size}, indices=<private>)"


def poisson_sample(dataset_size: int, *, sampling_rate: float) -> PoissonSample:
    """Keep each of ``dataset_size`` images independently with probability q (q = 1: all)."""
    n = check_positive_int("dataset_size", dataset_size)
    q = check_sampling_rate(sampling_rate)
    if q == 1:
        return PoissonSample(indices=list(range(n)), dataset_size=n)
    draws = torch.rand(n, generator=os_entropy_generator(), dtype=torch.float64)
    return PoissonSample(indices=torch.nonzero(draws < q).flatten().tolist(), dataset_size=n)


def _as_float64(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidParameterError(f"{name} must be a torch tensor, got {type(tensor).__name__}.")
    if tensor.device.type == "mps":  # no float64 on Apple GPUs
        tensor = tensor.cpu()
    tensor = tensor.detach().to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidParameterError(f"{name} contains NaN or infinite values.")
    return tensor


def bound_contributions(
    vectors: torch.Tensor,
    *,
    centre: torch.Tensor,
    clip_norm: float,
    mode: BoundMode = BoundMode.CLIP,
) -> torch.Tensor:
    """(m, D) float64 contributions u_i with ||u_i|| <= C (DP_SPEC 2.2).

    In ``normalize`` mode a vector equal to the centre has no direction; it contributes 0,
    which keeps the bound (the paper leaves this case open).
    """
    c = check_clip_norm(clip_norm)
    mode = BoundMode(mode)
    v = _as_float64(vectors, "vectors")
    centre = _as_float64(centre, "centre").to(v.device)
    if v.dim() != 2:
        raise InvalidParameterError(f"vectors must be (m, D), got shape {tuple(v.shape)}.")
    if centre.shape != (v.shape[1],):
        raise InvalidParameterError(
            f"centre must have the vectors' dimension D={v.shape[1]}, got shape {tuple(centre.shape)}."
        )
    diff = v - centre
    norms = diff.norm(dim=1, keepdim=True)
    if mode is BoundMode.CLIP:
        scale = torch.clamp(c / torch.clamp(norms, min=torch.finfo(torch.float64).tiny), max=1.0)
    else:
        scale = torch.where(
            norms > 0, c / torch.clamp(norms, min=torch.finfo(torch.float64).tiny), 0.0
        )
    bounded = diff * scale
    # Rounding can leave a norm a few ulps above C; pull those just inside so the bound is
    # strict (the sensitivity argument needs ||u_i|| <= C exactly).
    over = bounded.norm(dim=1, keepdim=True)
    return torch.where(over > c, bounded * (c * (1 - 1e-12) / over), bounded)


@dataclass(frozen=True)
class AggregateRelease:
    """A finished M1 release: the estimate and everything public about it.

    Never holds which images were sampled, nor how many (under Poisson sampling the count is
    private).
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
    mode: BoundMode = BoundMode.CLIP,
    before_noise: Callable[[dpa.DpEvent], None] | None = None,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AggregateRelease:
    """Mechanism M1 on the kept images' vectors (m, D); m may be 0.

    estimate = c + (sum_i u_i + N(0, (z C)^2 I_D)) / (q n), summed in float64. Everything is
    validated before anything happens; ``before_noise(event)`` runs after bounding and
    before the noise is drawn (the ledger record goes there: if it raises, nothing is
    released). ``postprocess`` is applied to the estimate afterwards, at no privacy cost.
    """
    c = check_clip_norm(clip_norm)
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    n = check_positive_int("dataset_size", dataset_size)
    mode = BoundMode(mode)
    if isinstance(vectors, torch.Tensor) and vectors.dim() == 2 and vectors.shape[0] > n:
        raise InvalidParameterError(
            f"{vectors.shape[0]} vectors but the declared dataset size is n={n}."
        )
    bounded = bound_contributions(vectors, centre=centre, clip_norm=c, mode=mode)
    event = release_event(noise_multiplier=z, sampling_rate=q)
    dimension = bounded.shape[1]
    total = bounded.sum(dim=0).cpu()
    if before_noise is not None:
        before_noise(event)
    noise = torch.randn(dimension, generator=os_entropy_generator(), dtype=torch.float64) * (z * c)
    estimate = _as_float64(centre, "centre").cpu() + (total + noise) / (q * n)
    if postprocess is not None:
        estimate = postprocess(estimate).to(torch.float64)
    return AggregateRelease(
        estimate=estimate,
        event=event,
        noise_multiplier=z,
        clip_norm=c,
        sampling_rate=q,
        dataset_size=n,
        mode=mode,
        dimension=dimension,
    )


def renormalize_unit(estimate: torch.Tensor) -> torch.Tensor:
    """Post-processing for CLIP targets: project the estimate to the unit sphere."""
    norm = estimate.norm()
    if not math.isfinite(float(norm)) or float(norm) == 0.0:
        raise InvalidParameterError("the released estimate has zero norm and no direction.")
    return estimate / norm


def rescale_to_norm(target_norm: float, *, rows: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Post-processing for TI tokens: view the estimate as ``rows`` vectors, give each the
    public ``target_norm`` (e.g. the vocabulary's mean token-embedding norm)."""
    target = check_clip_norm(target_norm, name="target_norm")
    rows = check_positive_int("rows", rows)

    def rescale(estimate: torch.Tensor) -> torch.Tensor:
        matrix = estimate.reshape(rows, -1)
        norms = matrix.norm(dim=1, keepdim=True).clamp(min=torch.finfo(matrix.dtype).tiny)
        return (matrix * (target / norms)).reshape(estimate.shape)

    return rescale
