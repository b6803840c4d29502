"""Loading a folder of private images into one IMAGE batch (DP_SPEC section 1).

The images, their file names, and which file is which are private. This module therefore:

- never writes anything to disk (no caches, thumbnails or temporary files);
- never logs a file name: the log line carries only counts (n is public, DP_SPEC section 1);
- names the broken file in an ``ImageFolderError`` message. That message goes to the user's
  own interface (ComfyUI shows it, and prints it to its own console), and without the name
  the user cannot find the file to fix it. Nothing here puts a name into an output, into
  file metadata or into the ledger.

The dataset's fingerprint (the ledger's key, DP_SPEC section 7) hashes the raw file bytes
only. It excludes names and the order of files, so renaming or re-sorting the folder keeps
it, and it excludes the loading parameters, so changing the resolution does not make a
"new" dataset with a fresh budget. The fingerprint is an exact function of the private
images and carries NO differential-privacy protection: it belongs in the local ledger, not
in anything shared.

Decoding treats every file as untrusted input: the pixel count is checked from the header
before any decoding (decompression bombs), every image is fully decoded (truncated files
are refused), and only a fixed set of decoders may run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .errors import DpAdaptError, InvalidParameterError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Decoders allowed to run, whatever a file's extension says ("JPEG" also opens the
# multi-picture MPO files many phone cameras write).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

MIN_RESOLUTION = 64
MAX_RESOLUTION = 2048
# Stable Diffusion's VAE downsamples by 8, so the side must be a multiple of 8.
RESOLUTION_MULTIPLE = 8
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_IMAGES = 1000

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MAX = 65535.0


class ImageFolderError(DpAdaptError):
    """The private image folder, or a file in it, cannot be loaded."""


class _UnsupportedImage(Exception):
    """A decoded image whose pixel values this loader will not guess a meaning for."""


@dataclass(frozen=True, eq=False)
class PrivateImages:
    """A loaded private dataset.

    Attributes:
        images: float32 tensor (n, R, R, 3) in [0, 1], ComfyUI's IMAGE layout, in sorted
            file-name order. Private; kept out of ``repr``.
        count: n, the number of images (public, DP_SPEC section 1).
        fingerprint: ``"sha256:<hex>"`` of the files' contents, see ``folder_fingerprint``.
    """

    images: torch.Tensor = field(repr=False)
    count: int
    fingerprint: str


@dataclass(frozen=True)
class _Listing:
    files: tuple[Path, ...]
    skipped: int


def load_image_folder(
    folder: Path,
    *,
    resolution: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_images: int = DEFAULT_MAX_IMAGES,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrivateImages:
    """Load every image file of ``folder`` (not sub-folders) as an (n, R, R, 3) batch.

    Files are taken by extension (png, jpg/jpeg, webp, bmp, tif/tiff, gif: first frame),
    in sorted name order; hidden files and other extensions are skipped. Each image gets
    its EXIF orientation applied, is converted to RGB (transparency composited on white,
    16-bit greyscale scaled from its full 16-bit range), centre-cropped to a square and
    resized to ``resolution`` with Lanczos filtering (antialiased when shrinking).

    Args:
        folder: the folder to read.
        resolution: side R of the square output, a multiple of 8 in [64, 2048].
        max_image_pixels: refuse any image with more pixels than this, read from the header
            before decoding. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) still
            applies on top of it.
        max_images: refuse a folder with more images than this (the batch is kept in memory:
            n * R * R * 12 bytes).
        on_progress: called as ``on_progress(done, total)`` before the first image and after
            each one; it may raise to cancel.

    Raises:
        InvalidParameterError: a parameter is out of range.
        ImageFolderError: the folder is missing, not a folder, holds no image or too many,
            or one of its images is unreadable, truncated, too large or of an unsupported kind.
    """
    _check_resolution(resolution)
    _check_positive("max_image_pixels", max_image_pixels)
    _check_positive("max_images", max_images)
    listing = _list_image_files(Path(folder))
    n = len(listing.files)
    if n > max_images:
        raise ImageFolderError(
            f"folder {folder} holds {n} image files, more than max_images={max_images}. "
            "Use a smaller folder or raise the limit."
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another package switched this Pillow-wide flag on; it is not ours to switch off
        # (that would race with its users), so truncated files can go undetected.
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by another package: truncated "
            "private images cannot be detected."
        )

    images = torch.empty((n, resolution, resolution, 3), dtype=torch.float32)
    digests: list[bytes] = []
    if on_progress is not None:
        on_progress(0, n)
    for index, path in enumerate(listing.files):
        data = _read_file(path)
        digests.append(hashlib.sha256(data).digest())
        pixels = _decode(data, path=path, resolution=resolution, max_image_pixels=max_image_pixels)
        images[index] = torch.from_numpy(pixels)
        del data, pixels
        if on_progress is not None:
            on_progress(index + 1, n)

    # Counts only: n is public; statistics of the images themselves (sizes, how many were
    # upscaled) are not, so they stay out of the log.
    logger.info(
        "Loaded %d private images at %dx%d (%d other files skipped).",
        n,
        resolution,
        resolution,
        listing.skipped,
    )
    return PrivateImages(images=images, count=n, fingerprint=_combine(digests))


def folder_fingerprint(folder: Path) -> str:
    """The fingerprint ``load_image_folder`` gives for this folder's current contents.

    ``"sha256:"`` + hex SHA-256 of the concatenated, sorted SHA-256 digests of the raw
    bytes of each image file (selected as ``load_image_folder`` selects them). Independent
    of file names, file order and loading parameters; changes with any byte of any image.
    Hashes the files without decoding them (cheap enough for ComfyUI's IS_CHANGED).

    Raises:
        ImageFolderError: the folder is missing, not a folder, or holds no image file.
    """
    listing = _list_image_files(Path(folder))
    digests = []
    for path in listing.files:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                for block in iter(lambda f=file: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise ImageFolderError(
                f"cannot read image file '{path.name}' in {folder}: {error}"
            ) from error
        digests.append(digest.digest())
    return _combine(digests)


def _combine(digests: Sequence[bytes]) -> str:
    combined = hashlib.sha256()
    for digest in sorted(digests):
        combined.update(digest)
    return "sha256:" + combined.hexdigest()


def _check_resolution(resolution: int) -> None:
    if (
        not isinstance(resolution, int)
        or isinstance(resolution, bool)
        or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
        or resolution % RESOLUTION_MULTIPLE
    ):
        raise InvalidParameterError(
            f"resolution must be a multiple of {RESOLUTION_MULTIPLE} between {MIN_RESOLUTION} "
            f"and {MAX_RESOLUTION} (Stable Diffusion latents are 1/8 of the image side), "
            f"got resolution={resolution!r}."
        )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {name}={value!r}.")


def _is_hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name != "nt":
        return False
    # Windows marks hidden files with an attribute rather than a leading dot.
    try:
        attributes = entry.stat(follow_symlinks=False).st_file_attributes
    except OSError:
        return False
    return bool(attributes & stat.FILE_ATTRIBUTE_HIDDEN)


def _list_image_files(folder: Path) -> _Listing:
    if not folder.exists():
        raise ImageFolderError(f"the image folder {folder} does not exist.")
    if not folder.is_dir():
        raise ImageFolderError(
            f"{folder} is a file, not a folder: give the folder that holds the private images."
        )
    files: list[Path] = []
    skipped = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_hidden(entry):
                    skipped += 1
                elif (
                    os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                    and entry.is_file()  # follows symlinks; excludes folders, pipes, devices
                ):
                    files.append(Path(entry.path))
                else:
                    skipped += 1
    except OSError as error:
        raise ImageFolderError(f"cannot list the image folder {folder}: {error}") from error
    if not files:
        raise ImageFolderError(
            f"the image folder {folder} holds no image files (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {skipped} other or hidden entries)."
        )
    files.sort(key=lambda path: path.name)
    return _Listing(files=tuple(files), skipped=skipped)


def _read_file(path: Path) -> bytes:
    # The bytes that are hashed are the bytes that are decoded: no window for the file to
    # change between the fingerprint and the pixels.
    try:
        return path.read_bytes()
    except OSError as error:
        raise ImageFolderError(
            f"cannot read image file '{path.name}' in {path.parent}: {error}"
        ) from error


def _decode(data: bytes, *, path: Path, resolution: int, max_image_pixels: int) -> np.ndarray:
    """Decode one file to a float32 (R, R, 3) array in [0, 1]."""
    name = path.name

    def refuse(reason: str) -> ImageFolderError:
        return ImageFolderError(f"cannot load image file '{name}' in {path.parent}: {reason}")

    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between its limit and twice its limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        with image:
            width, height = image.size
            if width * height > max_image_pixels:
                raise refuse(
                    f"{width}x{height} = {width * height} pixels is more than "
                    f"max_image_pixels={max_image_pixels}."
                )
            # JPEG only: decode at the smallest 1/2^k scale that still covers R x R. The
            # whole stream is still decoded, so truncation is still detected.
            image.draft(None, (resolution, resolution))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            pixels = _to_square_rgb(image, resolution=resolution)
    except (ImageFolderError, MemoryError):
        raise
    except _UnsupportedImage as error:
        raise refuse(str(error)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise refuse(f"it is too large to decode safely ({error}).") from error
    except Image.UnidentifiedImageError as error:
        raise refuse(
            f"it is not a {', '.join(ALLOWED_FORMATS)} image Pillow can read (corrupt, or "
            "another format with an image extension)."
        ) from error
    except Exception as error:
        # Decoders of untrusted files raise many kinds of errors (OSError, SyntaxError,
        # ValueError, zlib.error, struct.error...); all mean "this file cannot be used".
        raise refuse(
            f"{str(error) or type(error).__name__}. The file is damaged or of an unsupported "
            "kind: re-export it or remove it from the folder."
        ) from error
    return pixels


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def _to_square_rgb(image: Image.Image, *, resolution: int) -> np.ndarray:
    box = _centre_box(*image.size)
    size = (resolution, resolution)
    if image.mode in {"I", "F"} or image.mode.startswith("I;16"):
        grey = _high_depth_grey(image)
        # Resampled in float so the 16-bit precision survives; Lanczos may ring slightly
        # past the ends of the range.
        resized = np.asarray(grey.resize(size, Image.Resampling.LANCZOS, box=box))
        resized = np.clip(resized, 0.0, 1.0)
        return np.repeat(resized[:, :, None], 3, axis=2).astype(np.float32, copy=False)
    rgb = _flatten_to_rgb(image)
    resized = rgb.resize(size, Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _high_depth_grey(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit single-channel image as a float ("F") image in [0, 1]."""
    values = np.asarray(image)
    if image.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise _UnsupportedImage(
                "a floating-point image must hold values in "
                f"[0, 1], this one spans [{values.min()}, {values.max()}]. Convert it to 8 or "
                "16 bits."
            )
        scaled = values.astype(np.float32)
    else:
        # "I;16*" is 16-bit; Pillow also carries 16-bit data in "I" (32-bit), whose wider
        # range has no agreed meaning, so values outside 16 bits are refused.
        if values.min() < 0 or values.max() > _UINT16_MAX:
            raise _UnsupportedImage(
                "its 32-bit integer values span "
                f"[{values.min()}, {values.max()}], outside the 16-bit range this loader "
                "understands. Convert it to 8 or 16 bits."
            )
        scaled = values.astype(np.float32) / _UINT16_MAX
    return Image.fromarray(np.ascontiguousarray(scaled))


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with any transparency composited on white (before resizing, so colours
    of fully transparent pixels cannot bleed into the result)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
