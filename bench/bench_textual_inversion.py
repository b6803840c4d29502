"""Per-image textual inversion the paper's way vs this pack's batched trainer, side by side.

    python bench/bench_textual_inversion.py [--images 8] [--steps 10] [--batch 8]

Both arms train the same images for the same number of steps on the same model:
- "separate": one independent training run per image (a fresh optimiser and one image per
  forward/backward), as the paper describes DPAgg-TI;
- "batched": this pack's trainer, ``--batch`` images per forward/backward pass, inside its
  memory-lean UNet passes (fused attention, block checkpointing: nodes/lean_training.py);
- "batched-sdpa": the same with fused attention but no checkpointing;
- "batched-plain": the same trainer without the lean passes (ComfyUI's own attention, every
  activation kept), to show what they save;
- "dpsgd": the DP-SGD baseline (one shared token, ``--steps`` noisy steps, every image's
  per-example gradient at every step in passes of ``--batch`` rows, noise calibrated to
  epsilon 1, delta 1e-5 at q = 0.5), i.e. the same images, steps and budget.
The first two produce the same embeddings up to float rounding (tests/dp/test_inversion.py).
Reported: image-steps per second, the ratio, and peak memory of each arm (each arm runs in
its own process so peaks do not mix). ``--model sd15`` loads an SD1.5-format single-file
checkpoint with random weights at SD1.5's real sizes (written once, then loaded through
ComfyUI's own checkpoint loader in every arm, as Load Checkpoint does; ``--checkpoint``
takes a real one instead) (the default with a CUDA GPU, at 512 px), ``--model tiny`` the
tiny in-code SD1.x model (the default on a CPU, at 64 px); ``--resolution`` overrides the
pixel size, ``--arms`` picks arms, ``--precision bf16`` trains every lean arm under bfloat16
autocast (``nodes/training_precision.py``; default ``model``, the model's own dtype).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _setup import bootstrap_comfyui, peak_rss, reset_peak_rss

ARMS = ("separate", "batched", "batched-sdpa", "batched-plain", "dpsgd")


def _components(device_is_cuda: bool, size: str, checkpoint: str | None):
    bootstrap_comfyui(device_is_cuda, prefix="bench_ti_")
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    if checkpoint:  # what Load Checkpoint does with a single-file checkpoint
        import comfy.sd

        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                checkpoint, output_vae=True, output_clip=True
            )[:3]
    else:
        model = tiny_models.build_tiny_model()
        clip = tiny_models.build_tiny_clip()
        vae = tiny_models.build_tiny_vae()
    comfy_compat.load_models([model, clip.patcher])
    return model, clip, vae


def _write_random_sd15(path: str) -> None:
    bootstrap_comfyui(False, prefix="bench_ti_write_")
    from comfyui_dp_adapt.nodes import tiny_models

    tiny_models.write_sd15_checkpoint(path)


def run_arm(
    arm: str,
    images: int,
    steps: int,
    batch: int,
    size: str,
    resolution: int,
    checkpoint: str | None = None,
    precision: str = "model",
) -> dict:
    """One arm in this process; returns its measurements."""
    import contextlib

    cuda = torch.cuda.is_available()
    model, clip, vae = _components(cuda, size, checkpoint)
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
    lean = contextlib.nullcontext(im.make_denoise_loss(model))
    if arm != "batched-plain":
        lean = im.training_passes(
            model, checkpoint_blocks=arm != "batched-sdpa", precision=precision
        )
    with torch.inference_mode(False), torch.enable_grad(), lean as denoise_loss:
        text_forward = im.make_text_forward(clip, family)

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
        else:
            reset_peak_rss()
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
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {
        "arm": arm,
        "model": size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "resolution": resolution,
        "precision": precision,
        "image_steps_per_s": images * steps / elapsed,
        "seconds": elapsed,
        "peak_memory_mib": peak / 2**20,
        "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS while training",
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", choices=["tiny", "sd15"], default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated, of " + ", ".join(ARMS)
    )
    parser.add_argument(
        "--checkpoint",
        help="an SD1.x single-file checkpoint, loaded through ComfyUI's checkpoint loader "
        "(default with --model sd15: one with random weights at SD1.5's sizes, written once "
        "into a temporary folder)",
    )
    parser.add_argument("--precision", choices=["model", "bf16"], default="model")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        _write_random_sd15(args.write_checkpoint)
        return
    size = args.model or ("sd15" if torch.cuda.is_available() else "tiny")
    if args.checkpoint:
        size = "sd15"
    resolution = args.resolution or (512 if size == "sd15" else 64)
    if args.arm:
        measured = run_arm(
            args.arm,
            args.images,
            args.steps,
            args.batch,
            size,
            resolution,
            args.checkpoint,
            args.precision,
        )
        print(json.dumps(measured))
        return
    checkpoint = args.checkpoint
    if size == "sd15" and not checkpoint:
        scratch = tempfile.mkdtemp(prefix="bench_ti_checkpoint_")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        checkpoint = str(Path(scratch) / "sd15_random.safetensors")
        print("writing an SD1.5-format checkpoint with random weights ...", flush=True)
        subprocess.run([sys.executable, __file__, "--write-checkpoint", checkpoint], check=True)
    common = ["--images", str(args.images), "--steps", str(args.steps), "--batch", str(args.batch)]
    common += ["--model", size, "--resolution", str(resolution), "--precision", args.precision]
    common += ["--checkpoint", checkpoint] if checkpoint else []
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"bench_textual_inversion.py: FAILED: unknown arm(s) {unknown}")
    results = {}
    for arm in arms:
        print(f"running arm {arm} ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--arm", arm, *common],
            check=True,
            capture_output=True,
            text=True,
        )
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(
        f"device: {first['device']}, model {size}, {resolution} px, {args.images} images x "
        f"{args.steps} steps, batch {args.batch}, precision {args.precision}; "
        f"peak = {first['peak_kind']}"
    )
    print(f"{'arm':<14} {'image-steps/s':>14} {'seconds':>9} {'peak MiB':>10}")
    for row in results.values():
        print(
            f"{row['arm']:<14} {row['image_steps_per_s']:>14.2f} {row['seconds']:>9.2f} "
            f"{row['peak_memory_mib']:>10.0f}"
        )

    def ratio(a: str, b: str, label: str) -> None:
        if a in results and b in results:
            x, y = results[a], results[b]
            print(
                f"{label}: speed {x['image_steps_per_s'] / y['image_steps_per_s']:.2f}x, "
                f"peak memory {x['peak_memory_mib'] / y['peak_memory_mib']:.2f}x"
            )

    ratio("batched", "separate", "batched / separate")
    ratio("batched", "batched-plain", "lean passes / plain passes")
    ratio("batched-sdpa", "batched-plain", "fused attention only / plain passes")
    ratio("dpsgd", "batched", "DP-SGD / DPAgg-TI (batched), same images, steps and budget")


if __name__ == "__main__":
    main()
