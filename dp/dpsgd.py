"""DP-SGD textual inversion: the paper's baseline (arXiv 2411.14639 v4; docs/privacy.md §4).

One shared ``k x d`` embedding E is trained on all private images with DP-SGD (Abadi, Chu,
Goodfellow, McMahan, Mironov, Talwar, Zhang 2016, Algorithm 1) with Poisson sampling.
Adjacency: add or remove one image. Each of the T steps:

1. samples every image independently with probability q (OS entropy, docs/privacy.md §6);
2. computes the exact gradient g_i = d loss_i / dE of every image's denoising loss;
3. clips it in float64 to norm <= C (flattened to D = k d values; a non-finite gradient
   contributes 0, docs/privacy.md §2.4), so the sum over the sampled images has
   add/remove sensitivity C;
4. releases s = sum of the sampled, clipped g_i + N(0, (z C)^2 I_D) (the Gaussian
   mechanism), and divides by q n_hat with the DECLARED dataset size n_hat;
5. takes an Adam step on E with that noisy gradient (post-processing).

The run is ``accounting.dpsgd_event(z, q, T)``: T self-composed Poisson-subsampled
Gaussians. The returned E is post-processing of the T releases. Nothing per step (losses,
how many images were sampled) is returned or logged.

Constant work (docs/privacy.md §1, §3.2): every step computes the gradients of ALL images,
sampled or not, in passes of exactly ``chunk_rows(images_per_batch, public_rows)`` rows
padded with public rows (zero latents, the public padding seed) up to ``padded_chunk_count(n, public_rows)`` passes. So
the number of passes and the run time depend neither on the sample nor (up to
``public_rows``) on n, and the progress values and totals on ``public_rows`` only.

Per-example gradients: E is replicated into a leaf V of shape (b, k, d), row i feeding
only image i's prompt; one backward of the SUM of the per-row losses gives
V.grad[i] = d loss_i / dE exactly, provided the model callables do not couple rows (no batch
statistics), as ``dp.inversion`` already requires. A test checks it against one backward
per example and checks that changing one image leaves every other row's gradient bitwise
identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .accounting import DPSGD_MAX_STEPS
from .errors import InvalidParameterError
from .inversion import (
    PADDING_SEED,
    DenoiseLoss,
    PromptTokens,
    TextForward,
    _draw_per_image,
    check_training_hyperparameters,
    chunk_rows,
    padded_chunk_count,
    public_chunk_count,
    training_generator,
    training_seeds_from_entropy,
)
from .mechanism import BoundMode, _as_float64, _bound
from .noise import GaussianMechanism, bernoulli
from .validation import (
    check_clip_norm,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
)


@dataclass(frozen=True)
class DpSgdConfig:
    """Public hyperparameters of the DP-SGD baseline (all may be published).

    ``steps``: T optimiser steps (at most ``DPSGD_MAX_STEPS``, the most the accountant and
    the ledger take). ``images_per_batch``: rows per forward/backward pass (speed and memory
    only: every step processes every image). ``num_timesteps``: the denoiser's schedule length.
    """

    steps: int
    learning_rate: float
    images_per_batch: int
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        check_training_hyperparameters(self)
        if self.steps > DPSGD_MAX_STEPS:
            raise InvalidParameterError(
                f"steps must be at most {DPSGD_MAX_STEPS} (the most steps the privacy "
                f"accountant handles in bounded time), got steps={self.steps!r}."
            )


def _clipped_sum(
    per_example: torch.Tensor,
    keep: torch.Tensor,
    clip_norm: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i keep_i * clip_C(g_i) in float64: (m, D) and (m,) bool -> (D,) on the CPU.

    Every row is clipped (constant work), then rows with keep False are replaced by 0.
    Clipping reuses M1's bound around centre 0 (docs/privacy.md §2.2, mode ``clip``): the
    float64 norm of every clipped row is <= C exactly, a non-finite row gives 0. The rows
    are added one by one, in order, to ``out`` (a (D,) float64 CPU accumulator, updated in
    place) or to zeros: adding an exact 0 changes nothing, so a left-out row gives bitwise
    the sum of the same rows without it (no data-dependent reduction order).
    """
    g = _as_float64(per_example, "per_example")
    centre = torch.zeros(g.shape[1], dtype=torch.float64, device=g.device)
    clipped = _bound(g, centre, clip_norm, BoundMode.CLIP)
    keep = keep.to(device=clipped.device, dtype=torch.bool).view(-1, 1)
    clipped = torch.where(keep, clipped, torch.zeros_like(clipped)).cpu()
    total = torch.zeros(g.shape[1], dtype=torch.float64) if out is None else out
    for row in clipped:
        total += row
    return total


def _noisy_step(
    total: torch.Tensor, gaussian: GaussianMechanism, q: float, n_hat: int
) -> torch.Tensor:
    """(total + N(0, (z C)^2 I_D)) / (q n_hat), float64 CPU: OpenDP's Gaussian mechanism on
    the float64 sum, fresh OpenSSL randomness at every step (docs/privacy.md §6)."""
    return gaussian(total) / (q * n_hat)


def _check_per_example(per_example: torch.Tensor, keep: torch.Tensor) -> None:
    if not isinstance(per_example, torch.Tensor) or per_example.dim() != 2:
        raise InvalidParameterError(
            "per_example must be a 2-D tensor (m, D) of per-example gradients, got "
            f"{getattr(per_example, 'shape', type(per_example).__name__)}."
        )
    if per_example.shape[1] < 1:
        raise InvalidParameterError("per_example gradients must have dimension D >= 1.")
    if (
        not isinstance(keep, torch.Tensor)
        or keep.dtype != torch.bool
        or tuple(keep.shape) != (per_example.shape[0],)
    ):
        raise InvalidParameterError(
            "keep must be a 1-D bool tensor with one entry per row of per_example."
        )


def noisy_gradient_sum(
    per_example: torch.Tensor,
    keep: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    sampling_rate: float,
    declared_dataset_size: int,
) -> torch.Tensor:
    """One DP-SGD release: the noisy sum of clipped gradients over q n_hat, (D,) float64 CPU.

    per_example: (m, D) per-example gradients (any real dtype and device); keep: (m,) bool,
    True for rows that are sampled AND included (the others contribute exactly 0).
    Adjacency add/remove one example; each kept row is clipped to norm <= C (non-finite
    rows give 0), so the sum has sensitivity C; noise N(0, (z C)^2 I_D) by OpenDP's
    Gaussian mechanism on the float64 sum (docs/privacy.md §6); the result is divided by
    q n_hat. With q = ``sampling_rate`` of a Poisson sample this is one step of
    ``accounting.dpsgd_event``.
    """
    clip_norm = check_clip_norm(clip_norm)
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    n_hat = check_positive_int("declared_dataset_size", declared_dataset_size)
    _check_per_example(per_example, keep)
    gaussian = GaussianMechanism(dimension=int(per_example.shape[1]), scale=z * clip_norm)
    return _noisy_step(_clipped_sum(per_example, keep, clip_norm), gaussian, q, n_hat)


def per_example_gradients(
    latents: torch.Tensor,
    embedding: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    *,
    text_forward: TextForward,
    denoise_loss: DenoiseLoss,
) -> torch.Tensor:
    """d loss_i / dE for every row i of one pass, by replicating E: (b, k, d) float32.

    latents (b, C, H, W); embedding E (k, d); ids, mask (b, L) (each row's template);
    timesteps (b,); noise like latents. E is copied into a leaf V (b, k, d) whose row i
    feeds row i only, and one backward of sum_i loss_i gives V.grad[i] = d loss_i / dE
    (the sum, never a mean, so no row scales another's gradient).
    """
    b = latents.shape[0]
    replicated = embedding.detach().float().unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)
    context = text_forward(ids, mask, replicated)
    losses = denoise_loss(latents, context, timesteps, noise)
    if tuple(losses.shape) != (b,):
        raise InvalidParameterError(
            f"denoise_loss must return one loss per row, shape ({b},), got {tuple(losses.shape)}."
        )
    (grad,) = torch.autograd.grad(losses.sum(), replicated)
    return grad


class _Inputs:
    """Validated inputs of ``train_shared_embedding_dpsgd``."""

    def __init__(self, latents, initial, prompts, included, on_step):
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise InvalidParameterError(
                "latents must be a 4-D tensor (n, C, H, W) of cached image latents, got "
                + (
                    f"{latents.dim()} dimensions."
                    if isinstance(latents, torch.Tensor)
                    else f"{type(latents).__name__}."
                )
            )
        k = prompts.num_vectors
        if not isinstance(initial, torch.Tensor) or initial.dim() != 2 or initial.shape[0] != k:
            raise InvalidParameterError(
                f"initial vectors must be ({k}, d) to match the templates' {k} placeholders, "
                f"got {tuple(getattr(initial, 'shape', ()))}."
            )
        if not bool(torch.isfinite(initial).all()):
            raise InvalidParameterError("initial vectors must be finite.")
        if isinstance(included, torch.Tensor):
            if included.dtype != torch.bool or included.dim() != 1:
                raise InvalidParameterError("included must be a 1-D bool tensor or bools.")
            flags = [bool(x) for x in included.tolist()]
        else:
            flags = list(included)
            if not all(isinstance(x, bool) or type(x).__name__ == "bool_" for x in flags):
                raise InvalidParameterError("included must hold one bool per image.")
            flags = [bool(x) for x in flags]
        # No count in the message: the number of images is private (docs/privacy.md §1).
        if len(flags) != latents.shape[0]:
            raise InvalidParameterError("included must have exactly one entry per image.")
        if on_step is not None and not callable(on_step):
            raise InvalidParameterError(
                f"on_step must be callable or None, got on_step={on_step!r}."
            )
        self.included = torch.tensor(flags, dtype=torch.bool)


def train_shared_embedding_dpsgd(
    latents: torch.Tensor,
    *,
    initial: torch.Tensor,
    prompts: PromptTokens,
    config: DpSgdConfig,
    included: Sequence[bool],
    sampling_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    declared_dataset_size: int,
    text_forward: TextForward,
    denoise_loss: DenoiseLoss,
    public_rows: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DP-SGD on one shared embedding; returns the final E, a (k, d) float32 CPU tensor.

    Adjacency: add/remove one image. Each step is ``noisy_gradient_sum`` on the per-example
    gradients of all n images with keep = (Poisson sample at rate q) AND ``included``:
    sensitivity C, noise N(0, (z C)^2 I_{k d}), divided by q n_hat. The run's DpEvent is
    ``accounting.dpsgd_event(noise_multiplier=z, sampling_rate=q, steps=config.steps)``;
    E is post-processing of the T releases. Call it where the release is committed (inside
    the ledger commit's callback, like ``dp.release``): the noise is drawn during training.

    Args:
        latents: (n, C, H, W) cached latents of ALL private images (n may be below or above
            ``public_rows``).
        initial: (k, d) public starting vectors (the initializer word, repeated).
        prompts: tokenised public templates with ``k`` placeholder positions each.
        config: steps T, Adam's learning rate, rows per pass.
        included: per image, False where the ledger's per-image filter excluded the image:
            it is processed like every other (constant work) but never contributes.
        sampling_rate, clip_norm, noise_multiplier: q, C, z.
        declared_dataset_size: the public n_hat the noisy sum is divided by.
        text_forward, denoise_loss: the model (see ``dp.inversion``); rows must not couple.
        public_rows: the public amount of work, in images (the declared dataset size).
        on_step: called as ``on_step(done, total)`` after every pass, ``total`` = T x
            ``public_chunk_count(public_rows)`` and ``done`` held at the step's end for the
            passes past ``public_rows`` (both public); it may raise to cancel, and then
            nothing is returned.
    """
    if not isinstance(config, DpSgdConfig):
        raise InvalidParameterError(f"config must be a DpSgdConfig, got {type(config).__name__}.")
    if not isinstance(prompts, PromptTokens):
        raise InvalidParameterError(f"prompts must be PromptTokens, got {type(prompts).__name__}.")
    clip_norm = check_clip_norm(clip_norm)
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    n_hat = check_positive_int("declared_dataset_size", declared_dataset_size)
    if isinstance(public_rows, bool) or not isinstance(public_rows, int) or public_rows < 0:
        raise InvalidParameterError(
            f"public_rows must be an integer >= 0, got public_rows={public_rows!r}."
        )
    inputs = _Inputs(latents, initial, prompts, included, on_step)

    n = latents.shape[0]
    b = chunk_rows(config.images_per_batch, public_rows=public_rows)
    chunks = padded_chunk_count(n, public_rows=public_rows, images_per_batch=b)
    device = latents.device
    ids = prompts.ids.to(device)
    mask = prompts.mask.to(device)
    # Per-image TRAINING randomness (template, timestep, denoising noise) from each image's
    # own 128-bit generator, seeded from OS entropy once per run; padding rows use the public
    # seed. Privacy does not rest on it (the clip bound C holds whatever it draws); it rests on
    # the Poisson sample and the Gaussian noise (dp.noise) (docs/privacy.md §6).
    generators = [training_generator(s) for s in training_seeds_from_entropy(n)] + [
        training_generator(PADDING_SEED) for _ in range(chunks * b - n)
    ]
    # Built (OpenDP imported, scale checked) before any step, so no step fails on it.
    gaussian = GaussianMechanism(dimension=int(initial.numel()), scale=z * clip_norm)
    embedding = initial.detach().to(device=device, dtype=torch.float32).clone()
    embedding.requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=config.learning_rate, weight_decay=0.0)
    # Progress counts the passes of the public n_hat only; past them it holds (docs/privacy.md §1).
    shown = public_chunk_count(public_rows, images_per_batch=b)
    total = config.steps * shown

    for step in range(config.steps):
        # Poisson sample over the n images, fresh OS entropy per step (docs/privacy.md §2.1).
        keep = torch.from_numpy(bernoulli(n, q)) & inputs.included
        summed = torch.zeros(embedding.numel(), dtype=torch.float64)
        for chunk_index in range(chunks):
            start = chunk_index * b
            real = max(0, min(n, start + b) - start)
            rows = torch.zeros((b, *latents.shape[1:]), dtype=latents.dtype, device=device)
            rows[:real] = latents[start : start + real]
            chunk_keep = torch.zeros(b, dtype=torch.bool)
            chunk_keep[:real] = keep[start : start + real]
            template_idx, timesteps, noise = _draw_per_image(
                rows, ids.shape[0], config, generators[start : start + b]
            )
            grads = per_example_gradients(
                rows,
                embedding,
                ids[template_idx],
                mask[template_idx],
                timesteps,
                noise,
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )
            _clipped_sum(grads.reshape(b, -1), chunk_keep, clip_norm, out=summed)
            if on_step is not None:
                on_step(step * shown + min(chunk_index + 1, shown), total)
        noisy = _noisy_step(summed, gaussian, q, n_hat)
        optimizer.zero_grad(set_to_none=True)
        embedding.grad = noisy.to(dtype=torch.float32).reshape(embedding.shape).to(device)
        optimizer.step()
    return embedding.detach().float().cpu()
