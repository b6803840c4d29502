"""The private images as they travel from the loader to a DP node (docs/privacy.md §1).

One object carries the read folder (each kept picture's file and pixel digest, no pixels)
and, row for row, each picture's keyed hash, so the two can never drift apart and a core
node (preview, save) cannot be wired to the pixels: the socket type is the pack's own.
Pixels are decoded on demand, ``size`` pictures at a time (``batches``), so memory does
not grow with the number of pictures. Nothing here may be published: not the pixels, not
the keys, not even how many rows there are (under add/remove adjacency the count is
private). ``repr`` and ``str`` therefore show nothing but the type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import InvalidParameterError
from .images import ImageBatch, PrivateImages

SOCKET_TYPE = "DP_PRIVATE_IMAGES"


@dataclass(frozen=True, eq=False, repr=False)
class PrivateImageSet:
    """Private pictures and their keyed per-picture hashes.

    Attributes:
        source: the read folder (``dp.images.load_image_folder``): paths and pixel digests.
        image_keys: one keyed hash (``hmac-sha256:<hex>``) per picture, ``image_keys[i]``
            belongs to row i of ``batches``. The budget ledger charges each release to these
            keys, so a folder that shares pictures with another shares their spending
            (docs/privacy.md §7).
        key_check: the check value of the fingerprint key the image keys were made under
            (``dp.fingerprint.key_check_value``), set by the loader; the ledger refuses a
            release under another key than the one its images were recorded under.
    """

    source: PrivateImages = field(repr=False)
    image_keys: tuple[str, ...] = field(repr=False)
    key_check: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, PrivateImages):
            raise InvalidParameterError(
                "private images must be a folder read by DP Load Private Images, got "
                f"{type(self.source).__name__}."
            )
        keys = tuple(self.image_keys)
        if len(keys) != self.source.count or not all(isinstance(k, str) and k for k in keys):
            # No numbers in the message: the count is private.
            raise InvalidParameterError(
                "private images need exactly one non-empty key per image; connect them from "
                "DP Load Private Images."
            )
        object.__setattr__(self, "image_keys", keys)

    @property
    def resolution(self) -> int:
        """Side R of every decoded picture (public: the loader's setting)."""
        return self.source.resolution

    @property
    def count(self) -> int:
        """n, the number of pictures. Private (add/remove adjacency): never publish it."""
        return self.source.count

    def batches(
        self, size: int, *, check_cancelled: Callable[[], None] | None = None
    ) -> Iterator[ImageBatch]:
        """Decoded pictures, float32 (b, R, R, 3) in [0, 1], ``size`` rows at a time, with
        their row range (``PrivateImages.batches``: re-read, digest re-checked)."""
        return self.source.batches(size, check_cancelled=check_cancelled)

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
