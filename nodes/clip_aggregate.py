"""The "DP Aggregate CLIP Embeddings" node: mechanism M1 on CLIP image embeddings (DP_SPEC 5).

Order of events, so that no release exists without its ledger record and nothing private
leaves the node except the noisy estimate:
1. validate every input;
2. calibrate the noise and check that the ledger can afford the release, before any work
   (``dp.release.plan_release``);
3. Poisson-sample the images first, then embed only the kept ones with ComfyUI's CLIP vision
   (batched, on ComfyUI's device), L2-normalise each (so C = 1, c = 0);
4. record the release in the ledger, then draw the noise (``dp.release.execute_release``);
5. renormalise the estimate to unit norm (post-processing, free of privacy cost).

Outputs hold the estimate and public parameters only: the ``DP_CLIP_TARGET`` for the
Universal Guidance Sampler, a ComfyUI ``CLIP_VISION_OUTPUT`` whose ``image_embeds`` is the
estimate (no hidden states of any private image) and the privacy report.
"""

from __future__ import annotations

import logging

import torch

from . import comfy_compat
from .budget import SAMPLING_RATE_INPUT, check_private_batch, private_release_inputs
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
            }
        }

    def aggregate(
        self,
        clip_vision,
        images,
        dataset_size,
        fingerprint,
        budget,
        sampling_rate,
        images_per_batch,
    ):
        require_runtime_packages()
        from ..dp.guidance import ClipTarget
        from ..dp.mechanism import BoundMode, poisson_sample, renormalize_unit
        from ..dp.release import execute_release, plan_release, release_report

        _validate(clip_vision, images, dataset_size, images_per_batch)
        width = comfy_compat.clip_vision_width(clip_vision)

        plan = plan_release(
            budget, fingerprint=fingerprint, dataset_size=dataset_size, sampling_rate=sampling_rate
        )

        kept = poisson_sample(dataset_size, sampling_rate=sampling_rate)
        vectors = _embed_kept(clip_vision, images, kept.indices, images_per_batch, width)
        del kept  # which images were sampled is private (DP_SPEC section 1)

        release = execute_release(
            plan,
            vectors,
            centre=torch.zeros(width, dtype=torch.float64),
            clip_norm=1.0,
            mode=BoundMode.NORMALIZE,
            postprocess=renormalize_unit,
            label="DP Aggregate CLIP Embeddings",
        )
        estimate = release.estimate.detach().reshape(width).to(torch.float32)
        cal = plan.calibration
        target = ClipTarget(
            embedding=estimate,
            event=release.event,
            epsilon=cal.epsilon_achieved,
            delta=cal.delta,
            noise_multiplier=release.noise_multiplier,
            sampling_rate=release.sampling_rate,
            dataset_size=release.dataset_size,
            clip_norm=release.clip_norm,
            parameters={
                "method": METHOD,
                "bound_mode": release.mode.value,
                "centre": "zero",
                "embedding_width": width,
                "epsilon_target": cal.epsilon_target,
                "adjacency": "add/remove one image",
            },
        )
        output = comfy_compat.clip_vision_output(estimate.unsqueeze(0).clone())
        report = release_report(
            plan,
            release,
            extra_lines=(
                f"released: one unit-length CLIP image embedding of width {width} "
                "(connect 'target' to the Universal Guidance Sampler; sampling spends no budget)",
            ),
        )
        logger.info("DP Aggregate CLIP Embeddings release:\n%s", report)
        return {"ui": {"text": [report]}, "result": (target, output, report)}


def _validate(clip_vision, images, dataset_size, images_per_batch) -> None:
    from ..dp.errors import InvalidParameterError

    if clip_vision is None:
        raise InvalidParameterError(
            "clip_vision is missing: connect Load CLIP Vision (the model that will also guide "
            "the sampler)."
        )
    check_private_batch(images, dataset_size)
    if isinstance(images_per_batch, bool) or not isinstance(images_per_batch, int):
        raise InvalidParameterError(
            f"images_per_batch must be an integer, got images_per_batch={images_per_batch!r}."
        )
    if images_per_batch < 1:
        raise InvalidParameterError(
            f"images_per_batch must be at least 1, got images_per_batch={images_per_batch}."
        )


def _embed_kept(clip_vision, images, indices, per_batch: int, width: int) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (m, D) float64 on CPU of the kept images only.

    Each row depends on its own image alone (ComfyUI's CLIP vision has no cross-batch state),
    which the sensitivity of M1 relies on. Under Poisson sampling the number m of kept images
    is private, so the progress bar counts the public n and moves once, at the end (Cancel is
    still checked before every batch).
    """
    indices = [int(i) for i in indices]
    dataset_size = int(images.shape[0])
    progress = comfy_compat.progress_bar(dataset_size)
    if not indices:
        progress.update_absolute(dataset_size, dataset_size)
        return torch.zeros((0, width), dtype=torch.float64)
    comfy_compat.load_models([clip_vision.patcher])
    rows = []
    for start in range(0, len(indices), per_batch):
        comfy_compat.raise_if_cancelled()
        chunk = indices[start : start + per_batch]
        embeds = comfy_compat.clip_vision_encode(clip_vision, images[chunk])
        rows.append(torch.nn.functional.normalize(embeds.detach().to("cpu", torch.float64), dim=1))
    progress.update_absolute(dataset_size, dataset_size)
    vectors = torch.cat(rows)
    if vectors.shape[1] != width or not torch.isfinite(vectors).all():
        from ..dp.errors import InvalidParameterError

        raise InvalidParameterError(  # no shape in the message: m is private
            f"the CLIP vision model returned non-finite embeddings or a width other than {width}."
        )
    return vectors


NODE_CLASS_MAPPINGS = {"DPAdaptAggregateCLIPEmbeddings": DPAggregateCLIPEmbeddingsNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptAggregateCLIPEmbeddings": "DP Aggregate CLIP Embeddings"}
