"""Loader nodes for the tiny in-code models (tests and the headless demo only).

They are registered only when the environment variable ``COMFYUI_DP_ADAPT_TINY_MODELS`` is
set, so artists never see them. They stand in for ``CheckpointLoaderSimple`` (same outputs:
MODEL, CLIP, VAE) and ``CLIPVisionLoader`` (CLIP_VISION) when a shipped workflow runs without
any downloaded weights.
"""

from __future__ import annotations

from . import comfy_compat, tiny_models

TINY_MODELS_FLAG = "COMFYUI_DP_ADAPT_TINY_MODELS"


class TinyCheckpointLoader:
    """Same sockets as ComfyUI's Load Checkpoint, built in code from a fixed seed."""

    CATEGORY = "DP Adapt/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    DESCRIPTION = "Tiny SD1.x-style model, text encoder and VAE built in code (no download)."
    FAMILY = "sd1"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**31 - 1,
                        "tooltip": "Seed of the tiny weights (public, not DP noise).",
                    },
                ),
            }
        }

    def load(self, seed: int):
        embedding_dirs = [str(p) for p in comfy_compat.embeddings_directories()]
        return (
            tiny_models.build_tiny_model(seed=seed, family=self.FAMILY),
            tiny_models.build_tiny_clip(
                embedding_directory=embedding_dirs, seed=seed + 1, family=self.FAMILY
            ),
            tiny_models.build_tiny_vae(seed=seed + 2),
        )


class TinySDXLCheckpointLoader(TinyCheckpointLoader):
    """The same for SDXL: ComfyUI's SDXL model class and its two text encoders, tiny."""

    DESCRIPTION = (
        "Tiny SDXL-style model (CLIP-L + CLIP-G text encoders, size conditioning) and VAE "
        "built in code (no download)."
    )
    FAMILY = "sdxl"

    @classmethod
    def INPUT_TYPES(cls):
        # Another default seed: old ComfyUI reuses a cached node output when the node id and
        # its input values match, even if the class changed (tests swap loaders by id).
        inputs = super().INPUT_TYPES()
        seed_type, seed_options = inputs["required"]["seed"]
        inputs["required"]["seed"] = (seed_type, {**seed_options, "default": 100})
        return inputs


class TinyCLIPVisionLoader:
    """Same socket as ComfyUI's Load CLIP Vision, built in code from a fixed seed."""

    CATEGORY = "DP Adapt/testing"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    DESCRIPTION = "Tiny CLIP vision encoder built in code (no download)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": (
                    "INT",
                    {
                        "default": 3,
                        "min": 0,
                        "max": 2**31 - 1,
                        "tooltip": "Seed of the tiny weights (public, not DP noise).",
                    },
                ),
            }
        }

    def load(self, seed: int):
        return (tiny_models.build_tiny_clip_vision(seed=seed),)


NODE_CLASS_MAPPINGS = {
    "DPAdaptTinyCheckpointLoader": TinyCheckpointLoader,
    "DPAdaptTinySDXLCheckpointLoader": TinySDXLCheckpointLoader,
    "DPAdaptTinyCLIPVisionLoader": TinyCLIPVisionLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DPAdaptTinyCheckpointLoader": "Tiny Checkpoint (DP Adapt tests)",
    "DPAdaptTinySDXLCheckpointLoader": "Tiny SDXL Checkpoint (DP Adapt tests)",
    "DPAdaptTinyCLIPVisionLoader": "Tiny CLIP Vision (DP Adapt tests)",
}
# What each tiny loader replaces when a shipped workflow runs without downloaded weights.
REPLACES = {
    "CheckpointLoaderSimple": "DPAdaptTinyCheckpointLoader",
    "CLIPVisionLoader": "DPAdaptTinyCLIPVisionLoader",
}


def replacements_for(workflow: dict) -> dict:
    """``REPLACES`` for one workflow: an SDXL checkpoint (its file name names SDXL, e.g.
    ``sd_xl_base_1.0.safetensors``) gets the tiny SDXL loader instead."""
    names = [
        str((node.get("widgets_values") or [""])[0]).lower()
        for node in workflow.get("nodes", [])
        if node.get("type") == "CheckpointLoaderSimple"
    ]
    if any("xl" in name for name in names):
        return {**REPLACES, "CheckpointLoaderSimple": "DPAdaptTinySDXLCheckpointLoader"}
    return dict(REPLACES)
