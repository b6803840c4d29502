"""DP-SGD textual inversion (the paper's baseline, docs/privacy.md §4) for the training node.

The node's own DPAgg-TI path releases one noisy average of per-image embeddings; this path
trains ONE shared token with DP-SGD for T steps. Its noise is drawn at every step, so the
whole training runs inside the ledger commit (``dp.release.commit_release``): the record and
the trained token are written together, and a run cancelled or failed before that publishes
nothing and spends nothing. ComfyUI executes one prompt at a time, so holding the ledger's
lock during training only delays another process's commit (up to the lock's timeout).
"""

from __future__ import annotations

import functools
import math

import torch

from . import comfy_compat


def dpsgd_calibration(steps: int):
    """The calibration of T Poisson-subsampled Gaussian steps, for ``plan_release``."""
    from ..dp.accounting import calibrate_dpsgd_noise_multiplier

    return functools.partial(calibrate_dpsgd_noise_multiplier, steps=steps)


def report_lines(plan, *, steps: int, dimension: int) -> tuple[str, ...]:
    """DP-SGD's noise next to DPAgg-TI's for the same budget and declared n_hat (public).

    Per step, the noise on the averaged gradient over the largest possible averaged signal
    is z sqrt(D) / (q n_hat); DPAgg-TI releases once, with noise z1 sqrt(D) / n_hat at q = 1.
    """
    from ..dp.accounting import calibrate_noise_multiplier

    budget, q, n_hat = plan.budget, plan.sampling_rate, plan.declared_dataset_size
    per_step = plan.noise_multiplier * math.sqrt(dimension) / (q * n_hat)
    one_release = calibrate_noise_multiplier(
        epsilon=budget.epsilon,
        delta=budget.delta,
        sampling_rate=1.0,
        poll=comfy_compat.raise_if_cancelled,
    ).noise_multiplier
    aggregate = one_release * math.sqrt(dimension) / n_hat
    lines = [
        f"method: DP-SGD, T = {steps} steps at q = {q:g}, z = {plan.noise_multiplier:.4g} per step",
        f"expected noise / clipped signal per step: {per_step:.3g} (DPAgg-TI at the same budget, "
        f"q = 1: {aggregate:.3g} for its one release)",
    ]
    if steps * q < 1:
        lines.append(
            f"WARNING: T x q = {steps * q:.3g} < 1: most images are expected to take part in no "
            "step at all; raise steps or the sampling rate."
        )
    return tuple(lines)


def release_dpsgd(
    plan,
    *,
    model,
    clip,
    vae,
    family,
    private,
    config,
    initial,
    prompts,
    clip_norm,
    postprocess,
    label,
    precision="model",
    phase_text=None,
):
    """Train the shared token with DP-SGD inside the ledger commit and post-process it (the
    same rescale as DPAgg-TI); returns the release outcome (flattened token, float64)."""
    from ..dp.dpsgd import DpSgdConfig, train_shared_embedding_dpsgd
    from ..dp.inversion import chunk_rows
    from ..dp.release import commit_release
    from . import inversion_model as im

    sgd = DpSgdConfig(
        steps=config.steps,
        learning_rate=config.learning_rate,
        images_per_batch=config.images_per_batch,
    )
    n_hat = plan.declared_dataset_size
    latents, on_step = im.encode_for_training(
        model, vae, private, public_rows=n_hat, config=sgd, phase_text=phase_text
    )

    def train(included: tuple[bool, ...]) -> torch.Tensor:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            im.training_passes(
                model,
                checkpoint_blocks=im.wants_checkpointing(
                    latents.shape, chunk_rows(sgd.images_per_batch, public_rows=n_hat)
                ),
                precision=precision,
            ) as denoise_loss,
        ):
            token = train_shared_embedding_dpsgd(
                latents,
                initial=initial,
                prompts=prompts,
                config=sgd,
                included=included,
                sampling_rate=plan.sampling_rate,
                clip_norm=clip_norm,
                noise_multiplier=plan.noise_multiplier,
                declared_dataset_size=n_hat,
                text_forward=im.make_text_forward(clip, family),
                denoise_loss=denoise_loss,
                public_rows=n_hat,
                on_step=on_step,
            )
        return postprocess(token.reshape(-1).to(torch.float64))

    return commit_release(
        plan,
        image_keys=private.image_keys,
        release=train,
        dimension=initial.numel(),
        label=label,
    )
