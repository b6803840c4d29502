"""Reading a folder of private images, one picture at a time (docs/privacy.md §1).

Under add/remove adjacency everything about the folder is private: the images, their file
names, which file is which, and even HOW MANY there are. This module therefore:

- never writes anything to disk (no caches, thumbnails or temporary files);
- reports no progress and logs nothing that depends on the folder's contents: no file
  names, no count of images or of skipped files;
- has no limit on the number of images and no behaviour that depends on it: the folder is
  streamed, one file in memory at a time, and pixels are decoded again, in batches of a
  size the caller chooses, when a DP node needs them (``PrivateImages.batches``);
- names the broken file in an ``ImageFolderError`` message, with the rule it broke and
  nothing measured from it (no size, no pixel value). That message goes to the user who
  queued the prompt (ComfyUI shows it, and prints it to its own console) before any
  release, and without the name the curator cannot find the file to fix it. Nothing here
  puts a name into an output, a log line, file metadata or the ledger;
- shows any path in a message shortened to about 200 characters (``shown_path``), so a
  pasted 5,000-character path cannot flood the user's screen or the server's log.

The unit of privacy is one picture as decoded pixels (docs/privacy.md §1). Each kept
picture's pixel digest (``"sha256:<hex>"`` of ``canonical_pixels``: the oriented,
mode-converted pixels, before any crop or resize) is returned with its path: the budget
ledger charges every release to every picture in it (keyed, see ``dp/fingerprint.py``), so
it protects people rather than folders. The digest depends on the pixels alone, so a
lossless re-save, other metadata, another lossless format or a new file name is the same
picture; exact duplicates in one folder are kept once (the first in name order). These
digests are exact functions of the private images and carry NO differential-privacy
protection: they never leave the process unkeyed.

Decoding treats every file as untrusted input: the pixel count is checked from the header
before any decoding (decompression bombs), every image is fully decoded (truncated files
are refused), and only a fixed set of decoders may run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .display import MAX_SHOWN_PATH, shown_path
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
DIGEST_PREFIX = "sha256:"
# Kinds of canonical pixels (``canonical_pixels``), hashed ahead of the pixel bytes.
_RGB_KIND = b"rgb-uint8"
_GREY_KIND = b"grey-float32le"

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MAX = 65535.0


class ImageFolderError(DpAdaptError):
    """The private image folder, or a file in it, cannot be loaded."""


class _UnsupportedImage(Exception):
    """A decoded image whose pixel values this loader will not guess a meaning for."""


@dataclass(frozen=True)
class ImageBatch:
    """Rows ``start`` to ``start + len(pixels)`` of a private set, decoded.

    Attributes:
        start: the first row's index.
        pixels: float32 (b, R, R, 3) in [0, 1], ComfyUI's IMAGE layout.
    """

    start: int
    pixels: torch.Tensor = field(repr=False)

    @property
    def stop(self) -> int:
        return self.start + int(self.pixels.shape[0])


@dataclass(frozen=True, eq=False, repr=False)
class PrivateImages:
    """A read private folder: per kept picture its file and pixel digest, NOT its pixels.

    Everything in it is private, including its length. Memory is a few hundred bytes per
    picture; pixels come from ``batches``, which decodes the files again on demand.

    Attributes:
        resolution: side R of the square each picture is cropped and resized to.
        paths: the kept files, in sorted file-name order (exact pixel duplicates dropped).
        pixel_digests: ``"sha256:<hex>"`` of each file's ``canonical_pixels``, row for row.
            Unkeyed: key them (``dp/fingerprint.py``) before they leave the process.
        max_image_pixels: the pixel limit the files were read under.
    """

    resolution: int
    paths: tuple[Path, ...] = field(repr=False)
    pixel_digests: tuple[str, ...] = field(repr=False)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @property
    def count(self) -> int:
        """n, the number of pictures. Private (add/remove adjacency): never publish it."""
        return len(self.paths)

    def batches(
        self, size: int, *, check_cancelled: Callable[[], None] | None = None
    ) -> Iterator[ImageBatch]:
        """The pictures in order, ``size`` rows at a time (the last batch may be shorter).

        Each file is read and decoded again, cropped to its centre square and resized to R
        with Lanczos filtering; its pixel digest is checked against the one taken when the
        folder was read, so the pixels used are the pixels the ledger was charged for. At
        most ``size`` pictures are in memory at once: (size, R, R, 3) float32.

        Raises:
            ImageFolderError: a file was changed, removed or damaged since it was read
                (the message names that file and asks to queue the prompt again).
        """
        _check_positive("size", size)
        for start in range(0, self.count, size):
            rows = range(start, min(start + size, self.count))
            pixels = torch.empty((len(rows), self.resolution, self.resolution, 3))
            with _quiet_decoding():
                for offset, row in enumerate(rows):
                    if check_cancelled is not None:
                        check_cancelled()
                    pixels[offset] = torch.from_numpy(self._decode_row(row))
            yield ImageBatch(start=start, pixels=pixels)

    def _decode_row(self, row: int) -> np.ndarray:
        path = self.paths[row]
        changed = ImageFolderError(
            f"image file {_shown_file(path)} changed since DP Load Private Images read it "
            "(edited, replaced, removed or damaged); queue the prompt again."
        )
        try:
            data = path.read_bytes()
            image = canonical_pixels(data, path=path, max_image_pixels=self.max_image_pixels)
        except (OSError, ImageFolderError):
            raise changed from None
        with image:
            if pixel_digest(image) != self.pixel_digests[row]:
                raise changed
            return _to_square(image, resolution=self.resolution)

    def __repr__(self) -> str:
        return "PrivateImages(<private>)"

    __str__ = __repr__


def load_image_folder(
    folder: Path,
    *,
    resolution: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check_cancelled: Callable[[], None] | None = None,
) -> PrivateImages:
    """Read every image file of ``folder`` (not sub-folders) once, keeping no pixels.

    Files are taken by extension (png, jpg/jpeg, webp, bmp, tif/tiff, gif: first frame),
    in sorted name order; hidden files, other extensions and entries that cannot be
    examined (dangling or looping symbolic links) are skipped. Each file is read, fully
    decoded and checked (``canonical_pixels``), its pixel digest taken, and its pixels
    dropped: memory does not grow with the number of files beyond their paths and digests,
    and no count is limited. A file whose pixels equal an earlier file's (same digest) is
    one picture, kept once. ``PrivateImages.batches`` later decodes the pixels again:
    EXIF orientation applied, RGB (transparency composited on white) or 16-bit/float
    greyscale, centre-cropped to a square and resized to ``resolution`` (Lanczos).

    Args:
        folder: the folder to read.
        resolution: side R of the square output, a multiple of 8 in [64, 2048].
        max_image_pixels: refuse any image with more pixels than this, read from the header
            before decoding. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) still
            applies on top of it.
        check_cancelled: called before each file is read; it may raise to cancel. No
            progress is reported: how far the loop has got reveals how many files there are.

    Raises:
        InvalidParameterError: a parameter is out of range.
        ImageFolderError: the folder path is unusable (missing, not a folder, a symbolic-link
            loop, too long, with a NUL character, not listable), the folder holds no image,
            or one of its images is unreadable, truncated, too large or of an unsupported
            kind.
    """
    _check_resolution(resolution)
    _check_positive("max_image_pixels", max_image_pixels)
    files = _list_image_files(Path(folder))
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another package switched this Pillow-wide flag on; it is not ours to switch off
        # (that would race with its users), so truncated files can go undetected.
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by another package: truncated "
            "private images cannot be detected."
        )

    paths: list[Path] = []
    digests: list[str] = []
    seen: set[str] = set()
    with _quiet_decoding():
        for path in files:
            if check_cancelled is not None:
                check_cancelled()
            data = _read_file(path)
            with canonical_pixels(data, path=path, max_image_pixels=max_image_pixels) as image:
                digest = pixel_digest(image)
            del data
            if digest in seen:
                continue  # the same picture again: one contribution (docs/privacy.md §1)
            seen.add(digest)
            paths.append(path)
            digests.append(digest)

    # Public values only: the count of images or of skipped files is private, and so are
    # statistics of the images themselves (sizes, how many were upscaled).
    logger.info("Read the private image folder for %dx%d.", resolution, resolution)
    return PrivateImages(
        resolution=resolution,
        paths=tuple(paths),
        pixel_digests=tuple(digests),
        max_image_pixels=max_image_pixels,
    )


def pixel_digest(image: Image.Image) -> str:
    """``"sha256:<hex>"`` of a canonical serialisation of ``canonical_pixels``' result.

    Hashed: the kind (8-bit RGB or float32 greyscale), width and height (two little-endian
    32-bit integers), then the raw pixel bytes, row by row (RGB interleaved; float32
    little-endian). Two files give the same digest exactly when they decode to the same
    oriented pixels, whatever their format, compression, metadata or name.
    """
    if image.mode == "F":
        kind, raw = _GREY_KIND, np.asarray(image, dtype="<f4").tobytes()
    elif image.mode == "RGB":
        kind, raw = _RGB_KIND, image.tobytes()
    else:
        raise InvalidParameterError(
            f"pixel_digest takes canonical pixels (mode RGB or F), got mode {image.mode!r}."
        )
    digest = hashlib.sha256(kind + b"\0" + struct.pack("<II", *image.size))
    digest.update(raw)
    return DIGEST_PREFIX + digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """A fingerprint of this folder's current image FILES, for ComfyUI's IS_CHANGED only.

    ``"sha256:"`` + hex SHA-256 of the concatenated, sorted SHA-256 digests of the raw
    bytes of each image file (selected as ``load_image_folder`` selects them). Independent
    of file names, file order and loading parameters; changes with any byte of any image
    file, and with a file added or removed. Hashes the files without decoding them (cheap
    enough for IS_CHANGED, which only has to notice that something changed; the ledger keys
    pictures by their pixels instead). Unkeyed, so a membership oracle: never publish it.

    Raises:
        ImageFolderError: the folder path is unusable, or it holds no image file, or one
            of them cannot be read.
    """
    digests = []
    for path in _list_image_files(Path(folder)):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                for block in iter(lambda f=file: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise _unreadable_file(path, error) from None
        digests.append(digest.digest())
    return _combine(digests)


def check_no_nul(path: object) -> None:
    """Refuse a path with a NUL character, which no file system allows (and which Python's
    file functions reject with a bare ValueError)."""
    if "\x00" in str(path):
        raise ImageFolderError(
            f"the folder path {shown_path(path)} contains a NUL character (\\x00), which no "
            "file system allows. Retype the path."
        )


_decoding = threading.local()


class _DropWhileDecoding(logging.Filter):
    """Drops Pillow's log records emitted by a thread while it decodes private images."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_decoding, "active", False)


_DROP_WHILE_DECODING = _DropWhileDecoding()


@contextlib.contextmanager
def _quiet_decoding() -> Iterator[None]:
    """Silence Pillow while this thread decodes private images.

    At DEBUG level Pillow logs every chunk of every file (e.g. ``STREAM b'IDAT' 41 20819``),
    and it warns about some files: either would publish how many files there are and facts
    about their contents to the server's log. A filter on each Pillow logger (a filter on
    the parent "PIL" logger does not see its children's records) drops their records from
    this thread only; Pillow's warnings are ignored meanwhile (``_decode`` still turns a
    decompression-bomb warning into a refusal).
    """
    Image.init()  # imports every format plugin, so every Pillow logger exists now
    for name, item in list(logging.root.manager.loggerDict.items()):
        if (
            (name == "PIL" or name.startswith("PIL."))
            and isinstance(item, logging.Logger)
            and _DROP_WHILE_DECODING not in item.filters
        ):
            item.addFilter(_DROP_WHILE_DECODING)
    _decoding.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _decoding.active = False


def _combine(digests: Iterable[bytes]) -> str:
    combined = hashlib.sha256()
    for digest in sorted(digests):
        combined.update(digest)
    return DIGEST_PREFIX + combined.hexdigest()


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


def _folder_error(folder: Path, error: OSError) -> ImageFolderError:
    """A readable message for an OSError met while opening or listing ``folder``."""
    shown = shown_path(folder)
    code = error.errno
    if code == errno.ENOENT:
        reason = f"the image folder {shown} does not exist."
    elif code == errno.ENOTDIR:
        reason = f"a part of the folder path {shown} is a file, not a folder."
    elif code == errno.ELOOP:
        reason = (
            f"the image folder path {shown} is a symbolic-link loop (links that lead back to "
            "each other). Give the real folder."
        )
    elif code == errno.ENAMETOOLONG:
        reason = (
            f"the image folder path is too long for the file system ({len(str(folder))} "
            f"characters): {shown}"
        )
    elif code in (errno.EACCES, errno.EPERM):
        reason = (
            f"ComfyUI has no permission to read the image folder {shown}. Allow the user "
            "running ComfyUI to list it."
        )
    else:
        reason = f"cannot open the image folder {shown}: {error.strerror or type(error).__name__}."
    return ImageFolderError(reason)


def _list_image_files(folder: Path) -> tuple[Path, ...]:
    # Every failure becomes an ImageFolderError raised "from None": the OSError's own text
    # repeats the whole path, however long, in ComfyUI's console traceback.
    check_no_nul(folder)
    try:
        info = os.stat(folder)
    except OSError as error:
        raise _folder_error(folder, error) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ImageFolderError(
            f"{shown_path(folder)} is a file, not a folder: give the folder that holds the "
            "private images."
        )
    files: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_hidden(entry):
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    # Follows symbolic links; excludes folders, pipes and devices.
                    is_file = entry.is_file()
                except OSError:
                    is_file = False  # a looping link: skipped like a dangling one
                if is_file:
                    files.append(Path(entry.path))
    except OSError as error:
        raise _folder_error(folder, error) from None
    if not files:
        # No count of other entries: what else the folder holds is the user's business.
        raise ImageFolderError(
            f"the image folder {shown_path(folder)} holds no image files (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; hidden files are ignored)."
        )
    files.sort(key=lambda path: path.name)
    return tuple(files)


def _shown_file(path: Path) -> str:
    half = MAX_SHOWN_PATH // 2
    return f"'{shown_path(path.name, half)}' in {shown_path(path.parent, half)}"


def _unreadable_file(path: Path, error: OSError) -> ImageFolderError:
    return ImageFolderError(
        f"cannot read image file {_shown_file(path)}: {error.strerror or type(error).__name__}."
    )


def _read_file(path: Path) -> bytes:
    # The bytes that are hashed are the bytes that are decoded: no window for the file to
    # change between the digest and the pixels.
    try:
        return path.read_bytes()
    except OSError as error:
        raise _unreadable_file(path, error) from None


def canonical_pixels(data: bytes, *, path: Path, max_image_pixels: int) -> Image.Image:
    """Decode one file's bytes to the picture the privacy unit is defined on.

    Fully decoded (truncation is detected), EXIF orientation applied, then either 8-bit RGB
    with any transparency composited on white (mode "RGB"), or, for 16-bit and 32-bit
    single-channel files, float greyscale in [0, 1] (mode "F"). No crop, no resize, at full
    size: what ``pixel_digest`` hashes and ``_to_square`` resizes. (No reduced-scale JPEG
    "draft" decoding either: the digest must not depend on the loading resolution.)

    Raises:
        ImageFolderError: naming the file and the rule it broke; nothing measured from its
            pixels (no size, no value) is in the message.
    """

    def refuse(reason: str) -> ImageFolderError:
        return ImageFolderError(f"cannot load image file {_shown_file(path)}: {reason}")

    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between its limit and twice its limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        with image:
            width, height = image.size
            if width * height > max_image_pixels:
                # The limit is public; the image's own size is not (docs/privacy.md §1).
                raise refuse(
                    f"its header gives more pixels than max_image_pixels={max_image_pixels}. "
                    "Downscale it or raise the limit."
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode in {"I", "F"} or image.mode.startswith("I;16"):
                return _high_depth_grey(image)
            return _flatten_to_rgb(image)
    except (ImageFolderError, MemoryError):
        raise
    except _UnsupportedImage as error:
        raise refuse(str(error)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own text gives the image's pixel count: measured, so left out.
        raise refuse(
            "it is too large to decode safely (over Pillow's decompression-bomb limit, "
            "PIL.Image.MAX_IMAGE_PIXELS)."
        ) from None
    except Image.UnidentifiedImageError:
        raise refuse(
            f"it is not a {', '.join(ALLOWED_FORMATS)} image Pillow can read (corrupt, or "
            "another format with an image extension)."
        ) from None
    except Exception as error:
        # Decoders of untrusted files raise many kinds of errors (OSError, SyntaxError,
        # ValueError, zlib.error, struct.error...); all mean "this file cannot be used".
        raise refuse(
            f"{_decoder_reason(error)}. The file is damaged or of an unsupported kind: "
            "re-export it or remove it from the folder."
        ) from None


def _decoder_reason(error: Exception) -> str:
    """A decoder's error text without what it measured from the file: details in brackets
    ("image file is truncated (3 bytes not processed)") are dropped, and a text that still
    holds a number (a size, an offset, a value) gives way to the error's type."""
    text = re.sub(r"\s*[(\[][^)\]]*[)\]]", "", str(error)).strip()
    if not text or re.search(r"\d", text):
        return f"the decoder failed ({type(error).__name__})"
    return shown_path(text)


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def _to_square(image: Image.Image, *, resolution: int) -> np.ndarray:
    """``canonical_pixels``' result centre-cropped and resized: float32 (R, R, 3) in [0, 1]."""
    box = _centre_box(*image.size)
    size = (resolution, resolution)
    if image.mode == "F":
        # Resampled in float so the 16-bit precision survives; Lanczos may ring slightly
        # past the ends of the range.
        resized = np.asarray(image.resize(size, Image.Resampling.LANCZOS, box=box))
        resized = np.clip(resized, 0.0, 1.0)
        return np.repeat(resized[:, :, None], 3, axis=2).astype(np.float32, copy=False)
    resized = image.resize(size, Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _high_depth_grey(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit single-channel image as a float ("F") image in [0, 1]."""
    values = np.asarray(image)
    if image.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            # Which values, and how far out, are measured from the image: not shown.
            raise _UnsupportedImage(
                "a floating-point image must hold finite values in [0, 1], and this one does "
                "not. Convert it to 8 or 16 bits."
            )
        scaled = values.astype(np.float32)
    else:
        # "I;16*" is 16-bit; Pillow also carries 16-bit data in "I" (32-bit), whose wider
        # range has no agreed meaning, so values outside 16 bits are refused.
        if values.min() < 0 or values.max() > _UINT16_MAX:
            raise _UnsupportedImage(
                "its 32-bit integer values are not all in the 16-bit range [0, 65535] this "
                "loader understands. Convert it to 8 or 16 bits."
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
