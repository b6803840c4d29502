"""A hand-written, training-free dot detector: the second fidelity measure beside the style
classifier, so no result rests on one learned model.

A picture is "dotted" when its ink (how far each pixel is from the picture's own background,
in the most-inked colour channel) forms several small, round, separate blobs of about the
same size, on a pale interior (strong ink covers little of the subject), spaced like a dot grid (one
per 11 x 11 px, not a checkerboard's one per 50 px), and those blobs hold most of the
strong ink. The other styles
of the world fail it for geometric reasons: solid and gradient fills are one large blob,
stripes are long bands, a checkerboard's cells touch at their corners (one 8-connected
blob), an outline is one ring. Nothing here was fitted to data: the thresholds come from the
world's geometry (dots of radius 2.6 px on an 11 px grid at 64 px, ``demo/world.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

STRONG_INK = 0.45  # full-colour paint; the dotted style's pale interior is 0.22 of the colour
DOT_AREA = (5, 60)  # pixels at 64 px: a dot is pi * 2.6^2 = 21 px, blurred or not
MIN_DOTS = 3  # the smallest subject still holds 3 dots
DOT_SHARE = 0.6  # of all strong ink, the share that must lie in dot-sized blobs
MAX_ELONGATION = 2.5  # a dot's bounding box is about square; a band's is not
SUBJECT_INK = 0.07  # the pale interior (0.22 of the colour, 0.1 in the palest channel) counts
MAX_COVERAGE = 0.35  # dots cover 21 of every 121 px of the subject; a checkerboard half
GRID_CELL = 121  # px per dot at 64 px (an 11 px grid); a checkerboard has a cell per 50 px
MAX_DENSITY = 1.6  # dots per grid cell of the subject's area


def ink(image: np.ndarray) -> np.ndarray:
    """(H, W) ink in [0, 1]: the largest relative drop below the background in any channel.
    The background is the median colour of the picture's border (subjects never touch it)."""
    smooth = ndimage.uniform_filter(image, size=(3, 3, 1), mode="nearest")
    border = np.concatenate([smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1]])
    background = np.median(border, axis=0).clip(0.05, 1.0)
    return ((background - smooth) / background).max(axis=2).clip(0, 1)


def dot_statistics(image: np.ndarray) -> dict:
    """The blob statistics the decision rests on, for one (H, W, 3) picture in [0, 1]."""
    scale = image.shape[0] / 64
    strong = ink(image) > STRONG_INK
    labels, count = ndimage.label(strong, structure=np.ones((3, 3)))
    low, high = (DOT_AREA[0] * scale**2, DOT_AREA[1] * scale**2)
    dots, dot_pixels = 0, 0
    for box, label in zip(ndimage.find_objects(labels), range(1, count + 1), strict=True):
        area = int((labels[box] == label).sum())
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        elongation = max(height, width) / max(1, min(height, width))
        if low <= area <= high and elongation <= MAX_ELONGATION:
            dots += 1
            dot_pixels += area
    total = int(strong.sum())
    subject = int(ndimage.binary_fill_holes(ink(image) > SUBJECT_INK).sum())
    return {
        "dots": dots,
        "dot_share": dot_pixels / total if total else 0.0,
        "coverage": total / subject if subject else 1.0,
        "density": dots * GRID_CELL * scale**2 / subject if subject else 0.0,
    }


def is_dotted(image: np.ndarray) -> bool:
    stats = dot_statistics(image)
    return (
        stats["dots"] >= MIN_DOTS
        and stats["dot_share"] >= DOT_SHARE
        and stats["coverage"] <= MAX_COVERAGE
        and stats["density"] <= MAX_DENSITY
    )


def dotted_fraction(images: torch.Tensor) -> float:
    """Fraction of IMAGE (N, H, W, 3) in [0, 1] the detector calls dotted."""
    pictures = images.detach().float().cpu().numpy()
    return float(np.mean([is_dotted(picture) for picture in pictures]))
