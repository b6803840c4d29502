"""The paper's way (diffusers' stock ``textual_inversion.py``, one run per image) against this
pack's trainer, on the same SD1.5-sized files, side by side.

    pip install accelerate tensorboard      # what the stock script needs
    V=$(python -c "import diffusers; print(diffusers.__version__)")
    curl -L -o /tmp/textual_inversion.py \\
      https://raw.githubusercontent.com/huggingface/diffusers/v$V/examples/textual_inversion/textual_inversion.py
    python bench/bench_diffusers_script.py --script /tmp/textual_inversion.py \\
      [--images 2] [--steps 6] [--resolution 256] [--precisions fp32,bf16]

The script is diffusers' own example, fetched by you (it is not part of the diffusers wheel
and never part of this repository). This bench builds an SD1.5-sized diffusers folder with
random weights in a temporary folder (UNet, VAE, CLIP-L text encoder in the published
layout with ``text_model.`` keys, ComfyUI's bundled CLIP tokenizer, SD1.5's DDPM scheduler)
and runs both arms on it:

- "diffusers script": the stock script once per image (a folder holding that image), batch
  1, ``--steps`` steps each, as the paper trains DPAgg-TI;
- "pack": ComfyUI loads the same folder (its diffusers loader), encodes each image once and
  trains every image's embedding for ``--steps`` steps with this pack's trainer, all images
  in one pass, inside its memory-lean UNet passes.

Each arm runs at every precision of ``--precisions`` (default fp32): fp32 is the script's
``--mixed_precision no`` and the pack's ``precision=model`` (ComfyUI keeps an SD1.5 UNet in
fp32 on a CPU); bf16 is the script's ``--mixed_precision bf16`` (its UNet and VAE cast to
bfloat16) and the pack's ``precision=bf16`` (bfloat16 autocast, ``nodes/training_precision.py``).
On a GPU, ComfyUI already loads the UNet in fp16, so the pack's fp32 row is its default there.

Reported per arm: wall time of the whole arm (processes started, models loaded, images
encoded, trained: what a user waits for), the training time per image-step (the script's:
from the difference between runs of ``--steps`` steps and of 1 step; the pack's: its
training loop alone, after a one-step warm-up), and peak resident memory (peak GPU memory on CUDA). Then the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _setup import SD15_TEXT, SD15_UNET, bootstrap_comfyui, peak_rss, reset_peak_rss

PLACEHOLDER = "<dp-bench>"
PRECISIONS = ("fp32", "bf16")
INITIALIZER = "painting"
LEARNING_RATE = 0.005


def build_diffusers_folder(folder: Path, comfy_dir: Path) -> None:
    """An SD1.5-sized diffusers pipeline folder with random weights."""
    import diffusers
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64,
        block_out_channels=[SD15_UNET["model_channels"] * m for m in SD15_UNET["channel_mult"]],
        layers_per_block=2,
        cross_attention_dim=SD15_UNET["context_dim"],
        attention_head_dim=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            **SD15_TEXT, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        # SD1.5's 77 tokens: current ComfyUI's copy says 8192 (its own long-prompt handling),
        # which the script would pad every prompt to.
        str(comfy_dir / "comfy" / "sd1_tokenizer"),
        model_max_length=77,
    )
    scheduler = diffusers.DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)
    # The published SD1.5 layout keeps the "text_model." prefix that transformers 5 drops;
    # ComfyUI's text-encoder loader needs it (tests/nodes/test_text_encoder_files.py).
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    prefixed = {
        k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
    }
    save_file(prefixed, str(path), metadata={"format": "pt"})


def write_images(folder: Path, count: int, resolution: int) -> list[Path]:
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    paths = []
    for i in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).to(torch.uint8)
        one = folder / f"image_{i}"
        one.mkdir(parents=True)
        Image.fromarray(pixels.numpy()).save(one / "image.png")
        paths.append(one)
    return paths


# Runs the stock script as __main__ and writes that process's own peak RSS on exit. VmHWM,
# not getrusage(RUSAGE_CHILDREN): Linux carries ru_maxrss across fork and exec, so a child
# of this (large) bench process would report this process's peak as its own. The same read
# as _setup.peak_rss, written out because importing _setup would load torch and the pack
# into the measured process before the script starts.
PEAK_REPORTING_RUNNER = """
import atexit, resource, runpy, sys
report, script = sys.argv[1], sys.argv[2]
def write_peak():
    try:
        with open("/proc/self/status") as status:
            kib = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(report, "w") as handle:
        handle.write(str(kib))
atexit.register(write_peak)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(
    script: Path, model: Path, images: Path, steps: int, resolution: int, out: Path, precision: str
):
    """One run of the stock script; returns (wall seconds, peak RSS bytes of that process)."""
    peak_report = out.with_name(out.name + ".peak_kib")
    command = [
        sys.executable,
        "-c",
        PEAK_REPORTING_RUNNER,
        str(peak_report),
        str(script),
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}",
        "--learnable_property=style",
        f"--placeholder_token={PLACEHOLDER}",
        f"--initializer_token={INITIALIZER}",
        f"--resolution={resolution}",
        "--train_batch_size=1",
        f"--max_train_steps={steps}",
        f"--learning_rate={LEARNING_RATE}",
        "--lr_warmup_steps=0",
        "--repeats=1",
        f"--mixed_precision={'bf16' if precision == 'bf16' else 'no'}",
        "--report_to=tensorboard",
        "--save_steps=1000000",
        "--checkpointing_steps=1000000",
        "--seed=0",
        f"--output_dir={out}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            "bench_diffusers_script.py: FAILED: the stock script failed:\n" + done.stderr[-3000:]
        )
    return elapsed, int(peak_report.read_text()) * 1024


def diffusers_arm(script, model, image_dirs, steps, resolution, scratch, precision) -> dict:
    def run(images, steps_to_run, out):
        return run_script(script, model, images, steps_to_run, resolution, out, precision)

    started = time.perf_counter()
    peak = 0
    for index, images in enumerate(image_dirs):
        _, run_peak = run(images, steps, scratch / f"out_{precision}_{index}")
        peak = max(peak, run_peak)
    wall = time.perf_counter() - started
    one_step, _ = run(image_dirs[0], 1, scratch / f"out_{precision}_one")
    many, _ = run(image_dirs[0], steps, scratch / f"out_{precision}_many")
    per_step = (many - one_step) / max(1, steps - 1)
    return {
        "arm": f"script {precision}",
        "wall_s": wall,
        "s_per_image_step": per_step,
        "peak": peak,
    }


def pack_arm(
    model: str, image_dirs: list[str], steps: int, resolution: int, precision: str
) -> dict:
    """Runs in its own process (``--pack-arm``): ComfyUI loads the diffusers folder."""
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    bootstrap_comfyui(cuda, prefix="bench_diffusers_pack_")
    import comfy.diffusers_load
    import numpy as np
    from PIL import Image

    from comfyui_dp_adapt.dp.inversion import InversionConfig, train_per_image_embeddings
    from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes import inversion_model as im

    with torch.inference_mode():
        unet, clip, vae = comfy.diffusers_load.load_diffusers(model)
        comfy_compat.load_models([unet, clip.patcher])
        pixels = (
            torch.stack(
                [
                    torch.from_numpy(np.asarray(Image.open(Path(d) / "image.png").convert("RGB")))
                    for d in image_dirs
                ]
            ).float()
            / 255.0
        )
        latents = torch.cat(
            [comfy_compat.encode_latents(unet, vae, pixels[i : i + 1]) for i in range(len(pixels))]
        )
    family = im.detect_family(unet, clip)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES, 1)
    initial = im.token_vectors(clip, family, INITIALIZER)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # the training's peak, as bench_textual_inversion.py reports it
    checkpoint = im.wants_checkpointing(latents.shape, len(image_dirs))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        im.training_passes(
            unet, checkpoint_blocks=checkpoint, precision="bf16" if precision == "bf16" else "model"
        ) as denoise_loss,
    ):
        text_forward = im.make_text_forward(clip, family)

        def train(rows, steps_to_run):
            return train_per_image_embeddings(
                rows,
                initial=initial,
                prompts=prompts,
                config=InversionConfig(
                    steps=steps_to_run,
                    learning_rate=LEARNING_RATE,
                    images_per_batch=rows.shape[0],
                ),
                seeds=list(range(rows.shape[0])),
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )

        latents = latents.clone()
        # Warm-up, as the script's per-step figure leaves out its first step: the first
        # pass builds the kernels' plans (oneDNN / cuDNN) for every layer shape.
        train(latents, 1)
        if cuda:
            torch.cuda.synchronize()
        training_started = time.perf_counter()
        train(latents, steps)
        if cuda:
            torch.cuda.synchronize()
        training = time.perf_counter() - training_started
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {
        "arm": f"pack {precision}",
        "training_s": training,
        "s_per_image_step": training / (len(image_dirs) * steps),
        "in_process_s": time.perf_counter() - started,
        "peak": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--script", type=Path, help="diffusers' examples/textual_inversion/textual_inversion.py"
    )
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--precisions", default="fp32", help="comma-separated, of " + ", ".join(PRECISIONS)
    )
    parser.add_argument("--pack-arm", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or set(precisions) - set(PRECISIONS):
        raise SystemExit(
            f"bench_diffusers_script.py: FAILED: --precisions takes {', '.join(PRECISIONS)}, "
            f"got {args.precisions!r}."
        )
    if args.pack_arm:
        model, *image_dirs = args.pack_arm
        print(json.dumps(pack_arm(model, image_dirs, args.steps, args.resolution, precisions[0])))
        return 0
    if args.script is None or not args.script.is_file():
        raise SystemExit(
            "bench_diffusers_script.py: FAILED: --script must point to diffusers' "
            "textual_inversion.py (see this file's docstring for where to get it)."
        )
    if args.steps < 2:
        raise SystemExit("bench_diffusers_script.py: FAILED: --steps must be at least 2.")
    scratch = Path(tempfile.mkdtemp(prefix="bench_diffusers_"))
    try:
        comfy_dir = bootstrap_comfyui(False, prefix="bench_diffusers_setup_") / "ComfyUI"
        model = scratch / "sd15_random_diffusers"
        print("building an SD1.5-sized diffusers folder with random weights ...", flush=True)
        build_diffusers_folder(model, comfy_dir)
        image_dirs = write_images(scratch / "images", args.images, args.resolution)
        rows = {}
        for precision in precisions:
            print(f"arm: diffusers script (one run per image), {precision} ...", flush=True)
            rows[f"script {precision}"] = diffusers_arm(
                args.script, model, image_dirs, args.steps, args.resolution, scratch, precision
            )
            print(f"arm: pack, {precision} ...", flush=True)
            rows[f"pack {precision}"] = _pack_subprocess(model, image_dirs, args, precision)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_table(rows, args, precisions)
    return 0


def _pack_subprocess(model: Path, image_dirs: list[Path], args, precision: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--steps",
            str(args.steps),
            "--resolution",
            str(args.resolution),
            "--precisions",
            precision,
            "--pack-arm",
            str(model),
            *map(str, image_dirs),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit("bench_diffusers_script.py: FAILED: pack arm:\n" + done.stderr[-3000:])
    pack = json.loads(done.stdout.strip().splitlines()[-1])
    pack["wall_s"] = time.perf_counter() - started
    return pack


def _print_table(rows: dict, args, precisions: list[str]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kind = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    print(
        f"device: {device}; SD1.5-sized random weights, {args.images} images x "
        f"{args.steps} steps at {args.resolution} px; {kind}"
    )
    print(f"{'arm':<18} {'wall s':>8} {'s / image-step':>15} {'peak MiB':>10}")
    for row in rows.values():
        print(
            f"{row['arm']:<18} {row['wall_s']:>8.1f} {row['s_per_image_step']:>15.2f} "
            f"{row['peak'] / 2**20:>10.0f}"
        )
    for script_precision in precisions:
        for pack_precision in precisions:
            stock = rows[f"script {script_precision}"]
            pack = rows[f"pack {pack_precision}"]
            print(
                f"pack {pack_precision} vs script {script_precision}: wall "
                f"{stock['wall_s'] / pack['wall_s']:.2f}x faster, training per image-step "
                f"{stock['s_per_image_step'] / pack['s_per_image_step']:.2f}x faster, "
                f"peak memory {pack['peak'] / stock['peak']:.2f}x"
            )


if __name__ == "__main__":
    sys.exit(main())
