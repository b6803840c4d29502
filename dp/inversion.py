"""Per-image textual inversion, many images per forward/backward pass (docs/privacy.md §3).

Each private image ``i`` gets its own ``k x d`` embedding ``e_i``, learned on image ``i``
alone. Images are batched for speed, but nothing couples them (docs/privacy.md §3.2), which is what
makes the later aggregate's sensitivity analysis hold (one image changes one ``e_i``):

- every image has its own random generator (timesteps, noise, templates);
- the loss is a SUM of per-image losses, so d(loss)/d(e_i) = d(loss_i)/d(e_i);
- Adam's update is element-wise, so its state for ``e_i`` depends on ``e_i``'s gradients
  only; no weight decay, no gradient clipping, no normalisation across tokens;
- every image takes exactly ``steps`` optimiser steps, whatever the others do.

The model-specific parts (text encoder with injected vectors, denoiser) arrive as callables,
so this module stays free of ComfyUI and is testable on its own.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidParameterError

TextForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(token_ids (B, L) long, placeholder_mask (B, L) bool, vectors (B, k, d)) -> context``.

Returns the text encoder's output (B, L, d_ctx) for prompts whose placeholder positions
(``k`` per row, in order) take the given vectors instead of token embeddings; for a model
conditioned on a pooled text embedding as well (SDXL), the pair (context, pooled (B, d_pool)).
Either is handed to ``DenoiseLoss`` unchanged, row i depending on row i's vectors only."""

DenoiseLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(latents (B, C, H, W), context (what TextForward returned), timesteps (B,), noise) -> loss (B,)``.

The model's standard denoising loss per row (mean over latent elements, a fixed count)."""


@dataclass(frozen=True)
class InversionConfig:
    """Public hyperparameters of the per-image inversion (all may be published)."""

    steps: int
    learning_rate: float
    images_per_batch: int
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        check_training_hyperparameters(self)


def check_training_hyperparameters(config) -> None:
    """``steps``, ``images_per_batch``, ``num_timesteps`` positive integers and a finite
    ``learning_rate`` > 0 (shared by every trainer's config)."""
    for name in ("steps", "images_per_batch", "num_timesteps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameterError(f"{name} must be a positive integer, got {name}={value!r}.")
    lr = config.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InvalidParameterError(
            f"learning_rate must be a finite number > 0, got learning_rate={lr!r}."
        )


@dataclass(frozen=True)
class PromptTokens:
    """Tokenised public templates: ``ids`` (T, L) and the placeholder positions ``mask``."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.mask.shape or self.ids.dim() != 2 or self.ids.shape[0] < 1:
            raise InvalidParameterError(
                f"prompt ids and mask must both be (templates, length), got {tuple(self.ids.shape)} "
                f"and {tuple(self.mask.shape)}."
            )
        per_row = self.mask.sum(dim=1)
        if not bool((per_row == per_row[0]).all()) or int(per_row[0]) < 1:
            raise InvalidParameterError(
                "every template needs the same, non-zero number of placeholders."
            )

    @property
    def num_vectors(self) -> int:
        return int(self.mask[0].sum())


def train_per_image_embeddings(
    latents: torch.Tensor,
    *,
    initial: torch.Tensor,
    prompts: PromptTokens,
    config: InversionConfig,
    seeds: Sequence[int],
    text_forward: TextForward,
    denoise_loss: DenoiseLoss,
    public_rows: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Learn one embedding per image; returns a float32 CPU tensor (m, k, d).

    Work is constant (docs/privacy.md §3.2): every forward/backward pass has exactly
    ``chunk_rows(images_per_batch, public_rows=public_rows)`` rows, the last chunk padded
    with public padding rows (zero latents, a fixed seed), and whole padding chunks are added until at least ``public_rows`` rows
    were processed. So the number of passes and (up to timing noise) the run time depend on
    ``max(m, public_rows)`` only, and the progress values and total on ``public_rows``
    only (``public_chunk_count``; past it the value is held at the total). An image's
    result depends on its own latents and seed alone: removing another image leaves it
    bitwise identical on CPU (the tensors of every pass have the same shapes, so the
    kernels round the same way; a test checks it).

    Args:
        latents: (m, C, H, W) cached latents of the m images to invert, in the model's space.
        initial: (k, d) starting vectors (the public initializer embedding, repeated).
        prompts: tokenised public templates, each with ``k`` placeholder positions.
        config: steps, learning rate, images per forward/backward pass.
        seeds: one seed per image for its own generator (timesteps, noise, templates).
        text_forward, denoise_loss: the model, see ``TextForward`` and ``DenoiseLoss``.
        public_rows: the public amount of work, in images (the declared dataset size).
        on_step: called as ``on_step(done, total)`` after every optimiser step of a chunk,
            with ``total`` = ``public_chunk_count`` x steps and ``done`` held at ``total``
            once the steps past ``public_rows`` begin (both public); it may raise to cancel
            (nothing is returned then).
    """
    m = latents.shape[0]
    if latents.dim() != 4:
        raise InvalidParameterError(f"latents must be (m, C, H, W), got {tuple(latents.shape)}.")
    if len(seeds) != m:
        raise InvalidParameterError("need exactly one seed per image.")
    k = prompts.num_vectors
    if initial.dim() != 2 or initial.shape[0] != k:
        raise InvalidParameterError(
            f"initial vectors must be ({k}, d) to match the templates' {k} placeholders, "
            f"got {tuple(initial.shape)}."
        )
    b = chunk_rows(config.images_per_batch, public_rows=public_rows)
    chunks = padded_chunk_count(m, public_rows=public_rows, images_per_batch=b)
    device = latents.device
    ids = prompts.ids.to(device)
    mask = prompts.mask.to(device)
    results = torch.empty((m, k, initial.shape[1]), dtype=torch.float32)
    total = public_chunk_count(public_rows, images_per_batch=b) * config.steps
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(min(done, total), total)

    for chunk_index in range(chunks):
        start = chunk_index * b
        real = max(0, min(m, start + b) - start)
        rows = torch.zeros((b, *latents.shape[1:]), dtype=latents.dtype, device=device)
        rows[:real] = latents[start : start + real]
        chunk_seeds = [int(s) for s in seeds[start : start + real]] + [PADDING_SEED] * (b - real)
        generators = [training_generator(s) for s in chunk_seeds]
        vectors = _train_chunk(
            rows, initial, ids, mask, config, generators, text_forward, denoise_loss, tick
        )
        results[start : start + real] = vectors[:real].detach().float().cpu()
    return results


PADDING_SEED = 0
"""Seed of the padding rows: public, they carry no image."""


def chunk_rows(images_per_batch: int, *, public_rows: int) -> int:
    """Rows of every padded pass: ``min(images_per_batch, public_rows)`` (``images_per_batch``
    when no public amount of work is given).

    Both are public settings, so the pass size stays a function of public values only and
    the same for every image (bitwise no-coupling holds); without the ``min`` a batch setting
    larger than the declared n_hat pads every pass to mostly blank rows (256 rows for n_hat
    = 4 cost 32 times the work of 4)."""
    if public_rows < 1:
        return images_per_batch
    return max(1, min(images_per_batch, public_rows))


def padded_chunk_count(rows: int, *, public_rows: int, images_per_batch: int) -> int:
    """Passes of ``images_per_batch`` rows needed for max(rows, public_rows) rows (>= 1).

    The WORK done: it grows with the private ``rows`` past ``public_rows``, so it must never
    be shown (progress uses ``public_chunk_count``)."""
    return max(1, math.ceil(max(rows, public_rows) / images_per_batch))


def public_chunk_count(public_rows: int, *, images_per_batch: int) -> int:
    """Passes of ``images_per_batch`` rows for ``public_rows`` rows (>= 1): the unit of every
    progress total (docs/privacy.md §1: progress values and totals are functions of public
    settings only, also when a folder holds more images than the declared n_hat)."""
    return max(1, math.ceil(public_rows / images_per_batch))


class PublicProgress:
    """A progress reporter whose values and total depend on public settings only.

    ``advance_to(value)`` reports ``min(value, total)`` to ``report(value, total)`` only
    when that is beyond what was last reported, so work past the public total (a folder
    larger than the declared n_hat) shows the bar held at its total: no value past it, no
    new total, and no extra report whose number would count the extra work.
    """

    def __init__(self, total: int, report: Callable[[int, int], None]):
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise InvalidParameterError(f"total must be a positive integer, got total={total!r}.")
        self.total = total
        self._report = report
        self._shown = 0

    def advance_to(self, value: int) -> None:
        value = min(int(value), self.total)
        if value > self._shown:
            self._shown = value
            self._report(value, self.total)


def _train_chunk(latents, initial, ids, mask, config, generators, text_forward, denoise_loss, tick):
    b = latents.shape[0]
    vectors = initial.detach().float().to(latents.device).unsqueeze(0).repeat(b, 1, 1)
    vectors.requires_grad_(True)
    # Adam is element-wise: the state and update of e_i only see e_i's gradient (docs/privacy.md §3.2).
    optimizer = torch.optim.Adam([vectors], lr=config.learning_rate, weight_decay=0.0)
    for _ in range(config.steps):
        template_idx, timesteps, noise = _draw_per_image(latents, ids.shape[0], config, generators)
        optimizer.zero_grad(set_to_none=True)
        context = text_forward(ids[template_idx], mask[template_idx], vectors)
        losses = denoise_loss(latents, context, timesteps, noise)
        # A sum, never a mean over a data-dependent count: d(sum)/d(e_i) = d(loss_i)/d(e_i).
        losses.sum().backward()
        optimizer.step()
        tick()
    return vectors


TRAINING_SEED_BITS = 128
"""Bits of OS entropy in every per-image training seed (``training_seeds_from_entropy``)."""


def training_generator(seed: int) -> np.random.Generator:
    """One image's generator for its TRAINING randomness (template, timestep, noise).

    numpy's PCG64 keeps 128 bits of state and ``SeedSequence`` takes an integer of any size,
    so a 128-bit seed from the OS CSPRNG is kept whole (a ``torch.Generator`` would keep 32
    bits of it). Privacy does not rest on this randomness (the clip bound holds whatever it
    draws; the noise and sampling come from ``dp.noise``), but no value here is searchable.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameterError(f"a training seed must be an integer >= 0, got {seed!r}.")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def training_seeds_from_entropy(count: int) -> list[int]:
    """``count`` training seeds of ``TRAINING_SEED_BITS`` bits each from the OS CSPRNG, never
    from a workflow seed (docs/privacy.md §6)."""
    return [secrets.randbits(TRAINING_SEED_BITS) for _ in range(count)]


def _draw_per_image(latents, num_templates, config, generators):
    """Each image's template, timestep and noise, from that image's own generator only."""
    template_idx, timesteps, noise = [], [], []
    shape = tuple(latents.shape[1:])
    for generator in generators:
        template_idx.append(int(generator.integers(num_templates)))
        timesteps.append(int(generator.integers(config.num_timesteps)))
        noise.append(torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)))
    device = latents.device
    return (
        torch.tensor(template_idx, device=device),
        torch.tensor(timesteps, device=device, dtype=torch.float32),
        torch.stack(noise).to(device=device, dtype=latents.dtype),
    )
