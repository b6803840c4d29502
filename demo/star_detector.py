"""A hand-written, training-free star detector: the content measure of the demo world's
held-out subject ("star", ``demo/world.py``), for a token trained with the object templates.

A star is the only subject of the world that is far from convex: its silhouette fills about
half of its convex hull (a five-pointed star with inner radius 0.5 of the outer), while a
circle, square, diamond or triangle fills nearly all of it. The silhouette is every pixel
with ink (any drop below the picture's own background), closed over the gaps a striped,
checkered or dotted fill leaves, with its holes filled. Nothing here was fitted to data.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .dot_detector import ink

SILHOUETTE_INK = 0.07  # as the dot detector's subject: the dotted fill's pale tint counts
GAP_CLOSING = 3  # px at 64 px: bridges stripes (6 px gaps) and checker cells, not star notches
MIN_AREA = 150  # px at 64 px: smaller silhouettes are not a subject
MAX_STAR_SOLIDITY = 0.75  # an ideal star is 0.55; convex subjects are above 0.9


def solidity(image: np.ndarray) -> float | None:
    """Silhouette area / convex hull area of the largest inked region (None: no subject)."""
    scale = image.shape[0] / 64
    mask = ink(image) > SILHOUETTE_INK
    radius = max(1, round(GAP_CLOSING * scale))
    disk = _disk(radius)
    mask = ndimage.binary_closing(np.pad(mask, radius), structure=disk)[
        radius:-radius, radius:-radius
    ]
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    area = int(largest.sum())
    if area < MIN_AREA * scale**2:
        return None
    ys, xs = np.nonzero(largest)
    corners = np.concatenate(
        [np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]
    )  # pixel squares' corners, so the hull covers whole pixels
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return None
    return area / hull.volume  # in 2-D, ``volume`` is the area


def is_star(image: np.ndarray) -> bool:
    value = solidity(image)
    return value is not None and value <= MAX_STAR_SOLIDITY


def star_fraction(images: torch.Tensor) -> float:
    """Fraction of IMAGE (N, H, W, 3) in [0, 1] the detector calls a star."""
    pictures = images.detach().float().cpu().numpy()
    return float(np.mean([is_star(picture) for picture in pictures]))


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x**2 + y**2 <= radius**2
