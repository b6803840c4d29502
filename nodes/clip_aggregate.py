"""The "DP Aggregate CLIP Embeddings" node: mechanism M1 on CLIP image embeddings (docs/privacy.md §5).

Order of events, so that no release exists without its ledger record and nothing private
leaves the node except the noisy estimate:
1. validate every input;
2. calibrate the noise, reuse an identical recorded release (nothing spent) or check that
   the collection can afford a new one, before any work (``dp.release.plan_release``);
3. build the report (before the record);
4. embed EVERY image with ComfyUI's CLIP vision in fixed-size batches padded to the
   declared n_hat (constant work, whatever the Poisson sample), L2-normalise each
   (so C = 1, c = 0);
5. commit: under the ledger's lock, drop images whose own budget is spent, Poisson-sample,
   add the noise and record the result (``dp.release.execute_release``);
6. renormalise the estimate to unit norm (post-processing, free of privacy cost).

Outputs hold the estimate and public parameters only: the ``DP_CLIP_TARGET`` for the
Universal Guidance Sampler, a ComfyUI ``CLIP_VISION_OUTPUT`` whose ``image_embeds`` is the
estimate (no hidden states of any private image) and the privacy report.
"""

from __future__ import annotations

import logging

import torch

from . import comfy_compat
from .budget import SAMPLING_RATE_INPUT, private_release_inputs
from .dependencies import require_runtime_packages
from .guidance_sampler import TARGET_TYPE

logger = logging.getLogger(__name__)

METHOD = "DP CLIP aggregate (mechanism M1, arXiv 2411.14639)"


class DPAggregateCLIPEmbeddingsNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = (TARGET_TYPE, "CLIP_VISION_OUTPUT", "STRING")
    RETURN_NAMES = ("target", "clip_vision_output", "report")
    OUTPUT_TOOLTIPS = (
        "The DP style target: connect it to the Universal Guidance Sampler.",
        "The same estimate as ComfyUI's CLIP_VISION_OUTPUT (image_embeds only, unit length), for "
        "nodes such as unCLIP Conditioning.",
        "Privacy report of this release: epsilon, delta, noise, budget left.",
    )
    FUNCTION = "aggregate"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Averages the CLIP image embeddings of private images with differential privacy: each "
        "image's embedding is normalised, a random subset is summed and Gaussian noise is added. "
        "Only this noisy average leaves the node. Every run is a release recorded in the "
        "budget's ledger."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": (
                    "CLIP_VISION",
                    {
                        "tooltip": "CLIP vision model (Load CLIP Vision); use the same one in the "
                        "Universal Guidance Sampler."
                    },
                ),
                **private_release_inputs(),
                "sampling_rate": SAMPLING_RATE_INPUT,
                "images_per_batch": (
                    "INT",
                    {
                        "default": 16,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Images embedded together in one CLIP pass (speed and memory only).",
                    },
                ),
            },
            # The node's id, to show the phase and ETA on it (comfy_compat.progress_text).
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def aggregate(
        self, clip_vision, private_images, budget, sampling_rate, images_per_batch, unique_id=None
    ):
        require_runtime_packages()
        from ..dp.guidance import ClipTarget
        from ..dp.mechanism import BoundMode, renormalize_unit
        from ..dp.release import execute_release, plan_release, release_report, reused_estimate
        from .inversion_model import PhaseText

        private = _validate(clip_vision, private_images, images_per_batch)
        width = comfy_compat.clip_vision_width(clip_vision)
        comfy_compat.load_models([clip_vision.patcher])
        _probe_public_input(clip_vision)
        plan = plan_release(
            budget,
            image_keys=private.image_keys,
            sampling_rate=sampling_rate,
            settings={
                "method": METHOD,
                "clip_vision": comfy_compat.module_fingerprint(clip_vision.model),
                "resolution": [private.resolution, private.resolution],
            },
            poll=comfy_compat.raise_if_cancelled,
            key_check=private.key_check,
        )
        report = release_report(
            plan,
            dimension=width,
            clip_norm=1.0,
            mode=BoundMode.NORMALIZE,
            extra_lines=(
                f"released: one unit-length CLIP image embedding of width {width} "
                "(connect 'target' to the Universal Guidance Sampler; sampling spends no budget)",
            ),
            poll=comfy_compat.raise_if_cancelled,
        )
        if plan.reused is not None:
            outcome = reused_estimate(plan, dimension=width)
        else:
            phase_text = PhaseText(unique_id, n_hat=plan.declared_dataset_size)
            vectors = _embed_every_image(
                clip_vision,
                private,
                images_per_batch,
                width,
                plan.declared_dataset_size,
                phase_text,
            )
            phase_text.show("commit: sampling, adding the noise and recording the release")
            outcome = execute_release(
                plan,
                vectors,
                image_keys=private.image_keys,
                centre=torch.zeros(width, dtype=torch.float64),
                clip_norm=1.0,
                mode=BoundMode.NORMALIZE,
                postprocess=renormalize_unit,
                label="DP Aggregate CLIP Embeddings",
            )
        estimate = outcome.estimate.detach().reshape(width).to(torch.float32)
        cal = plan.calibration
        target = ClipTarget(
            embedding=estimate,
            event=cal.event,
            epsilon=cal.epsilon_achieved,
            delta=cal.delta,
            noise_multiplier=cal.noise_multiplier,
            sampling_rate=plan.sampling_rate,
            declared_dataset_size=plan.declared_dataset_size,
            clip_norm=1.0,
            parameters={
                "method": METHOD,
                "release_id": outcome.release_id,
                "bound_mode": BoundMode.NORMALIZE.value,
                "centre": "zero",
                "embedding_width": width,
                "epsilon_target": cal.epsilon_target,
                "adjacency": "add/remove one image",
            },
        )
        output = comfy_compat.clip_vision_output(estimate.unsqueeze(0).clone())
        report, ui = report.published(outcome)  # names the release id
        logger.info("DP Aggregate CLIP Embeddings release:\n%s", report)
        return {"ui": ui, "result": (target, output, report)}


def _validate(clip_vision, private_images, images_per_batch):
    from ..dp.errors import InvalidParameterError
    from ..dp.private_set import check_private_image_set

    if clip_vision is None:
        raise InvalidParameterError(
            "clip_vision is missing: connect Load CLIP Vision (the model that will also guide "
            "the sampler)."
        )
    if not comfy_compat.is_clip_vision(clip_vision):
        raise InvalidParameterError(
            "clip_vision must be a CLIP vision model (Load CLIP Vision, or the demo model's "
            f"clip_vision output), got a {comfy_compat.socket_kind(clip_vision)}."
        )
    private = check_private_image_set(private_images)
    if isinstance(images_per_batch, bool) or not isinstance(images_per_batch, int):
        raise InvalidParameterError(
            f"images_per_batch must be an integer, got images_per_batch={images_per_batch!r}."
        )
    if images_per_batch < 1:
        raise InvalidParameterError(
            f"images_per_batch must be at least 1, got images_per_batch={images_per_batch}."
        )
    return private


def _probe_public_input(clip_vision) -> None:
    """Refuse a CLIP vision model whose embedding of a PUBLIC image (uniform grey) is not
    finite, before anything is spent: M1 would turn every private row into a zero
    contribution and release pure noise."""
    from ..dp.errors import InvalidParameterError

    size, mean, std = comfy_compat.clip_vision_settings(clip_vision)
    # A grey image is grey at any size: its preprocessed pixels are (0.5 - mean) / std.
    grey = (0.5 - torch.tensor(mean)) / torch.tensor(std)
    pixels = grey.view(1, 3, 1, 1).expand(1, 3, size, size).to(clip_vision.load_device)
    embeds = comfy_compat.clip_vision_image_embeds(clip_vision, pixels.contiguous())
    if not bool(torch.isfinite(embeds).all()):
        raise InvalidParameterError(
            "the CLIP vision model gives non-finite values on a public grey image: the model "
            "is probably damaged or loaded with the wrong precision. Your images were not used "
            "and no budget was spent."
        )


def _embed_every_image(
    clip_vision, private, per_batch: int, width: int, public_rows: int, phase_text
):
    """L2-normalised CLIP image embeddings (n, D) float64 on CPU of ALL pictures.

    Each row depends on its own picture alone (ComfyUI's CLIP vision has no cross-batch
    state), which the sensitivity of M1 relies on. The pictures are decoded ``per_batch`` at
    a time (``PrivateImageSet.batches``), so memory does not grow with n beyond the (n, D)
    result. Constant work: batches of exactly ``per_batch`` rows, padded up to at least
    ``public_rows`` (the declared n_hat) pictures, so the run time does not depend on the
    Poisson sample nor, up to n_hat, on the private count; the progress values and total
    depend on n_hat alone (held at the total past it, ``dp.inversion.PublicProgress``). A
    row that is not finite is left as is: M1 turns it into a zero contribution, silently.
    """
    from ..dp.inversion import PublicProgress, chunk_rows, padded_chunk_count, public_chunk_count

    per_batch = chunk_rows(per_batch, public_rows=public_rows)
    chunks = padded_chunk_count(private.count, public_rows=public_rows, images_per_batch=per_batch)
    shown = public_chunk_count(public_rows, images_per_batch=per_batch)
    bar = comfy_compat.progress_bar(shown)

    def report(value: int, total: int) -> None:
        bar.update_absolute(value, total)
        phase_text.show("embedding", value, total, unit="chunks")

    progress = PublicProgress(shown, report)
    phase_text.show("embedding", 0, shown, unit="chunks")
    side = private.resolution
    decoded = private.batches(per_batch, check_cancelled=comfy_compat.raise_if_cancelled)
    rows = []
    for chunk in range(chunks):
        comfy_compat.raise_if_cancelled()
        batch = next(decoded, None)
        padded = torch.zeros((per_batch, side, side, 3), dtype=torch.float32)
        real = 0
        if batch is not None:
            real = batch.pixels.shape[0]
            padded[:real] = batch.pixels
        del batch
        with comfy_compat.cancel_checks(clip_vision.model):
            embeds = comfy_compat.clip_vision_encode(clip_vision, padded)
        embeds = embeds.detach().to("cpu", torch.float64)[:real]
        rows.append(torch.nn.functional.normalize(embeds, dim=1))
        progress.advance_to(chunk + 1)
    vectors = torch.cat(rows)
    if vectors.shape[1] != width:
        from ..dp.errors import InvalidParameterError

        raise InvalidParameterError(
            f"the CLIP vision model returned embeddings of another width than {width}."
        )
    return vectors


NODE_CLASS_MAPPINGS = {"DPAdaptAggregateCLIPEmbeddings": DPAggregateCLIPEmbeddingsNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptAggregateCLIPEmbeddings": "DP Aggregate CLIP Embeddings"}
