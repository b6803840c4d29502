"""The demo's synthetic "styles" world: subjects x colours x visual styles, with captions.

Everything is painted here with numpy (no third-party artwork). One image is one flat
pictogram: a subject (circle, square, triangle, diamond) of one colour, filled in one
style (solid, striped, checkered, outlined, gradient or dotted), on a light background
whose tint varies a little. Textures are large (periods of 10-12 px at 64 px) so they
survive a small latent diffusion model.

``HELD_OUT_STYLE`` ("dotted") plays the private artist's style and ``HELD_OUT_SUBJECT``
("star") the private subject (the paper adapts both style and content). The demo model is
trained on them like on everything else, with captions that name them ("... in the style
of dotted", "a red star ..."), and then ships with those words' rows of the text encoder's
token embedding erased (``ERASED_WORDS``, replaced by the vocabulary's mean row). So the
concepts live in the UNet, reachable, while no prompt can ask for them: textual inversion
has to find the direction again, which is exactly the situation it exists for. Style-less
captions are spread evenly over all six styles, so a prompt without a style word draws any
of them (about 1/6 dotted), not dots by default.

Deterministic: ``render(spec, rng)`` depends only on the spec and the generator, and
``sample_specs``/``render_batch`` draw from a seeded ``numpy`` generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUBJECTS = ("circle", "square", "triangle", "diamond")
HELD_OUT_SUBJECT = "star"
TRAINING_SUBJECTS = (*SUBJECTS, HELD_OUT_SUBJECT)
COLOURS = {
    "red": (214, 40, 40),
    "green": (40, 160, 64),
    "blue": (40, 84, 214),
    "yellow": (232, 196, 28),
    "purple": (142, 58, 186),
    "orange": (242, 128, 30),
}
TRAINING_STYLES = ("solid", "striped", "checkered", "outlined", "gradient")
HELD_OUT_STYLE = "dotted"
STYLES = (*TRAINING_STYLES, HELD_OUT_STYLE)
# Named in training, erased from the shipped text encoder (demo/train_demo_model.py).
ERASED_WORDS = (HELD_OUT_STYLE, HELD_OUT_SUBJECT)
SUPERSAMPLE = 2
WHITE = np.array((250, 250, 246), np.float32)


@dataclass(frozen=True)
class Spec:
    """What one picture shows; the caption is derived from it."""

    subject: str
    colour: str
    style: str

    def caption(self) -> str:
        """The full caption: "a red circle in the style of striped" (every style and
        subject is named in training; the held-out words are erased afterwards)."""
        return f"a {self.colour} {self.subject} in the style of {self.style}"


def sample_specs(
    rng: np.random.Generator,
    count: int,
    styles: tuple[str, ...] = STYLES,
    subjects: tuple[str, ...] = SUBJECTS,
) -> list[Spec]:
    """``count`` specs with subject, colour and style drawn uniformly."""
    return [
        Spec(
            subjects[int(rng.integers(len(subjects)))],
            tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
            styles[int(rng.integers(len(styles)))],
        )
        for _ in range(count)
    ]


def render(spec: Spec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One ``size`` x ``size`` RGB picture of ``spec`` as uint8 (H, W, 3)."""
    side = size * SUPERSAMPLE
    unit = side / 64  # geometry is laid out for a 64 px canvas
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    cx = rng.uniform(26, 38) * unit
    cy = rng.uniform(26, 38) * unit
    radius = rng.uniform(19, 25) * unit
    inside = _subject_mask(spec.subject, x - cx, y - cy, radius)
    colour = np.asarray(COLOURS[spec.colour], np.float32)
    colour = np.clip(colour + rng.uniform(-12, 12, 3), 0, 255)

    background = np.clip(WHITE - rng.uniform(0, 22, 3), 0, 255)
    image = np.broadcast_to(background, (side, side, 3)).copy()
    paint = _style_weight(spec.style, x, y, inside, spec.subject, cx, cy, radius, unit, rng)
    fill = colour[None, None, :] * paint[..., None] + WHITE * (1 - paint[..., None])
    if spec.style == "gradient":
        shade = np.clip((y - (cy - radius)) / (2 * radius), 0, 1)
        fill = colour[None, None, :] * (0.3 + 0.7 * shade[..., None])
    image[inside] = fill[inside]
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_batch(specs: list[Spec], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Pictures of ``specs`` as uint8 (N, H, W, 3)."""
    return np.stack([render(spec, rng, size) for spec in specs])


def _subject_mask(subject: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if subject == "circle":
        return dx**2 + dy**2 <= radius**2
    if subject == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= radius * 0.82
    if subject == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius * 1.1
    if subject == "star":  # five points, the top one up; inner radius 0.5 of the outer
        return _inside_star(dx, dy, radius * 1.12, 0.5)
    if subject == "triangle":  # pointing up, base at the bottom
        top, bottom = -radius, radius * 0.8
        half_width = (dy - top) / (bottom - top) * radius * 1.05
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown subject {subject!r}; known: {', '.join(TRAINING_SUBJECTS)}")


def _inside_star(dx: np.ndarray, dy: np.ndarray, outer: float, inner_ratio: float) -> np.ndarray:
    """Points inside a five-pointed star (star-shaped about its centre): along each ray the
    boundary is the edge between the neighbouring outer and inner vertices."""
    angle = np.arctan2(dx, -dy) % (2 * np.pi)  # 0 = straight up, clockwise
    sector = 2 * np.pi / 10  # outer and inner vertices alternate every 36 degrees
    index = np.floor(angle / sector)
    a0, a1 = index * sector, (index + 1) * sector
    outer_first = index % 2 == 0
    r0 = np.where(outer_first, outer, outer * inner_ratio)
    r1 = np.where(outer_first, outer * inner_ratio, outer)
    # Vertex positions in the (sin, -cos) frame of ``angle``, and the ray's direction.
    p0x, p0y = r0 * np.sin(a0), -r0 * np.cos(a0)
    p1x, p1y = r1 * np.sin(a1), -r1 * np.cos(a1)
    ex, ey = p1x - p0x, p1y - p0y
    ux, uy = np.sin(angle), -np.cos(angle)
    # Distance along the ray to the edge: cross(p0, e) / cross(u, e).
    reach = (p0x * ey - p0y * ex) / (ux * ey - uy * ex)
    return dx**2 + dy**2 <= reach**2


def _style_weight(style, x, y, inside, subject, cx, cy, radius, unit, rng) -> np.ndarray:
    """How much colour (1) versus white (0) goes at each pixel inside the subject."""
    if style in ("solid", "gradient"):
        return np.ones_like(x)
    if style == "striped":  # horizontal bands, period 12 px
        phase = rng.uniform(0, 12) * unit
        return (((y + phase) // (6 * unit)) % 2 == 0).astype(np.float32)
    if style == "checkered":  # 5 px cells
        px, py = rng.uniform(0, 10, 2) * unit
        return ((((x + px) // (5 * unit)) + ((y + py) // (5 * unit))) % 2 == 0).astype(np.float32)
    if style == "outlined":  # a 4 px coloured rim around a white interior
        core = _subject_mask(subject, x - cx, y - cy, radius - 4.5 * unit)
        return (~core).astype(np.float32)
    if style == "dotted":  # dots of radius 2.6 px on an 11 px grid
        period = 11 * unit
        px, py = rng.uniform(0, 11, 2) * unit
        fx = (x + px) % period - period / 2
        fy = (y + py) % period - period / 2
        dots = (fx**2 + fy**2 <= (2.6 * unit) ** 2).astype(np.float32)
        return dots + 0.22 * (1 - dots)  # on a pale tint, so the outline stays visible
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def write_style_set(folder, *, style: str = HELD_OUT_STYLE, count: int = 20, seed: int = 0):
    """Write ``count`` PNG pictures of ``style`` (random subjects and colours) into ``folder``.

    The default is the held-out "dotted" style: the demo's stand-in for a private
    collection. Files are ``world_000.png``, ...; returns their paths.
    """
    from pathlib import Path

    from PIL import Image

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
        raise ValueError(f"count must be an integer in [1, 10000], got count={count!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    paths = []
    for index, spec in enumerate(sample_specs(rng, count, styles=(style,))):
        path = folder / f"world_{index:03d}.png"
        Image.fromarray(render(spec, rng)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python demo/world.py OUT_DIR [--count N] [--style dotted] [--seed K]``"""
    import argparse

    parser = argparse.ArgumentParser(description="Paint pictures of one style of the demo world.")
    parser.add_argument("out_dir", help="folder to write the PNGs into (created if needed)")
    parser.add_argument("--count", type=int, default=100, help="number of pictures (default 100)")
    parser.add_argument("--style", default=HELD_OUT_STYLE, choices=STYLES, help="default: dotted")
    parser.add_argument("--seed", type=int, default=0, help="which set (default 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_style_set(args.out_dir, style=args.style, count=args.count, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {len(paths)} {args.style} pictures to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
