"""The private images as they travel from the loader to a DP node (docs/privacy.md §1).

One object carries the pixels and, row for row, each image's keyed hash, so the two can
never drift apart and a core node (preview, save) cannot be wired to the pixels: the socket
type is the pack's own. Nothing here may be published: not the pixels, not the keys, not
even how many rows there are (under add/remove adjacency the count is private). ``repr``
and ``str`` therefore show nothing but the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidParameterError

SOCKET_TYPE = "DP_PRIVATE_IMAGES"


@dataclass(frozen=True, eq=False, repr=False)
class PrivateImageSet:
    """Private images and their keyed per-image hashes.

    Attributes:
        images: float32 (n, R, R, 3) in [0, 1], ComfyUI's IMAGE layout.
        image_keys: n keyed hashes (``hmac-sha256:<hex>``), ``image_keys[i]`` belongs to
            ``images[i]``. The budget ledger charges each release to these keys, so a folder
            that shares images with another shares their spending (docs/privacy.md §7).
    """

    images: torch.Tensor = field(repr=False)
    image_keys: tuple[str, ...] = field(repr=False)

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3:
            raise InvalidParameterError(
                "private images must be an IMAGE batch (n, height, width, >= 3 channels)."
            )
        keys = tuple(self.image_keys)
        if len(keys) != images.shape[0] or not all(isinstance(k, str) and k for k in keys):
            # No numbers in the message: the count is private.
            raise InvalidParameterError(
                "private images need exactly one non-empty key per image; connect them from "
                "DP Load Private Images."
            )
        object.__setattr__(self, "image_keys", keys)

    def __repr__(self) -> str:
        return "PrivateImageSet(<private>)"

    __str__ = __repr__


def check_private_image_set(value: object) -> PrivateImageSet:
    """``value`` if it is a PrivateImageSet, else a clear error (wrong socket wired)."""
    if not isinstance(value, PrivateImageSet):
        raise InvalidParameterError(
            f"private_images must come from DP Load Private Images (socket {SOCKET_TYPE}), got "
            f"{type(value).__name__}."
        )
    return value
