"""Peak resident memory of textual-inversion passes on an SD1.5-shaped UNet (run as its own
process by tests/nodes/test_training_memory.py, so peaks do not mix).

    python memory_probe.py lean|plain

Prints one JSON line: the process's peak RSS after setting up (MiB) and after the passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

# SD1.5's UNet layout (4 levels, 2 res blocks each, attention at the first three, 8 heads)
# at a fifth of its width, with the tiny text encoder's context width.
SHAPE = {
    "model_channels": 64,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}
PIXELS, ROWS, PASSES = 256, 4, 2


def peak_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a
    # probe started by a large pytest process would report the parent's peak.
    from _setup import peak_rss

    return peak_rss() / 2**20


def main(arm: str) -> None:
    import contextlib

    import torch
    from _setup import bootstrap_comfyui

    bootstrap_comfyui(False, prefix="dp_adapt_memory_")
    from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes import inversion_model as im

    model = tiny_models.build_tiny_model(unet_overrides=SHAPE)
    clip = tiny_models.build_tiny_clip()
    comfy_compat.load_models([model, clip.patcher])
    family = im.detect_family(model, clip)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:1], 1)
    initial = im.token_vectors(clip, family, "painting")[:1]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(ROWS, 4, PIXELS // 8, PIXELS // 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.full((ROWS,), 500.0)
    passes = (
        im.training_passes(model)
        if arm == "lean"
        else contextlib.nullcontext(im.make_denoise_loss(model))
    )
    with torch.inference_mode(False), torch.enable_grad(), passes as loss:
        text_forward = im.make_text_forward(clip, family)
        vectors = initial.repeat(ROWS, 1).requires_grad_(True)
        ids, mask = prompts.ids.repeat(ROWS, 1), prompts.mask.repeat(ROWS, 1)
        before = peak_mib()
        for _ in range(PASSES):
            context = text_forward(ids, mask, vectors)
            loss(latents, context, timesteps, noise).sum().backward()
    print(json.dumps({"arm": arm, "setup_peak_mib": before, "peak_mib": peak_mib()}))


if __name__ == "__main__":
    main(sys.argv[1])
