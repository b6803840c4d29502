"""Does universal guidance move the demo model's pictures to a style? ``python bench/guidance_control.py``.

A control for DP universal guidance (docs/privacy.md §5) on the project's demo model: for
prompts that name no style (whose unguided pictures spread over all six styles of the demo
world, so the target style is not their default), it samples with the pack's Universal
Guidance Sampler node inside an in-process ComfyUI, (a) unguided (strength 0, the same node,
seeds and prompts) and (b) guided towards a target CLIP image embedding, and reports the
fraction of pictures the project's style classifier calls the target style.

``--sweep`` (default): the target is the EXACT (non-private) mean CLIP embedding of renders
of a PUBLIC proxy style, a training style ("outlined"); it sweeps guidance strength, its
schedule over steps, self-recurrence and augmented views. Writes ``results/guidance_sweep.json``, a ``.txt`` table and a ``.png`` contact
sheet (look at the pictures before trusting a number: the classifier can be fooled by
guidance that paints textures without drawing the shape).

``--held-out``: with settings chosen on the proxy (``--setting``), the held-out "dotted"
style: the exact mean of dotted renders vs unguided, and DP targets (n = 100 pictures,
epsilon = 8, delta = 1e-5, several independent releases of mechanism M1 with OpenDP noise)
vs unguided. Writes ``results/guidance_control.json`` / ``.txt`` / ``.png``.

Sampling settings are those of every demo measurement (``demo/evaluation.py``): euler,
normal schedule, 20 steps, CFG 3, 64 px.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from reproduce_paper import (  # noqa: E402
    DELTA,
    HELD_OUT,
    World,
    dp_target,
    exact_target,
    guided_samples,
    interval,
    log,
)

# The public proxy: a training style that the style-less prompts rarely draw unguided, so
# that a rise is guidance's doing ("striped", the proxy of the TI bounds, is among the
# styles those prompts draw most on the v2 demo model).
PROXY_STYLE = "outlined"
PROMPTS = 6  # "a {colour} {subject}", no style word
PER_PROMPT = 2
TARGET_PICTURES = 100
DP_EPSILON = 8.0
DP_RELEASES = 2


@dataclass(frozen=True)
class Setting:
    """The node's guidance inputs for one arm (strength 0 is the unguided arm)."""

    guidance_strength: float
    mode: str = "x0"
    self_recurrence: int = 0
    decode_size: str = "full"
    schedule: str = "sigma^2"
    views: int = 1

    @property
    def label(self) -> str:
        if self.guidance_strength == 0:
            return "unguided"
        return (
            f"{self.schedule} s={self.guidance_strength:g} {self.mode} "
            f"k={self.self_recurrence} views={self.views}"
        )


UNGUIDED = Setting(guidance_strength=0.0)
# decode_size is left out: at 64 px the latents (8 x 8) are already below CLIP's 224 / 8, so
# "clip" decodes exactly what "full" does (dp.guidance.latents_for_clip).
SWEEP = (
    UNGUIDED,
    Setting(4.0),  # the paper's form, the setting of the first measurements
    Setting(16.0),
    Setting(0.15, schedule="normalized", views=4),
    Setting(0.15, schedule="normalized", self_recurrence=2, views=4),
    Setting(0.15, schedule="normalized", self_recurrence=4, views=4),
    Setting(0.15, schedule="normalized", self_recurrence=4, views=1),
    Setting(0.3, schedule="normalized", self_recurrence=4, views=4),
)


def style_less_prompts(seed: int) -> list[str]:
    """``PROMPTS`` prompts "a {colour} {subject}" (no style word: no default style)."""
    from comfyui_dp_adapt.demo import evaluation

    return evaluation.subject_prompts("{}", seed, PROMPTS)


def clip_embeddings(world_: World, pictures: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, D) float64, ComfyUI's own preprocessing."""
    from comfyui_dp_adapt.nodes import comfy_compat

    with torch.inference_mode():
        embeds = comfy_compat.clip_vision_encode(world_.vision, pictures)
    return torch.nn.functional.normalize(embeds.clone().double(), dim=1)


def guided_pictures(world_: World, prompts: list[str], target, setting: Setting, seed: int):
    """IMAGE (len(prompts) * PER_PROMPT, 64, 64, 3) from the Universal Guidance Sampler node."""
    return guided_samples(
        world_, prompts, target, asdict(setting), seed=seed, per_prompt=PER_PROMPT
    )


def measure(world_: World, pictures: torch.Tensor, style: str, target) -> dict:
    from comfyui_dp_adapt.demo import dot_detector, evaluation

    cosine = clip_embeddings(world_, pictures).float() @ target.embedding
    detector = (
        {"detector": round(dot_detector.dotted_fraction(pictures), 4)} if style == HELD_OUT else {}
    )
    return {
        "fraction": round(evaluation.style_fraction(world_.classifier, pictures, style), 4),
        **detector,
        "styles": evaluation.style_counts(world_.classifier, pictures),
        "clip_cosine_to_target": round(float(cosine.mean()), 4),
    }


def contact_sheet(rows: list[tuple[str, torch.Tensor]], path: Path, *, columns: int) -> None:
    """One row of pictures per arm, its label on the left (nearest-neighbour x2)."""
    import numpy as np
    from PIL import Image, ImageDraw

    tile, label_width, gap = 128, 230, 4
    width = label_width + columns * (tile + gap)
    canvas = Image.new("RGB", (width, len(rows) * (tile + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, pictures) in enumerate(rows):
        y = gap + r * (tile + gap)
        draw.text((4, y + tile // 2 - 12), label.replace(" k=", "\nk="), fill="black")
        for c in range(min(columns, len(pictures))):
            array = (pictures[c].numpy() * 255).round().clip(0, 255).astype(np.uint8)
            picture = Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(picture, (label_width + c * (tile + gap), y))
    canvas.save(path)


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def run_sweep(world_: World, settings: tuple[Setting, ...], out: Path, seed: int, save) -> dict:
    """Proxy style: exact mean of ``PROXY_STYLE`` renders vs every setting, same prompts."""
    target = exact_target(clip_embeddings(world_, world_.renders(PROXY_STYLE, 100, seed + 1)))
    prompts = style_less_prompts(seed + 2)
    arms, rows = [], []
    body = {
        "target_style": PROXY_STYLE,
        "target": "exact mean CLIP embedding of 100 renders (non-private control)",
        "prompts": prompts,
        "pictures_per_arm": len(prompts) * PER_PROMPT,
        "arms": arms,
    }
    for setting in settings:
        started = time.monotonic()
        pictures = guided_pictures(world_, prompts, target, setting, seed + 100)
        result = {
            "setting": asdict(setting),
            "label": setting.label,
            **measure(world_, pictures, PROXY_STYLE, target),
            "seconds": round(time.monotonic() - started, 1),
        }
        arms.append(result)
        rows.append((f"{setting.label}\n{PROXY_STYLE} {result['fraction']:.2f}", pictures))
        log(f"{setting.label}: {PROXY_STYLE} {result['fraction']:.3f} {result['styles']}")
        contact_sheet(rows, out.with_suffix(".png"), columns=len(pictures))
        save(body, complete=len(arms) == len(settings))
    return body


def run_held_out(world_: World, setting: Setting, out: Path, seed: int, save) -> dict:
    """Held-out dotted: unguided vs exact-mean target vs DP releases at n = 100, eps = 8."""
    prompts = style_less_prompts(seed + 2)
    private = clip_embeddings(world_, world_.renders(HELD_OUT, TARGET_PICTURES, seed + 3))
    exact = exact_target(private)
    arms, rows = {}, []
    body = {
        "target_style": HELD_OUT,
        "setting": asdict(setting),
        "prompts": prompts,
        "pictures_per_arm": len(prompts) * PER_PROMPT,
        "delta": DELTA,
        "arms": arms,
    }

    def arm(name: str, target, arm_setting: Setting) -> dict:
        pictures = guided_pictures(world_, prompts, target, arm_setting, seed + 100)
        result = measure(world_, pictures, HELD_OUT, exact)
        rows.append((f"{name}\n{HELD_OUT} {result['fraction']:.2f}", pictures))
        contact_sheet(rows, out.with_suffix(".png"), columns=len(pictures))
        log(f"{name}: {HELD_OUT} {result['fraction']:.3f} {result['styles']}")
        return result

    def summarise(releases: list[dict], complete: bool) -> None:
        mean, low, high = interval([r["fraction"] for r in releases])
        arms[f"DP (n = {TARGET_PICTURES}, eps = {DP_EPSILON:g})"] = {
            "releases": releases,
            "fraction_mean": round(mean, 4),
            "fraction_ci95": [round(low, 4), round(high, 4)],
        }
        save(body, complete=complete)

    arms["unguided"] = arm("unguided", exact, UNGUIDED)
    save(body, complete=False)
    arms["exact mean (non-private)"] = arm("exact mean", exact, setting)
    save(body, complete=False)
    releases = []
    for r in range(DP_RELEASES):
        target = dp_target(private, epsilon=DP_EPSILON, n_hat=TARGET_PICTURES)
        result = arm(f"DP release {r + 1}", target, setting)
        result["target_cosine_to_exact"] = round(float(target.embedding @ exact.embedding), 4)
        releases.append(result)
        summarise(releases, complete=r + 1 == DP_RELEASES)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", action="store_true", help="measure on dotted (see above)")
    parser.add_argument(
        "--setting",
        type=json.loads,
        default=None,
        help='--held-out: node settings as JSON, e.g. \'{"guidance_strength": 1, "mode": "x0"}\'',
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.held_out and args.setting is None:
        parser.error("--held-out needs --setting (chosen on the proxy sweep)")

    from _setup import bootstrap_comfyui

    bootstrap_comfyui(cuda=torch.cuda.is_available(), prefix="dp_adapt_guidance_control_")
    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.utils

    from comfyui_dp_adapt.demo import evaluation

    comfy.utils.PROGRESS_BAR_ENABLED = False
    started = time.monotonic()
    world_ = World()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "guidance_control" if args.held_out else "guidance_sweep"
    path = args.out / f"{name}.json"

    def save(body: dict, *, complete: bool) -> None:
        """Write the record so far (an interrupted run leaves its measured arms)."""
        record = {
            "schema": 1,
            "complete": complete,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "seconds": round(time.monotonic() - started, 1),
            "sampling": f"{evaluation.SAMPLER}/{evaluation.SCHEDULER}, "
            f"{evaluation.SAMPLE_STEPS} steps, CFG {evaluation.CFG}, {PER_PROMPT} pictures "
            "per prompt",
            "seed": args.seed,
            **body,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        path.with_suffix(".txt").write_text(table_text(record))

    if args.held_out:
        run_held_out(world_, Setting(**args.setting), path, args.seed, save)
    else:
        run_sweep(world_, SWEEP, path, args.seed, save)
    print(path.with_suffix(".txt").read_text())
    return 0


def table_text(record: dict) -> str:
    lines = [
        ("" if record["complete"] else "INCOMPLETE (interrupted): ")
        + f"{record['date']}, {record['machine']}; {record['sampling']}",
        f"target style {record['target_style']!r}; fraction = share of the pictures the style "
        "classifier calls it",
    ]
    if "setting" in record:
        lines.append(f"setting {record['setting']}")
    lines.append(f"{'arm':<44}{'fraction':>9}{'cos':>8}  styles")
    arms = record["arms"]
    items = arms if isinstance(arms, list) else [{"label": k, **v} for k, v in arms.items()]
    for arm in items:
        for row in arm.get("releases", [arm]):
            label = arm["label"] if row is arm else f"{arm['label']} release"
            lines.append(
                f"{label:<44}{row['fraction']:>9.3f}{row['clip_cosine_to_target']:>8.3f}  "
                + (f"detector {row['detector']:.3f}  " if "detector" in row else "")
                + f"{row['styles']}"
            )
        if "fraction_mean" in arm:
            low, high = arm["fraction_ci95"]
            lines.append(f"{'  mean [95% CI]':<44}{arm['fraction_mean']:>9.3f}  [{low}, {high}]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
