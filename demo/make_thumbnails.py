"""Thumbnails of the shipped workflows for ComfyUI's template browser.

The current frontend shows ``workflows/<name>.jpg`` next to ``workflows/<name>.json`` (the
card's title is the file name). Each thumbnail shows what its workflow gives, from the
project's own outputs: stand-in private pictures of the demo world's held-out style (dotted),
pictures generated with a DP release (cut from the paper reproduction's side-by-side, see
bench/reproduce_paper.py), and the DP Privacy Planner's figure.

    python demo/make_thumbnails.py [--side-by-side results/reproduction_quick_side_by_side.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SIZE = 512
TILE = 150
GAP = 12
# The side-by-side's geometry (bench/reproduce_paper.py side_by_side): 3x pictures, a header.
SCALE, HEADER, SIDE_GAP, PICTURE = 3, 34, 6, 64
COLUMNS = ("initializer", "non-private TI", "DPAgg-TI", "DP-SGD TI", "DP guidance")


def _package():
    """Import the pack under a fixed name without running its ComfyUI registration."""
    import types

    if "comfyui_dp_adapt" not in sys.modules:
        package = types.ModuleType("comfyui_dp_adapt")
        package.__path__ = [str(ROOT)]
        sys.modules["comfyui_dp_adapt"] = package


def side_by_side_tiles(path: Path, column: str, count: int = 3) -> list[Image.Image]:
    """The first ``count`` pictures of one column of the reproduction's side-by-side."""
    sheet = Image.open(path).convert("RGB")
    index = COLUMNS.index(column)
    side = PICTURE * SCALE
    x = SIDE_GAP + index * (side + SIDE_GAP)
    tiles = []
    for row in range(count):
        y = HEADER + SIDE_GAP + row * (side + SIDE_GAP)
        tiles.append(sheet.crop((x, y, x + side, y + side)))
    return tiles


def private_tiles(count: int = 3) -> list[Image.Image]:
    _package()
    from comfyui_dp_adapt.demo import world

    rng = np.random.default_rng(11)
    specs = world.sample_specs(rng, count, styles=(world.HELD_OUT_STYLE,))
    return [Image.fromarray(world.render(spec, rng)) for spec in specs]


def card(title: str, rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """A square card: a title, then labelled rows of pictures."""
    canvas = Image.new("RGB", (SIZE, SIZE), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, GAP), title, fill=(240, 240, 240), font_size=22)
    y = 56
    for label, tiles in rows:
        draw.text((GAP, y), label, fill=(200, 200, 200), font_size=16)
        y += 24
        for i, tile in enumerate(tiles[:3]):
            x = GAP + i * (TILE + GAP) + (SIZE - 3 * TILE - 4 * GAP) // 2
            canvas.paste(tile.resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        y += TILE + 16
    return canvas


def planner_card() -> Image.Image:
    _package()
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.dp.planner import (
        LedgerBalance,
        NextRelease,
        PlannedRelease,
        noise_curve,
    )
    from comfyui_dp_adapt.nodes.planner_plot import privacy_utility_plot

    points = noise_curve(delta=1e-5, dataset_size=100, dimension=768, sampling_rate=1.0)
    next_release = NextRelease(planned=PlannedRelease(delta=1e-5), epsilon=3.0, filter_kind=None)
    balance = LedgerBalance("example", 1, 1.0, TotalBudget(4.0, 1e-5), (next_release,))
    picture = privacy_utility_plot(
        points,
        epsilon=1.0,
        balance=balance,
        dataset_size=100,
        dimension=768,
        sampling_rate=1.0,
        delta=1e-5,
    )
    plot = Image.fromarray((picture * 255).round().astype(np.uint8))
    canvas = Image.new("RGB", (SIZE, SIZE), "white")
    plot.thumbnail((SIZE, SIZE))
    canvas.paste(plot, (0, (SIZE - plot.height) // 2))
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--side-by-side",
        type=Path,
        default=ROOT / "results" / "reproduction_quick_side_by_side.png",
    )
    args = parser.parse_args(argv)
    private = ("private pictures (stand-in: the demo's dotted style)", private_tiles())
    cards = {
        "Quick start on the demo model": card(
            "Quick start: a DP style token",
            [
                private,
                ("DPAgg-TI token, epsilon = 1", side_by_side_tiles(args.side_by_side, "DPAgg-TI")),
            ],
        ),
        "Quick start on the demo model, DP guidance": card(
            "Quick start: DP style guidance",
            [
                private,
                (
                    "guided by the DP CLIP target, eps = 1",
                    side_by_side_tiles(args.side_by_side, "DP guidance"),
                ),
            ],
        ),
        "Private style token (DP textual inversion)": card(
            "DP textual inversion (DPAgg-TI)",
            [
                private,
                ("DPAgg-TI token, epsilon = 1", side_by_side_tiles(args.side_by_side, "DPAgg-TI")),
            ],
        ),
        "Private style token on SDXL (DP textual inversion)": card(
            "DP textual inversion on SDXL",
            [
                private,
                (
                    "DPAgg-TI token on the demo model (no SDXL weights here)",
                    side_by_side_tiles(args.side_by_side, "DPAgg-TI"),
                ),
            ],
        ),
        "Private style guidance (DP universal guidance)": card(
            "DP universal guidance",
            [
                private,
                (
                    "guided by the DP CLIP target, eps = 1",
                    side_by_side_tiles(args.side_by_side, "DP guidance"),
                ),
            ],
        ),
        "Privacy budget planner": planner_card(),
    }
    for name, picture in cards.items():
        if not (WORKFLOWS / f"{name}.json").is_file():
            raise SystemExit(f"make_thumbnails.py: FAILED: no workflow {name!r} in {WORKFLOWS}")
        path = WORKFLOWS / f"{name}.jpg"
        picture.save(path, quality=88)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
