"""A small synthetic "style" image set for demos and tests, painted procedurally.

Every image shares one look: flat pictogram shapes (suns, hills, houses, trees, waves,
moons) filled from one limited palette, outlined in dark ink with a slight print-style
misregistration, on warm paper with a soft texture. The shapes, their number, sizes and
positions vary per image. Everything is generated here (no third-party artwork), from
Pillow and numpy only, so the set can stand in for a user's private style folder.

Deterministic: the same ``seed`` gives the same pixels, and image ``i`` does not depend on
``count``, so a smaller set is a prefix of a larger one.

Usage: ``python demo/synthetic_images.py OUT_DIR [--count N] [--size S] [--seed K]``
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PAPER = (240, 230, 208)
INK = (40, 38, 52)
FILLS = ((203, 92, 62), (226, 172, 70), (52, 128, 124), (120, 150, 96))
SUPERSAMPLE = 2


def write_synthetic_style_set(
    folder: Path, *, count: int = 8, size: int = 256, seed: int = 0
) -> list[Path]:
    """Paint ``count`` square PNGs of ``size`` pixels into ``folder`` (created if needed).

    Files are named ``style_000.png``, ``style_001.png``...; existing files of those names
    are overwritten. Returns their paths in order.
    """
    for name, value, low, high in (("count", count, 1, 10_000), ("size", size, 64, 4096)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {name}={value!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got seed={seed!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"style_{index:03d}.png"
        paint_style_image(size=size, rng=np.random.default_rng([seed, index])).save(path)
        paths.append(path)
    return paths


def paint_style_image(*, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of the set: paper background, then 3 to 6 outlined flat shapes."""
    canvas_size = size * SUPERSAMPLE
    canvas = Image.fromarray(_paper(canvas_size, rng))
    draw = ImageDraw.Draw(canvas)
    unit = canvas_size / 100  # shapes are laid out on a 100 x 100 grid

    horizon = rng.uniform(58, 78)
    _hills(draw, rng, unit, horizon)
    for _ in range(int(rng.integers(2, 5))):
        painter = SHAPES[int(rng.integers(len(SHAPES)))]
        centre = (rng.uniform(18, 82) * unit, rng.uniform(18, horizon) * unit)
        radius = rng.uniform(8, 17) * unit
        painter(draw, rng, centre, radius, unit)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=0.4 * SUPERSAMPLE))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _paper(side: int, rng: np.random.Generator) -> np.ndarray:
    """Warm paper: soft blotches (upsampled coarse noise), fibres and fine grain."""
    coarse = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8))
    blotches = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), np.float32)
    texture = (blotches / 255 - 0.5) * 14 + rng.normal(0, 3.5, (side, side))
    fibres = rng.normal(0, 1, (side, side // 8)).repeat(8, axis=1)
    texture += fibres * 2.0
    paper = np.asarray(PAPER, np.float32)[None, None, :] + texture[:, :, None]
    return np.clip(paper, 0, 255).astype(np.uint8)


def _ink_width(unit: float) -> int:
    return max(2, round(1.6 * unit))


def _offset(rng: np.random.Generator, unit: float) -> tuple[float, float]:
    """Fill shifted against its outline, like a slightly misregistered print."""
    return tuple(rng.uniform(-0.9, 0.9) * unit for _ in range(2))


def _fill(rng: np.random.Generator) -> tuple[int, int, int]:
    return FILLS[int(rng.integers(len(FILLS)))]


def _polygon(draw, rng, points, unit, fill=None) -> None:
    dx, dy = _offset(rng, unit)
    draw.polygon([(x + dx, y + dy) for x, y in points], fill=fill or _fill(rng))
    draw.line([*points, points[0]], fill=INK, width=_ink_width(unit), joint="curve")


def _hills(draw, rng, unit, horizon) -> None:
    side = 100 * unit
    peaks = np.sort(rng.uniform(0, 100, int(rng.integers(1, 4))))
    for peak in peaks:
        height = rng.uniform(10, 25)
        width = rng.uniform(25, 45)
        points = [
            ((peak - width) * unit, horizon * unit),
            (peak * unit, (horizon - height) * unit),
            ((peak + width) * unit, horizon * unit),
        ]
        _polygon(draw, rng, points, unit)
    _, dy = _offset(rng, unit)
    draw.rectangle((0, horizon * unit + dy, side, side), fill=FILLS[3])
    draw.line([(0, horizon * unit), (side, horizon * unit)], fill=INK, width=_ink_width(unit))


def _sun(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    r = radius * 0.6
    for k in range(int(rng.integers(6, 11))):
        angle = 2 * math.pi * k / 8 + rng.uniform(-0.1, 0.1)
        start = (x + math.cos(angle) * r * 1.25, y + math.sin(angle) * r * 1.25)
        end = (x + math.cos(angle) * r * 1.65, y + math.sin(angle) * r * 1.65)
        draw.line([start, end], fill=INK, width=_ink_width(unit))
    dx, dy = _offset(rng, unit)
    draw.ellipse((x - r + dx, y - r + dy, x + r + dx, y + r + dy), fill=FILLS[1])
    draw.ellipse((x - r, y - r, x + r, y + r), outline=INK, width=_ink_width(unit))


def _moon(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    r = radius * 0.6
    dx, dy = _offset(rng, unit)
    draw.ellipse((x - r + dx, y - r + dy, x + r + dx, y + r + dy), fill=_fill(rng))
    draw.ellipse((x - r, y - r, x + r, y + r), outline=INK, width=_ink_width(unit))
    shift = r * rng.uniform(0.35, 0.6)
    draw.arc(
        (x - r + shift, y - r, x + r + shift, y + r), 100, 260, fill=INK, width=_ink_width(unit)
    )


def _house(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    w, h = radius * rng.uniform(0.8, 1.1), radius * rng.uniform(0.6, 0.9)
    body = [(x - w / 2, y), (x + w / 2, y), (x + w / 2, y + h), (x - w / 2, y + h)]
    _polygon(draw, rng, body, unit)
    roof = [(x - w * 0.65, y), (x, y - h * 0.8), (x + w * 0.65, y)]
    _polygon(draw, rng, roof, unit)
    door = (x - w * 0.12, y + h * 0.45, x + w * 0.12, y + h)
    draw.rectangle(door, fill=INK)


def _tree(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    h = radius * rng.uniform(1.2, 1.6)
    draw.line([(x, y), (x, y + h * 0.6)], fill=INK, width=_ink_width(unit) * 2)
    crown = [
        (x - radius * 0.55, y + h * 0.15),
        (x, y - h * 0.55),
        (x + radius * 0.55, y + h * 0.15),
    ]
    _polygon(draw, rng, crown, unit, fill=FILLS[2])


def _waves(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    for row in range(int(rng.integers(2, 4))):
        yy = y + row * radius * 0.35
        points = [
            (x - radius + t * radius / 12, yy + math.sin(t * math.pi / 3) * radius * 0.08)
            for t in range(25)
        ]
        draw.line(points, fill=INK, width=_ink_width(unit), joint="curve")


def _star(draw, rng, centre, radius, unit) -> None:
    x, y = centre
    r = radius * 0.7
    turn = rng.uniform(0, math.pi)
    points = [
        (
            x + math.cos(turn + k * math.pi / 5) * (r if k % 2 == 0 else r * 0.45),
            y + math.sin(turn + k * math.pi / 5) * (r if k % 2 == 0 else r * 0.45),
        )
        for k in range(10)
    ]
    _polygon(draw, rng, points, unit)


SHAPES: tuple[Callable, ...] = (_sun, _moon, _house, _tree, _waves, _star)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the PNGs into")
    parser.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="set to paint (default 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_synthetic_style_set(
            args.out_dir, count=args.count, size=args.size, seed=args.seed
        )
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {len(paths)} images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
