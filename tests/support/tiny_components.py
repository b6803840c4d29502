"""Tiny SD1.x / SDXL components in the in-process ComfyUI, with its embeddings folder wired in."""

from __future__ import annotations

from pathlib import Path


def tiny_sd1_components(family: str = "sd1") -> dict:
    """``model``, ``clip`` (reading ComfyUI's first embeddings folder), ``vae`` and that
    ``embeddings`` folder; model and CLIP loaded the way ComfyUI loads them. ``family``:
    sd1, sd2 or sdxl (``nodes/tiny_models.py``)."""
    import folder_paths

    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    embeddings = Path(folder_paths.get_folder_paths("embeddings")[0])
    embeddings.mkdir(parents=True, exist_ok=True)
    model = tiny_models.build_tiny_model(family=family)
    clip = tiny_models.build_tiny_clip(embedding_directory=[str(embeddings)], family=family)
    vae = tiny_models.build_tiny_vae()
    comfy_compat.load_models([model, clip.patcher])
    return {"model": model, "clip": clip, "vae": vae, "embeddings": embeddings}
