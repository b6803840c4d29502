"""The "DP Textual Inversion Train" node: DPAgg-TI (docs/privacy.md §3) inside ComfyUI.

Order of events, chosen so that no release exists without its ledger record, a run stopped
early spends nothing, and nothing observable depends on the private images except through
the noise:
1. validate every input, refuse an existing file or an unsupported model family;
2. calibrate the noise, look for an identical recorded release (then publish it again,
   spending nothing) and check the collection can afford a new one (read-only);
3. build the report and check the output file (everything that could fail after the
   record is checked here, before it);
4. encode and train EVERY image, in fixed-size chunks padded to the declared n_hat (constant
   work: progress, run time and each image's result do not depend on the other images or
   on the Poisson sample; Cancel stops here with nothing written and nothing spent);
5. commit: under the ledger's lock, re-check the budget, drop images whose own budget is
   spent, Poisson-sample, add the Gaussian noise (mechanism M1) and record the result;
6. write ``NAME.safetensors`` atomically into ComfyUI's embeddings folder.
"""

from __future__ import annotations

import logging

import torch

from . import comfy_compat
from . import dpsgd_inversion as dpsgd
from .budget import SAMPLING_RATE_INPUT, private_release_inputs
from .dependencies import require_runtime_packages
from .training_precision import PRECISION_INPUT, PRECISIONS, check_precision

logger = logging.getLogger(__name__)

MAX_VECTORS = 16
METHODS = ("DPAgg-TI", "DP-SGD")
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
                "model": (
                    "MODEL",
                    {"tooltip": "SD1.x, SD2.x or SDXL model from Load Checkpoint."},
                ),
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
                "method": (
                    list(METHODS),
                    {
                        "default": METHODS[0],
                        "tooltip": "DPAgg-TI (the paper's method): one embedding per image, one noisy "
                        "average. DP-SGD (the paper's baseline): one shared token trained for "
                        "'steps' noisy steps, each on a Poisson sample at 'sampling_rate', every "
                        "gradient clipped to 'clip_norm' ('bound_mode' does not apply).",
                    },
                ),
            },
            "optional": {"precision": PRECISION_INPUT},
            # The node's id, to show the phase and ETA on it (comfy_compat.progress_text).
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(
        self,
        model,
        clip,
        vae,
        private_images,
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
        method=METHODS[0],
        precision=PRECISIONS[0],
        unique_id=None,
    ):
        require_runtime_packages()
        from ..dp.embedding_file import (
            check_writable,
            embedding_file_bytes,
            embedding_path,
            is_release_file,
            prepare_directory,
            save_embedding,
        )
        from ..dp.errors import DpAdaptError, InvalidParameterError
        from ..dp.inversion import InversionConfig
        from ..dp.mechanism import BoundMode, rescale_to_norm
        from ..dp.private_set import check_private_image_set
        from ..dp.release import execute_release, plan_release, release_report, reused_estimate
        from ..dp.templates import templates_for
        from ..dp.validation import check_clip_norm
        from . import inversion_model as im

        config = InversionConfig(
            steps=steps, learning_rate=learning_rate, images_per_batch=images_per_batch
        )
        check_clip_norm(clip_norm)
        if method not in METHODS:
            raise InvalidParameterError(
                f"method must be one of {', '.join(METHODS)}, got method={method!r}."
            )
        sgd = method == "DP-SGD"
        mode = BoundMode.CLIP if sgd else BoundMode(bound_mode)
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise InvalidParameterError(
                f"num_vectors must be 1..{MAX_VECTORS}, got num_vectors={num_vectors}."
            )
        check_precision(precision, model.load_device)
        private = check_private_image_set(private_images)
        family = im.detect_family(model, clip)
        directory = prepare_directory(comfy_compat.embeddings_directories()[0])
        embedding_path(directory, embedding_name)  # the name; whether it exists: after the plan

        comfy_compat.load_models([model, clip.patcher])
        init_tokens = im.token_vectors(clip, family, initializer_word.strip())
        initial = init_tokens[torch.arange(num_vectors) % init_tokens.shape[0]]
        prompts = im.tokenize_templates(clip, family, templates_for(template_set), num_vectors)
        target_norms = im.mean_token_norms(clip, family)
        width = initial.shape[1]
        dimension = num_vectors * width
        side = private.resolution  # the loader's public setting
        im.probe_public_inputs(model, clip, family, prompts, initial, height=side, width=side)

        settings = {
            "method": method,
            "model": comfy_compat.module_fingerprint(
                model.model.diffusion_model, *im.text_encoders(clip, family), vae.first_stage_model
            ),
            "model_family": family.name,
            "num_vectors": num_vectors,
            "initializer_word": initializer_word.strip(),
            "template_set": template_set,
            "steps": steps,
            "learning_rate": learning_rate,
            "images_per_batch": images_per_batch,
            "clip_norm": clip_norm,
            "bound_mode": mode.value,
            "resolution": [private.resolution, private.resolution],
            # Only when chosen, so that earlier records of the same release still match.
            **({"precision": precision} if precision != PRECISIONS[0] else {}),
        }
        plan = plan_release(
            budget,
            image_keys=private.image_keys,
            sampling_rate=sampling_rate,
            settings=settings,
            poll=comfy_compat.raise_if_cancelled,
            key_check=private.key_check,
            **({"calibrate": dpsgd.dpsgd_calibration(steps)} if sgd else {}),
        )
        reused_id = plan.reused.release_id if plan.reused is not None else None
        path = check_writable(
            directory,
            embedding_name,
            overwrite=overwrite,
            same_release=reused_id,
            size_bytes=embedding_file_bytes(num_vectors, width),
        )
        report = release_report(
            plan,
            dimension=dimension,
            clip_norm=clip_norm,
            mode=mode,
            extra_lines=(
                f"saved: {path.name} in the embeddings folder; use it as embedding:{path.stem}",
                f"model family: {family.name}; vectors: {num_vectors} x {width}; steps: {steps}"
                + ("; bf16 autocast" if precision == "bf16" else ""),
            ),
            noise_lines=dpsgd.report_lines(plan, steps=steps, dimension=dimension) if sgd else None,
            poll=comfy_compat.raise_if_cancelled,
        )
        postprocess = rescale_to_norm(
            target_norms, rows=num_vectors, widths=im.encoder_widths(clip, family)
        )

        label = f"DP Textual Inversion ({method}): {path.stem}"
        phase_text = im.PhaseText(unique_id, n_hat=plan.declared_dataset_size)
        if plan.reused is not None:
            outcome = reused_estimate(plan, dimension=dimension)
        elif sgd:
            outcome = dpsgd.release_dpsgd(
                plan,
                model=model,
                clip=clip,
                vae=vae,
                family=family,
                private=private,
                config=config,
                initial=initial,
                prompts=prompts,
                clip_norm=clip_norm,
                postprocess=postprocess,
                label=label,
                precision=precision,
                phase_text=phase_text,
            )
        else:
            vectors = _train_every_image(
                model,
                clip,
                vae,
                family,
                private,
                plan,
                config,
                initial,
                prompts,
                precision,
                phase_text,
            )
            phase_text.show("commit: sampling, adding the noise and recording the release")
            outcome = execute_release(
                plan,
                vectors.reshape(-1, dimension),
                image_keys=private.image_keys,
                centre=initial.reshape(-1),
                clip_norm=clip_norm,
                mode=mode,
                postprocess=postprocess,
                label=label,
            )
        token = outcome.estimate.reshape(num_vectors, width).to(torch.float32)
        metadata = _file_metadata(
            method,
            plan,
            outcome,
            family,
            config,
            num_vectors,
            initializer_word,
            template_set,
            clip_norm,
            mode,
            precision,
        )
        if not (outcome.reused and is_release_file(path, outcome.release_id)):
            phase_text.show("saving the embedding file")
            try:
                save_embedding(
                    directory,
                    embedding_name,
                    im.split_token(token, clip, family),
                    metadata,
                    overwrite=overwrite or outcome.reused,
                )
            except (OSError, DpAdaptError) as error:
                raise _not_written(error, path, plan, outcome) from error
        report, ui = report.published(outcome)  # names the release id
        logger.info("DP Textual Inversion release:\n%s", report)
        return {"ui": ui, "result": (f"embedding:{path.stem}", report)}


def _train_every_image(
    model, clip, vae, family, private, plan, config, initial, prompts, precision, phase_text
):
    """One embedding per image, (n, k, d), for ALL images (sampling happens in the commit),
    with the constant, padded work of ``inversion_model.encode_for_training``."""
    from ..dp.inversion import chunk_rows, train_per_image_embeddings, training_seeds_from_entropy
    from . import inversion_model as im

    latents, on_step = im.encode_for_training(
        model,
        vae,
        private,
        public_rows=plan.declared_dataset_size,
        config=config,
        phase_text=phase_text,
    )
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        im.training_passes(
            model,
            checkpoint_blocks=im.wants_checkpointing(
                latents.shape,
                chunk_rows(config.images_per_batch, public_rows=plan.declared_dataset_size),
            ),
            precision=precision,
        ) as denoise_loss,
    ):
        return train_per_image_embeddings(
            latents,
            initial=initial,
            prompts=prompts,
            config=config,
            seeds=training_seeds_from_entropy(private.count),
            text_forward=im.make_text_forward(clip, family),
            denoise_loss=denoise_loss,
            public_rows=plan.declared_dataset_size,
            on_step=on_step,
        )


def _not_written(error: Exception, path, plan, outcome) -> Exception:
    """The plain-words error of a write that failed after the release was recorded: what
    is recorded, why nothing was written, and that queueing again costs nothing (the
    ledger publishes an identical recorded release again, docs/privacy.md §7)."""
    from ..dp.display import shown_path
    from ..dp.embedding_file import EmbeddingNotWrittenError

    if isinstance(error, OSError):
        reason = error.strerror or type(error).__name__
        if error.filename is not None:
            reason = f"{reason}: {shown_path(error.filename)}"
    else:
        reason = str(error)
    spent = (
        "it spent nothing now (it was recorded earlier)"
        if outcome.reused
        else f"it spent epsilon = {plan.calibration.epsilon_achieved:.4g}"
    )
    return EmbeddingNotWrittenError(
        f"The release {outcome.release_id} IS recorded in the budget's ledger ({spent}), but "
        f"nothing was written to {path.name!r} because: {reason}. Fix that and queue the "
        "same prompt again: the recorded release is published again and its file written, at "
        "no further cost."
    )


def _file_metadata(
    method,
    plan,
    outcome,
    family,
    config,
    num_vectors,
    initializer_word,
    template_set,
    clip_norm,
    mode,
    precision,
) -> dict[str, str]:
    """Public facts only (docs/privacy.md §3.4): the DpEvent and parameters, nothing per image, and
    no count of images (the declared n_hat is public, the real count is not)."""
    import json

    from ..dp.accounting import event_to_dict
    from ..dp.embedding_file import RELEASE_ID_KEY
    from ..dp.version import PACKAGE_VERSION

    cal = plan.calibration
    return {
        "dp_adapt.method": method,
        RELEASE_ID_KEY: outcome.release_id,
        "dp_adapt.dp_event": json.dumps(event_to_dict(cal.event), sort_keys=True),
        "dp_adapt.epsilon": repr(cal.epsilon_achieved),
        "dp_adapt.epsilon_target": repr(cal.epsilon_target),
        "dp_adapt.delta": repr(cal.delta),
        "dp_adapt.adjacency": "add/remove one image",
        "dp_adapt.sampling_rate": repr(plan.sampling_rate),
        "dp_adapt.declared_dataset_size": str(plan.declared_dataset_size),
        "dp_adapt.clip_norm": repr(float(clip_norm)),
        "dp_adapt.noise_multiplier": repr(cal.noise_multiplier),
        "dp_adapt.bound_mode": mode.value,
        "dp_adapt.num_vectors": str(num_vectors),
        "dp_adapt.steps": str(config.steps),
        "dp_adapt.learning_rate": repr(config.learning_rate),
        "dp_adapt.initializer_word": initializer_word,
        "dp_adapt.template_set": template_set,
        "dp_adapt.model_family": family.name,
        "dp_adapt.precision": precision,
        "dp_adapt.package_version": PACKAGE_VERSION,
    }


NODE_CLASS_MAPPINGS = {"DPAdaptTextualInversionTrain": DPTextualInversionTrainNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptTextualInversionTrain": "DP Textual Inversion Train"}
