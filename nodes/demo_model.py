"""The demo model: a small text-to-image model the project trained on its synthetic world.

One safetensors file (``demo/weights/dp_adapt_demo.safetensors``) holds a ComfyUI SD1.x
UNet, a CLIP text encoder (ComfyUI's bundled SD1 tokenizer), a VAE with ComfyUI's latent
downscale of 8 and a CLIP vision tower, all small, trained by ``demo/train_demo_model.py``
on the styles world of ``demo/world.py`` (64 px pictures). The node "DP Adapt Demo Model"
returns them as MODEL, CLIP, VAE and CLIP_VISION, so every shipped workflow runs on a model
that has learned something: a DP style token visibly carries the held-out "dotted" style.

Keys are stored in the layouts ComfyUI's own loaders read (the UNet's ``diffusion_model``
keys, the transformers CLIP text and vision layouts, the AutoencoderKL layout), under one
prefix per component, in float16 (loaded as float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import comfy_compat, tiny_models

WEIGHTS_FILE = (
    Path(__file__).resolve().parents[1] / "demo" / "weights" / "dp_adapt_demo.safetensors"
)
PREFIXES = {"unet": "unet.", "text": "text.", "vae": "vae.", "vision": "vision."}
IMAGE_SIZE = 64
TEXT_WIDTH = 64

UNET_CONFIG = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": TEXT_WIDTH,
}
UNET_HEADS = 4
TEXT_CONFIG = {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT_WIDTH,
}
VISION_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT_WIDTH,
}
# The tiny test VAE's layout, wider at the two lower levels (still ComfyUI's fixed latent
# downscale of 8: 64 px -> 8 x 8 latents).
VAE_DDCONFIG = {**tiny_models.TINY_VAE_DDCONFIG, "resolution": IMAGE_SIZE, "ch_mult": [1, 1, 2, 2]}


class DemoWeightsMissingError(RuntimeError):
    pass


def build_components(seed: int = 0):
    """MODEL, CLIP, VAE, CLIP_VISION of the demo architecture with seeded (untrained) weights."""
    embedding_dirs = [str(p) for p in comfy_compat.embeddings_directories()]
    model = tiny_models.build_tiny_model(
        seed=seed, unet_overrides=UNET_CONFIG, num_heads=UNET_HEADS
    )
    clip = tiny_models.build_tiny_clip(
        embedding_directory=embedding_dirs, seed=seed + 1, text_overrides=TEXT_CONFIG
    )
    vae = tiny_models.build_tiny_vae(seed=seed + 2, ddconfig=VAE_DDCONFIG)
    vision = tiny_models.build_tiny_clip_vision(seed=seed + 3, vision_overrides=VISION_CONFIG)
    return model, clip, vae, vision


def component_state_dicts(model, clip, vae, vision) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's weights in the layout ComfyUI's loaders read."""
    return {
        "unet": model.model.diffusion_model.state_dict(),
        "text": clip.cond_stage_model.clip_l.transformer.state_dict(),
        "vae": vae.first_stage_model.state_dict(),
        "vision": vision.model.state_dict(),
    }


def read_weights(path: Path = WEIGHTS_FILE) -> tuple[dict[str, dict], dict[str, str]]:
    """The per-component state dicts (float32) and the file's metadata."""
    from safetensors import safe_open

    if not path.is_file():
        raise DemoWeightsMissingError(
            f"the demo model's weights are missing ({path.name}); they ship in the "
            "repository under demo/weights/ (or rebuild them: python demo/train_demo_model.py)."
        )
    parts: dict[str, dict] = {name: {} for name in PREFIXES}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            for name, prefix in PREFIXES.items():
                if key.startswith(prefix):
                    parts[name][key[len(prefix) :]] = handle.get_tensor(key).float()
                    break
    return parts, metadata


@torch.inference_mode()
def load_demo_model(path: Path = WEIGHTS_FILE):
    """The trained MODEL, CLIP, VAE and CLIP_VISION, as ComfyUI objects."""
    parts, _ = read_weights(path)
    model, clip, _, vision = build_components()
    _load_exactly(model.model.diffusion_model, parts["unet"], "UNet")
    _load_exactly(clip.cond_stage_model.clip_l.transformer, parts["text"], "text encoder")
    _load_exactly(vision.model, parts["vision"], "CLIP vision")
    vae = tiny_models.build_tiny_vae(ddconfig=VAE_DDCONFIG, state_dict=parts["vae"])
    return model, clip, vae, vision


def _load_exactly(module: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Position-id buffers are rebuilt by the module itself in some ComfyUI versions.
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise DemoWeightsMissingError(
            f"the demo {what} weights do not fit this ComfyUI's model: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}."
        )


def weights_metadata(path: Path = WEIGHTS_FILE) -> dict:
    """The training record stored in the file (seed, steps, positive control)."""
    _, metadata = read_weights(path)
    return json.loads(metadata.get("dp_adapt.training", "{}"))


class DemoModelLoader:
    """MODEL, CLIP, VAE and CLIP_VISION of the project's demo model (no download)."""

    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    RETURN_NAMES = ("model", "clip", "vae", "clip_vision")
    FUNCTION = "load"
    DESCRIPTION = (
        "A small text-to-image model trained by the project on its synthetic styles world "
        "(64 px pictograms: circle/square/triangle/diamond, six colours, styles solid, "
        "striped, checkered, outlined, gradient; it can also draw a 'dotted' style and a "
        "'star', but those words were erased from its text encoder, so no prompt asks for "
        "them). "
        "Use it to try the DP nodes without downloading a checkpoint; sample at 64 x 64."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return load_demo_model()


NODE_CLASS_MAPPINGS = {"DPAdaptDemoModel": DemoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptDemoModel": "DP Adapt Demo Model"}
