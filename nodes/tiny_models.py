"""Tiny ComfyUI-native Stable Diffusion components built in code, for tests and the demo.

No download and no file: every component is a real ComfyUI object (``ModelPatcher`` around
an SD1.x ``BaseModel``, ``comfy.sd.CLIP`` with ComfyUI's bundled CLIP tokenizer,
``comfy.sd.VAE``, ``comfy.clip_vision.ClipVisionModel``) with small widths and weights
filled from a fixed seed. They behave like the real thing at a fraction of the cost (a whole
sampling pass well under a second on 2 CPU cores), the way diffusers tests use "dummy
components". ComfyUI layers skip weight initialisation, so every tensor is filled here.

Builders run under ``torch.inference_mode()`` like ComfyUI's loader nodes (the executor runs
every node in inference mode), so the weights are inference tensors exactly as in a real
workflow, and code that trains through them meets the same constraints.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

TEXT_WIDTH = 32
"""Width of the tiny text encoder (and the UNet's cross-attention context)."""
SDXL_G_WIDTH = 48
"""Width of the tiny SDXL's second text encoder (OpenCLIP-G's place; CLIP-L's is ``TEXT_WIDTH``)."""
SDXL_SIZE_EMBEDDING = 6 * 256
"""SDXL's size/crop conditioning: six 256-wide timestep embeddings (ComfyUI ``model_base.SDXL``)."""
VISION_PROJECTION = 32
"""Width of the tiny CLIP-vision image embedding."""

# Stable Diffusion 1.5's real sizes (UNet, CLIP-L text encoder, VAE), for random-weight
# models at full size: benchmarks and the single-file checkpoint of ``write_sd15_checkpoint``.
SD15_UNET = {
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": 768,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

_TINY_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": TEXT_WIDTH,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "num_head_channels": -1,
}

# SDXL's layout at tiny widths: no attention at the first level, linear projections in the
# transformers, the pooled text embedding plus the size embedding as ADM input (label_emb).
_TINY_SDXL_UNET_CONFIG = {
    **_TINY_UNET_CONFIG,
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "context_dim": TEXT_WIDTH + SDXL_G_WIDTH,
    "use_linear_in_transformer": True,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_G_WIDTH + SDXL_SIZE_EMBEDDING,
}

_TINY_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": TEXT_WIDTH,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": TEXT_WIDTH,
    "torch_dtype": "float32",
    # ComfyUI's bundled sd1_tokenizer produces ids up to 49407.
    "vocab_size": 49408,
}

_TINY_VISION_CONFIG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    # OLD ComfyUI always preprocesses to 224 px.
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 4,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 32,
    "projection_dim": VISION_PROJECTION,
    "torch_dtype": "float32",
}

TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    # Four levels keep ComfyUI's fixed latent downscale ratio of 8; widths are multiples
    # of 32 because of GroupNorm(32).
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _config_digest(config: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _config_file(name: str, config: dict) -> str:
    """Write a config where ComfyUI can open it (OLD takes only JSON paths)."""
    directory = Path(tempfile.gettempdir()) / "comfyui_dp_adapt_tiny_configs"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    text = json.dumps(config, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{id(config)}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


@torch.no_grad()
def fill_deterministically(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and floating buffer of ``module`` from ``seed``.

    Norm scales are 1, biases 0, other weights N(0, 1/fan_in) so activations keep unit
    scale through the small networks.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        if not torch.is_floating_point(tensor):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            value = torch.ones(tensor.shape)
        elif leaf == "bias" or tensor.dim() == 0:
            value = torch.zeros(tensor.shape)
        else:
            fan_in = max(1, math.prod(tensor.shape[1:])) if tensor.dim() > 1 else tensor.shape[0]
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        tensor.data.copy_(value.to(dtype=tensor.dtype))


TINY_FAMILIES = ("sd1", "sd2", "sdxl")


@torch.inference_mode()
def build_tiny_model(
    seed: int = 0,
    unet_overrides: dict | None = None,
    family: str = "sd1",
    num_heads: int | None = None,
):
    """An SD1.x-style MODEL (``ModelPatcher``) with a ~1M-parameter UNet, eps prediction.

    ``family="sd2"`` gives ComfyUI's SD2.x model class (linear projections in the
    transformers, as SD2 has); ``family="sdxl"`` ComfyUI's SDXL model class (two-encoder
    context, pooled text + size conditioning through its ADM input); ``unet_overrides`` changes the UNet config (benchmarks use it
    for SD1.5-sized widths); ``num_heads`` defaults to 4 (8 with overrides, as SD1.5).
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got family={family!r}.")
    base_config = _TINY_SDXL_UNET_CONFIG if family == "sdxl" else _TINY_UNET_CONFIG
    unet = {**base_config, **(unet_overrides or {})}
    if family == "sd2":
        config = comfy.supported_models.SD20({**unet, "use_linear_in_transformer": True})
    elif family == "sdxl":
        config = comfy.supported_models.SDXL(unet)
    else:
        config = comfy.supported_models.SD15(unet)
    # SD15.__init__ forces num_heads=8 / num_head_channels=-1.
    config.unet_config["num_heads"] = num_heads or (8 if unet_overrides else 4)
    config.unet_config["num_head_channels"] = -1
    config.set_inference_dtype(torch.float32, None)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    # SD2's model class picks v-prediction (as SD2.x-768-v) from this weight's spread.
    probe = (
        {"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.arange(8.0)}
        if family == "sd2"
        else {}
    )
    base = config.get_model(probe, "", device=offload_device)
    fill_deterministically(base.diffusion_model, seed)
    # A random UNet predicts noise far larger than unit scale and sampling diverges; shrink
    # the last convolution so the eps prediction has roughly unit scale like a trained one.
    base.diffusion_model.out[-1].weight.mul_(0.05)
    base.diffusion_model.requires_grad_(False)
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=load_device, offload_device=offload_device
    )


@torch.inference_mode()
def build_tiny_clip(
    embedding_directory: str | list[str] | None = None,
    seed: int = 1,
    text_overrides: dict | None = None,
    family: str = "sd1",
):
    """A CLIP (text encoder + ComfyUI's bundled SD1 tokenizer) of width ``TEXT_WIDTH``.

    ``family="sd2"`` builds it the way ComfyUI's SD2 text encoder is set up (encoder named
    ``clip_h``, penultimate layer, padding with token 0) from ComfyUI's generic CLIP classes;
    ``text_overrides`` changes the text config (benchmarks use SD1.5's CLIP-L sizes).
    ``family="sdxl"``: ComfyUI's SDXL CLIP (``clip_l`` and ``clip_g``, see
    ``_tiny_sdxl_target``).
    """
    import comfy.sd
    import comfy.sd1_clip as sd1_clip

    if family == "sdxl":
        clip = comfy.sd.CLIP(_tiny_sdxl_target(), embedding_directory=embedding_directory)
        fill_deterministically(clip.cond_stage_model, seed)
        return clip

    sd2 = family == "sd2"
    # SD2 reads the penultimate layer, which needs more than two layers.
    text_config = {
        **_TINY_TEXT_CONFIG,
        **({"num_hidden_layers": 3} if sd2 else {}),
        **(text_overrides or {}),
    }
    config_name = "clip_text_" + _config_digest(text_config)

    name = "h" if sd2 else "l"
    tokenizer_options = {"pad_with_end": False, "embedding_key": "clip_h"} if sd2 else {}

    class TinyTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, **kwargs):
            def make_tokenizer(embedding_directory=None, **inner):
                return sd1_clip.SDTokenizer(
                    embedding_directory=embedding_directory,
                    embedding_size=text_config["hidden_size"],
                    **tokenizer_options,
                    **inner,
                )

            super().__init__(
                embedding_directory=embedding_directory,
                clip_name=name,
                tokenizer=make_tokenizer,
                **kwargs,
            )

    class Target:
        clip = sd1_clip.SD1ClipModel
        tokenizer = TinyTokenizer
        params = {
            "clip_model": sd1_clip.SDClipModel,
            "textmodel_json_config": _config_file(config_name, text_config),
            "clip_name": name,
        }
        if sd2:  # ComfyUI's SD2ClipHModel: penultimate layer, pad token 0
            params.update(
                layer="hidden",
                layer_idx=-2,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
            )

    clip = comfy.sd.CLIP(Target, embedding_directory=embedding_directory)
    fill_deterministically(clip.cond_stage_model, seed)
    return clip


def _tiny_sdxl_target():
    """ComfyUI's SDXL text side at tiny widths: its ``SDXLClipModel`` and ``SDXLTokenizer``
    with only the sizes changed (their constructors hard-code the real configs). As in
    ``comfy/sdxl_clip.py``: CLIP-L and CLIP-G both read the penultimate layer without the
    final norm, CLIP-G pads with token 0 and gives the projected pooled output, embedding
    files are read under the keys ``clip_l`` and ``clip_g``."""
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip

    configs = {}
    for key, width in (("l", TEXT_WIDTH), ("g", SDXL_G_WIDTH)):
        text_config = {
            **_TINY_TEXT_CONFIG,
            "hidden_size": width,
            "projection_dim": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 3,
        }
        configs[key] = _config_file("clip_text_" + _config_digest(text_config), text_config)

    class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            torch.nn.Module.__init__(self)
            self.clip_l = sd1_clip.SDClipModel(
                layer="hidden",
                layer_idx=-2,
                device=device,
                dtype=dtype,
                layer_norm_hidden_state=False,
                textmodel_json_config=configs["l"],
                **kwargs,
            )
            self.clip_g = sd1_clip.SDClipModel(
                layer="hidden",
                layer_idx=-2,
                device=device,
                dtype=dtype,
                layer_norm_hidden_state=False,
                textmodel_json_config=configs["g"],
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True,
                **kwargs,
            )
            self.dtypes = {dtype}

    class TinySDXLTokenizer(sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, **kwargs):
            self.clip_l = sd1_clip.SDTokenizer(
                embedding_directory=embedding_directory, embedding_size=TEXT_WIDTH, **kwargs
            )
            self.clip_g = sd1_clip.SDTokenizer(
                embedding_directory=embedding_directory,
                embedding_size=SDXL_G_WIDTH,
                embedding_key="clip_g",
                pad_with_end=False,
                **kwargs,
            )

    class Target:
        clip = TinySDXLClipModel
        tokenizer = TinySDXLTokenizer
        params: dict = {}

    return Target


@torch.inference_mode()
def build_tiny_vae(seed: int = 2, ddconfig: dict | None = None, state_dict: dict | None = None):
    """A VAE (AutoencoderKL, 4 latent channels, downscale 8) with 32-channel blocks.

    ``ddconfig`` replaces the block layout; ``state_dict`` gives trained weights instead of
    seeded ones.
    """
    import comfy.sd

    config = {"params": {"ddconfig": dict(ddconfig or TINY_VAE_DDCONFIG), "embed_dim": 4}}
    if state_dict is None:
        weights = vae_module(config["params"]["ddconfig"])
        fill_deterministically(weights, seed)
        state_dict = weights.state_dict()
    return comfy.sd.VAE(sd=state_dict, config=config)


def vae_module(ddconfig: dict) -> torch.nn.Module:
    """ComfyUI's AutoencoderKL with ``ddconfig`` and 4 latent channels (weights unset)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=4)


@torch.inference_mode()
def build_tiny_clip_vision(seed: int = 3, vision_overrides: dict | None = None):
    """A CLIP_VISION model (ViT, 224 px input, patch 32) with a ``VISION_PROJECTION`` head.

    ``vision_overrides`` changes the vision config (the demo model's is wider).
    """
    import comfy.clip_vision

    config = {**_TINY_VISION_CONFIG, **(vision_overrides or {})}
    name = "tiny_clip_vision_" + _config_digest(config)
    model = comfy.clip_vision.ClipVisionModel(_config_file(name, config))
    fill_deterministically(model.model, seed)
    return model


def write_sd15_checkpoint(path, *, seed: int = 0, text_key_prefix: str = "text_model.") -> None:
    """Write a single-file SD1.5 checkpoint with random weights at SD1.5's real sizes.

    The original key layout (``model.diffusion_model.*``, ``cond_stage_model.transformer.
    text_model.*``, ``first_stage_model.*``) as ComfyUI's own ``state_dict_for_saving`` writes
    it, in fp16 (as the common 2 GB release files), so ComfyUI's checkpoint loader detects
    and loads it like a downloaded SD1.5. ``text_key_prefix=""`` writes the text encoder's
    keys without ``text_model.``, as transformers 5 saves them.
    """
    from safetensors.torch import save_file

    model = build_tiny_model(seed=seed, unet_overrides=SD15_UNET)
    clip = build_tiny_clip(seed=seed + 1, text_overrides=SD15_TEXT)
    vae = build_tiny_vae(seed=seed + 2, ddconfig=SD_VAE_DDCONFIG)
    with torch.inference_mode():
        state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
        written = {}
        for key, tensor in state.items():
            if key.startswith("cond_stage_model.transformer.text_model."):
                key = key.replace("transformer.text_model.", "transformer." + text_key_prefix, 1)
            half = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            written[key] = half.contiguous().clone()
    del model, clip, vae, state
    save_file(written, str(path), metadata={"format": "pt"})
