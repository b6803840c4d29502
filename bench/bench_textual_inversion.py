"""Per-image textual inversion the paper's way vs this pack's batched trainer, side by side.

    python bench/bench_textual_inversion.py [--images 8] [--steps 10] [--batch 8]

Both arms train the same images for the same number of steps on the same model:
- "separate": one independent training run per image (a fresh optimiser and one image per
  forward/backward), as the paper describes DPAgg-TI;
- "batched": this pack's trainer, ``--batch`` images per forward/backward pass;
- "dpsgd": the DP-SGD baseline (one shared token, ``--steps`` noisy steps, every image's
  per-example gradient at every step in passes of ``--batch`` rows, noise calibrated to
  epsilon 1, delta 1e-5 at q = 0.5), i.e. the same images, steps and budget.
The first two produce the same embeddings up to float rounding (tests/dp/test_inversion.py).
Reported: image-steps per second, the ratio, and peak memory of each arm (each arm runs in
its own process so peaks do not mix). On the CPU the model is the tiny in-code SD1.x model at
64 px; with a CUDA GPU it is an SD1.5-sized UNet with random weights at 512 px.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _setup import SD15_TEXT, SD15_UNET, bootstrap_comfyui


def _components(device_is_cuda: bool):
    bootstrap_comfyui(device_is_cuda, prefix="bench_ti_")
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    if device_is_cuda:
        model = tiny_models.build_tiny_model(unet_overrides=SD15_UNET)
        clip = tiny_models.build_tiny_clip(text_overrides=SD15_TEXT)
        resolution = 512
    else:
        model = tiny_models.build_tiny_model()
        clip = tiny_models.build_tiny_clip()
        resolution = 64
    vae = tiny_models.build_tiny_vae()
    comfy_compat.load_models([model, clip.patcher])
    return model, clip, vae, resolution


def run_arm(arm: str, images: int, steps: int, batch: int) -> dict:
    """One arm in this process; returns its measurements."""
    import torch

    cuda = torch.cuda.is_available()
    model, clip, vae, resolution = _components(cuda)
    from comfyui_dp_adapt.dp.inversion import InversionConfig, train_per_image_embeddings
    from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes import inversion_model as im

    family = im.detect_family(model, clip)
    pixels = torch.rand(
        images, resolution, resolution, 3, generator=torch.Generator().manual_seed(0)
    )
    latents = comfy_compat.encode_latents(model, vae, pixels)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES, 1)
    initial = im.token_vectors(clip, family, "painting")
    seeds = list(range(images))
    with torch.inference_mode(False), torch.enable_grad():
        text_forward = im.make_text_forward(clip, family)
        denoise_loss = im.make_denoise_loss(model)

        def train(lat, seed_list, per_pass):
            config = InversionConfig(steps=steps, learning_rate=0.005, images_per_batch=per_pass)
            return train_per_image_embeddings(
                lat,
                initial=initial,
                prompts=prompts,
                config=config,
                seeds=seed_list,
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )

        train(latents[:1], seeds[:1], 1)  # warm-up (allocator, kernels)
        z = _dpsgd_noise(steps) if arm == "dpsgd" else None  # calibration is not timed
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if arm == "separate":
            for i in range(images):
                train(latents[i : i + 1], seeds[i : i + 1], 1)
        elif arm == "dpsgd":
            _train_dpsgd(latents, initial, prompts, text_forward, denoise_loss, steps, batch, z)
        else:
            train(latents, seeds, batch)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    return {
        "arm": arm,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "resolution": resolution,
        "image_steps_per_s": images * steps / elapsed,
        "seconds": elapsed,
        "peak_memory_mib": peak / 2**20,
        "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
    }


def _dpsgd_noise(steps: int) -> float:
    from comfyui_dp_adapt.dp.accounting import calibrate_dpsgd_noise_multiplier

    return calibrate_dpsgd_noise_multiplier(
        epsilon=1.0, delta=1e-5, sampling_rate=0.5, steps=steps
    ).noise_multiplier


def _train_dpsgd(latents, initial, prompts, text_forward, denoise_loss, steps, batch, z):
    from comfyui_dp_adapt.dp.dpsgd import DpSgdConfig, train_shared_embedding_dpsgd

    return train_shared_embedding_dpsgd(
        latents,
        initial=initial,
        prompts=prompts,
        config=DpSgdConfig(steps=steps, learning_rate=0.005, images_per_batch=batch),
        included=[True] * latents.shape[0],
        sampling_rate=0.5,
        clip_norm=0.5,
        noise_multiplier=z,
        declared_dataset_size=latents.shape[0],
        text_forward=text_forward,
        denoise_loss=denoise_loss,
    )


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--arm", choices=["separate", "batched", "dpsgd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.images, args.steps, args.batch)))
        return
    results = {}
    for arm in ("separate", "batched", "dpsgd"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--arm",
                arm,
                "--images",
                str(args.images),
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    sep, bat, sgd = results["separate"], results["batched"], results["dpsgd"]
    print(
        f"device: {sep['device']}, {sep['resolution']} px, {args.images} images x {args.steps} steps, "
        f"batch {args.batch}"
    )
    print(f"{'arm':<10} {'image-steps/s':>14} {'seconds':>9} {'peak MiB':>10}")
    for row in (sep, bat, sgd):
        print(
            f"{row['arm']:<10} {row['image_steps_per_s']:>14.2f} {row['seconds']:>9.2f} "
            f"{row['peak_memory_mib']:>10.0f}"
        )
    print(
        f"speed-up batched/separate: {bat['image_steps_per_s'] / sep['image_steps_per_s']:.2f}x; "
        f"memory ratio: {bat['peak_memory_mib'] / sep['peak_memory_mib']:.2f}x ({sep['peak_kind']})"
    )
    print(
        f"DP-SGD vs DPAgg-TI (batched), same images, steps and budget: "
        f"{sgd['seconds'] / bat['seconds']:.2f}x the time, "
        f"{sgd['peak_memory_mib'] / bat['peak_memory_mib']:.2f}x the peak memory"
    )


if __name__ == "__main__":
    main()
