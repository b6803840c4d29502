"""The "DP Textual Inversion Train" node: DPAgg-TI (DP_SPEC section 3) inside ComfyUI.

Order of events, chosen so that no release ever exists without its ledger record and a run
stopped early spends nothing:
1. validate every input, refuse an existing file or an unsupported model family;
2. calibrate the noise and check the ledger can afford the release (read-only);
3. Poisson-sample the images, encode the kept ones once, train one embedding per image
   (progress bar; Cancel stops here with nothing written and nothing spent);
4. record the release in the ledger (under its lock, re-checking the budget), then draw
   the Gaussian noise (mechanism M1);
5. write ``NAME.safetensors`` atomically into ComfyUI's embeddings folder.
"""

from __future__ import annotations

import logging
import math

import torch

from . import comfy_compat
from .budget import SAMPLING_RATE_INPUT, check_private_batch, private_release_inputs
from .dependencies import require_runtime_packages

logger = logging.getLogger(__name__)

MAX_VECTORS = 16
MAX_STEPS = 100_000


class DPTextualInversionTrainNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("token", "report")
    OUTPUT_TOOLTIPS = (
        "The style token 'embedding:NAME' to put in any prompt (e.g. through DP Style Prompt).",
        "Privacy report of this release: epsilon, delta, noise, budget left.",
    )
    FUNCTION = "train"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Learns a style token from private images with differential privacy (DPAgg-TI): one "
        "textual-inversion embedding per image, each bounded, then a noisy average is released "
        "and saved as embedding:NAME. Every run is a release recorded in the budget's ledger."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x or SD2.x model from Load Checkpoint."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint."}),
                "vae": (
                    "VAE",
                    {"tooltip": "The VAE of the same checkpoint (encodes the images once)."},
                ),
                **private_release_inputs(),
                "embedding_name": (
                    "STRING",
                    {
                        "default": "dp_style",
                        "tooltip": "File name of the token: use it in prompts as embedding:NAME. "
                        "Letters, digits, '_', '-', '.'.",
                    },
                ),
                "num_vectors": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_VECTORS,
                        "tooltip": "Vectors per token. More capture more detail but each costs "
                        "signal-to-noise under the same budget (the noise grows with the dimension).",
                    },
                ),
                "initializer_word": (
                    "STRING",
                    {
                        "default": "painting",
                        "tooltip": "Public word whose embedding starts training and is the centre the "
                        "per-image embeddings are bounded around.",
                    },
                ),
                "template_set": (
                    ["style", "object"],
                    {
                        "default": "style",
                        "tooltip": "Training prompts: 'style' (a painting in the style of *) or 'object' (a photo of a *).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 400,
                        "min": 1,
                        "max": MAX_STEPS,
                        "tooltip": "Optimisation steps per image.",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 0.005,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.0005,
                        "round": False,
                        "tooltip": "Adam learning rate of each image's embedding.",
                    },
                ),
                "images_per_batch": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 256,
                        "tooltip": "Images trained together in one forward/backward pass (speed and memory "
                        "only; images never influence each other).",
                    },
                ),
                "sampling_rate": SAMPLING_RATE_INPUT,
                "clip_norm": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.05,
                        "round": False,
                        "tooltip": "Bound C on how far each image's embedding may move from the initializer; "
                        "the noise is proportional to C.",
                    },
                ),
                "bound_mode": (
                    ["clip", "normalize"],
                    {
                        "default": "clip",
                        "tooltip": "clip: shrink only embeddings farther than C. normalize: scale every one "
                        "to exactly C (the paper's choice).",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Replace an existing embedding file with the same name.",
                    },
                ),
            }
        }

    def train(
        self,
        model,
        clip,
        vae,
        images,
        dataset_size,
        fingerprint,
        budget,
        embedding_name,
        num_vectors,
        initializer_word,
        template_set,
        steps,
        learning_rate,
        images_per_batch,
        sampling_rate,
        clip_norm,
        bound_mode,
        overwrite,
    ):
        require_runtime_packages()
        from ..dp.embedding_file import check_writable, save_embedding
        from ..dp.errors import InvalidParameterError
        from ..dp.inversion import InversionConfig, train_per_image_embeddings
        from ..dp.mechanism import BoundMode, poisson_sample, rescale_to_norm
        from ..dp.release import execute_release, plan_release, release_report
        from ..dp.templates import templates_for
        from ..dp.validation import check_clip_norm
        from . import inversion_model as im

        config = InversionConfig(
            steps=steps, learning_rate=learning_rate, images_per_batch=images_per_batch
        )
        check_clip_norm(clip_norm)
        mode = BoundMode(bound_mode)
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise InvalidParameterError(
                f"num_vectors must be 1..{MAX_VECTORS}, got num_vectors={num_vectors}."
            )
        check_private_batch(images, dataset_size)
        family = im.detect_family(model, clip)
        directory = comfy_compat.embeddings_directories()[0]
        directory.mkdir(parents=True, exist_ok=True)
        check_writable(directory, embedding_name, overwrite=overwrite)

        plan = plan_release(
            budget, fingerprint=fingerprint, dataset_size=dataset_size, sampling_rate=sampling_rate
        )

        comfy_compat.load_models([model, clip.patcher])
        init_tokens = im.token_vectors(clip, family, initializer_word.strip())
        initial = init_tokens[torch.arange(num_vectors) % init_tokens.shape[0]]
        prompts = im.tokenize_templates(clip, family, templates_for(template_set), num_vectors)
        target_norm = im.mean_token_norm(clip, family)

        kept = poisson_sample(dataset_size, sampling_rate=sampling_rate)
        # The bar's total is public (it assumes all n images); the number kept by Poisson
        # sampling is private and is not shown (the run's duration still hints at it).
        public_total = math.ceil(dataset_size / images_per_batch) * steps
        progress = comfy_compat.progress_bar(public_total)

        def on_step(done: int, total: int) -> None:
            comfy_compat.raise_if_cancelled()
            progress.update_absolute(min(done, public_total), public_total)

        width = initial.shape[1]
        if len(kept.indices) > 0:
            latents = comfy_compat.encode_latents(model, vae, images[kept.indices])
            with torch.inference_mode(False), torch.enable_grad():
                embeddings = train_per_image_embeddings(
                    latents,
                    initial=initial,
                    prompts=prompts,
                    config=config,
                    seeds=im.seeds_from_entropy(len(kept.indices)),
                    text_forward=im.make_text_forward(clip, family),
                    denoise_loss=im.make_denoise_loss(model),
                    on_step=on_step,
                )
            vectors = embeddings.reshape(len(kept.indices), num_vectors * width)
        else:
            vectors = torch.zeros((0, num_vectors * width))
        del kept  # which images were sampled is private (DP_SPEC section 1)

        release = execute_release(
            plan,
            vectors,
            centre=initial.reshape(-1),
            clip_norm=clip_norm,
            mode=mode,
            postprocess=rescale_to_norm(target_norm, rows=num_vectors),
            label=f"DP Textual Inversion: {embedding_name}",
        )
        token = release.estimate.reshape(num_vectors, width).to(torch.float32)
        metadata = _file_metadata(
            release, plan, family, config, num_vectors, initializer_word, template_set
        )
        path = save_embedding(
            directory, embedding_name, {family.file_key: token}, metadata, overwrite=overwrite
        )
        report = release_report(
            plan,
            release,
            extra_lines=(
                f"saved: {path.name} in the embeddings folder; use it as embedding:{path.stem}",
                f"model family: {family.name}; vectors: {num_vectors} x {width}; steps per image: {steps}",
            ),
        )
        logger.info("DP Textual Inversion release:\n%s", report)
        return {"ui": {"text": [report]}, "result": (f"embedding:{path.stem}", report)}


def _file_metadata(
    release, plan, family, config, num_vectors, initializer_word, template_set
) -> dict[str, str]:
    """Public facts only (DP_SPEC 3.4): the DpEvent and parameters, nothing per image."""
    import json

    from ..dp.accounting import event_to_dict
    from ..dp.version import PACKAGE_VERSION

    return {
        "dp_adapt.method": "DPAgg-TI",
        "dp_adapt.dp_event": json.dumps(event_to_dict(release.event), sort_keys=True),
        "dp_adapt.epsilon": repr(plan.calibration.epsilon_achieved),
        "dp_adapt.epsilon_target": repr(plan.calibration.epsilon_target),
        "dp_adapt.delta": repr(plan.calibration.delta),
        "dp_adapt.adjacency": "add/remove one image",
        "dp_adapt.sampling_rate": repr(release.sampling_rate),
        "dp_adapt.dataset_size": str(release.dataset_size),
        "dp_adapt.clip_norm": repr(release.clip_norm),
        "dp_adapt.noise_multiplier": repr(release.noise_multiplier),
        "dp_adapt.bound_mode": release.mode.value,
        "dp_adapt.num_vectors": str(num_vectors),
        "dp_adapt.steps": str(config.steps),
        "dp_adapt.learning_rate": repr(config.learning_rate),
        "dp_adapt.initializer_word": initializer_word,
        "dp_adapt.template_set": template_set,
        "dp_adapt.model_family": family.name,
        "dp_adapt.package_version": PACKAGE_VERSION,
    }


NODE_CLASS_MAPPINGS = {"DPAdaptTextualInversionTrain": DPTextualInversionTrainNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptTextualInversionTrain": "DP Textual Inversion Train"}
