"""Cost of one universal-guidance step relative to one plain sampler step, both modes.

    python bench/bench_guidance.py [--size tiny|sd15] [--resolution PX] [--steps 4] [--repeats 3]
                                   [--arms plain,x0,x0/clip,full,full/clip]

The arms run side by side in one process on the same model, latent, prompt and seed, in
turns (plain, x0, full, plain, x0, full, ...), through the Universal Guidance Sampler node:
- "plain": guidance strength 0, i.e. ComfyUI's own sampling (the hook returns at once);
- "x0": gradient on the predicted clean latent only (decode + CLIP vision, forward+backward);
- "full": gradient through the diffusion model as in the paper (one more model forward with
  autograd, its backward, plus decode + CLIP vision forward+backward);
- "x0/clip", "full/clip": the same with ``decode_size="clip"`` (the latent resized so that
  the decoded image is CLIP's input size before decoding).
Reported: median seconds per sampler step of each arm and the ratios to "plain".

``--size tiny`` (default without a GPU): the tiny in-code SD1.x model, VAE and CLIP vision.
``--size sd15`` (default with a CUDA GPU): random-weight components of real sizes: the SD1.5
UNet, the SD VAE (128-channel blocks) and a CLIP ViT-L/14 vision tower at 224 px; 512 px
images on a GPU, set ``--resolution`` lower on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _setup import SD15_UNET, SD_VAE_DDCONFIG, bootstrap_comfyui

VIT_L14 = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "torch_dtype": "float32",
}
ARMS = ("plain", "x0", "x0/clip", "full", "full/clip")


def _bootstrap(cuda: bool):
    return bootstrap_comfyui(cuda, prefix="bench_guidance_")


def _sd_components(scratch: Path):
    import comfy.clip_vision
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from comfyui_dp_adapt.nodes import tiny_models

    model = tiny_models.build_tiny_model(unet_overrides=SD15_UNET)
    clip = tiny_models.build_tiny_clip(
        text_overrides={"hidden_size": 768, "projection_dim": 768, "num_attention_heads": 12}
    )
    with torch.inference_mode():
        config = {"params": {"ddconfig": dict(SD_VAE_DDCONFIG), "embed_dim": 4}}
        weights = AutoencoderKL(**config["params"])
        tiny_models.fill_deterministically(weights, 2)
        vae = comfy.sd.VAE(sd=weights.state_dict(), config=config)
        path = scratch / "vit_l14.json"
        path.write_text(json.dumps(VIT_L14))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
        tiny_models.fill_deterministically(clip_vision.model, 3)
    return model, clip, vae, clip_vision


def _tiny_components():
    from comfyui_dp_adapt.nodes import tiny_models

    return (
        tiny_models.build_tiny_model(),
        tiny_models.build_tiny_clip(),
        tiny_models.build_tiny_vae(),
        tiny_models.build_tiny_clip_vision(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from " + str(ARMS))
    args = parser.parse_args()
    arms = ["plain"] + [a for a in args.arms.split(",") if a != "plain"]
    if not set(arms) <= set(ARMS):
        parser.error(f"--arms: choose from {', '.join(ARMS)}")

    import torch

    cuda = torch.cuda.is_available()
    size = args.size or ("sd15" if cuda else "tiny")
    resolution = args.resolution or (512 if size == "sd15" else 64)
    scratch = _bootstrap(cuda)
    import comfy.model_management

    from comfyui_dp_adapt.dp.guidance import ClipTarget
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.guidance_sampler import UniversalGuidanceSamplerNode

    model, clip, vae, clip_vision = (
        _sd_components(scratch) if size == "sd15" else _tiny_components()
    )
    with torch.inference_mode():
        tokens = clip.tokenize("a lighthouse on a cliff, oil painting")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        uncond, upooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[uncond, {"pooled_output": upooled}]]
    width = comfy_compat.clip_vision_width(clip_vision)
    direction = torch.randn(width, generator=torch.Generator().manual_seed(0))
    target = ClipTarget(
        embedding=torch.nn.functional.normalize(direction, dim=0),
        event=None,
        epsilon=1.0,
        delta=1e-5,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        declared_dataset_size=100,
    )
    latent = {"samples": torch.zeros(args.batch, 4, resolution // 8, resolution // 8)}
    node = UniversalGuidanceSamplerNode()
    device = comfy.model_management.get_torch_device()

    def run(arm: str) -> float:
        mode, _, decode_size = arm.partition("/")
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            node.sample(
                model=model,
                positive=positive,
                negative=negative,
                latent_image=latent,
                vae=vae,
                clip_vision=clip_vision,
                target=target,
                seed=0,
                steps=args.steps,
                cfg=args.cfg,
                sampler_name="euler",
                scheduler="normal",
                denoise=1.0,
                guidance_strength=0.0 if arm == "plain" else 100.0,
                self_recurrence=0,
                mode="x0" if arm == "plain" else mode,
                decode_size=decode_size or "full",
            )
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / args.steps

    for arm in arms:  # warm-up: model loading, allocator, kernels
        run(arm)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm in arms:
            times[arm].append(run(arm))
    median = {arm: statistics.median(values) for arm, values in times.items()}
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {name} ({device}); components: {size}; {resolution} px; batch {args.batch}; "
        f"cfg {args.cfg}; euler, {args.steps} steps; median of {args.repeats} runs per arm"
    )
    print(f"{'arm':<10} {'s/step':>10} {'x plain':>9}")
    for arm in arms:
        print(f"{arm:<10} {median[arm]:>10.4f} {median[arm] / median['plain']:>9.2f}")
    ratios = ", ".join(f"{arm} {median[arm] / median['plain']:.2f}x" for arm in arms[1:])
    print(f"guided step / plain step: {ratios}")


if __name__ == "__main__":
    main()
