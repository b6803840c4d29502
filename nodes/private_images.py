"""The "DP Load Private Images" node: a private image folder as one DP_PRIVATE_IMAGES set.

Private per docs/privacy.md §1: the pixels, the file names, and even how many images there
are (add/remove adjacency). Everything an observer of the server sees counts as published,
so this node shows no preview, writes no temporary file, returns no "ui" images, has no
count output, logs nothing that depends on the folder's contents, shows a progress bar of
fixed total, and gives ComfyUI an IS_CHANGED value that is useless for testing membership.

The node reads the folder once, one file at a time, and keeps no pixels: its one output
carries each kept picture's file and pixel digest together with its keyed hash (an HMAC,
RFC 2104, of the SHA-256 of the picture's decoded pixels under a key kept in ComfyUI's user
folder), so the budget ledger can charge every release to every picture in it, and DP nodes
decode the pixels again in batches when they need them. There is no limit on the number of
images. The socket type is the pack's own, so only DP nodes accept it: a core Preview or
Save node cannot be wired to the pixels.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from ..dp.fingerprint import KEY_BYTES, key_check_value, keyed_fingerprint, load_or_create_key
from ..dp.images import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    RESOLUTION_MULTIPLE,
    ImageFolderError,
    check_no_nul,
    folder_fingerprint,
    load_image_folder,
    shown_path,
)
from ..dp.private_set import SOCKET_TYPE, PrivateImageSet
from . import comfy_compat

# Key of this server process's IS_CHANGED values: random, in memory only, never stored.
# ComfyUI writes each node's IS_CHANGED value into the prompt, and SaveImage writes the
# prompt into every PNG it saves. An unkeyed hash of the folder there would let anyone
# holding a saved image test whether a candidate collection is the private one. Under this
# key the value only says "same contents as before in this process" (which is what
# ComfyUI's cache needs) and cannot be linked across server restarts.
_PROCESS_KEY: bytes = secrets.token_bytes(KEY_BYTES)


# The demo's built-in stand-in for a private collection: typing DEMO_FOLDER loads the demo
# world's held-out "dotted" pictures (demo/world.py), painted on first use into
# DEMO_SUBFOLDER of ComfyUI's input directory, so the quick start needs no terminal. They
# are public (the project paints them), the same set run_workflow.py uses.
DEMO_FOLDER = "demo:dotted"
DEMO_SUBFOLDER = "dp_adapt_demo_dotted"
DEMO_IMAGE_COUNT = 100
_DEMO_PARTIAL_PREFIX = f".{DEMO_SUBFOLDER}.partial-"
_STALE_PARTIAL_SECONDS = 3600.0


def demo_folder() -> Path:
    """``DEMO_SUBFOLDER`` of ComfyUI's input directory, painted there if it is not yet.

    Painted atomically: into a hidden sibling folder, then renamed into place, so a folder
    half-painted by a crash is never loaded (it is ignored, and removed once it is stale).
    """
    base = comfy_compat.input_directory().resolve()
    target = base / DEMO_SUBFOLDER
    if target.is_dir():
        return target
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(base)
    from ..demo.world import HELD_OUT_STYLE, write_style_set

    partial = Path(tempfile.mkdtemp(prefix=_DEMO_PARTIAL_PREFIX, dir=base))
    try:
        write_style_set(partial, style=HELD_OUT_STYLE, count=DEMO_IMAGE_COUNT)
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # not a concurrent painter that finished first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _remove_stale_partials(base: Path) -> None:
    """Remove demo folders left half-painted by a crash (older than an hour, so a painter
    still at work in another process keeps its own)."""
    now = time.time()
    for leftover in base.glob(_DEMO_PARTIAL_PREFIX + "*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def resolve_folder(folder: str) -> Path:
    """The folder a user typed: absolute as given, relative to ComfyUI's input directory.

    A relative path must stay inside the input directory once ``..`` and symbolic links are
    resolved, so a workflow cannot reach elsewhere by a path that looks local.
    ``DEMO_FOLDER`` is the demo's painted collection (``demo_folder``).
    """
    text = folder.strip() if isinstance(folder, str) else ""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()  # as pasted by Windows' "Copy as path"
    if text == DEMO_FOLDER:
        return demo_folder()
    if text.startswith("demo:"):
        raise ImageFolderError(
            f"unknown demo collection folder='{shown_path(text)}': the demo has one, "
            f"'{DEMO_FOLDER}'. Give that, or a folder of your own images."
        )
    if not text:
        raise ImageFolderError(
            "folder is empty: give a folder inside ComfyUI's input directory "
            "(e.g. my_private_images) or an absolute path."
        )
    check_no_nul(text)
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise ImageFolderError(
            f"cannot expand '~' in folder='{shown_path(text)}': no such user's home folder. "
            "Give the full path."
        ) from None
    if path.is_absolute():
        return path
    base = comfy_compat.input_directory().resolve()
    try:
        resolved = (base / path).resolve()
    except RuntimeError:
        # Python < 3.13 raises RuntimeError (some versions RecursionError) on a link loop.
        raise ImageFolderError(
            f"folder='{shown_path(text)}' is a symbolic-link loop (links that lead back to "
            "each other). Give the real folder."
        ) from None
    except OSError as error:
        raise ImageFolderError(
            f"cannot resolve folder='{shown_path(text)}': {error.strerror or type(error).__name__}."
        ) from None
    if resolved != base and base not in resolved.parents:
        raise ImageFolderError(
            f"folder='{shown_path(text)}' leads outside ComfyUI's input directory "
            f"{shown_path(base)} (through '..' or a symbolic link). Give a folder inside it, "
            "or an absolute path."
        )
    return resolved


class DPLoadPrivateImagesNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = (SOCKET_TYPE,)
    RETURN_NAMES = ("private_images",)
    OUTPUT_TOOLTIPS = (
        "The private images (read, not yet decoded) with one keyed hash per picture of their "
        "decoded pixels (the budget ledger charges each release to each picture). Connects only to DP nodes: core Preview and Save nodes cannot "
        "take this socket, which keeps the pixels private. How many images there are is "
        "private too and is shown nowhere.",
    )
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a folder of private images (png, jpg, webp, bmp, tiff, gif) for a DP node: "
        "each image is centre-cropped to a square and resized when a DP node uses it. A "
        "re-saved copy with the same pixels (other format, metadata or name) is the same "
        "picture, and exact duplicates count once. Its output connects only to DP nodes. No "
        "previews, no temporary files, no count: file names and the number of images are "
        "never logged or output. Re-runs when the folder's files change."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (
                    "STRING",
                    {
                        "default": "dp_private_images",
                        "tooltip": "Folder of private images: a path inside ComfyUI's input "
                        "directory, or an absolute path. Sub-folders and hidden files are ignored. "
                        f"'{DEMO_FOLDER}' is the demo's built-in collection: {DEMO_IMAGE_COUNT} "
                        "public pictures of the demo world's dotted style that stand in for a "
                        "private collection, painted on first use into the input folder "
                        f"{DEMO_SUBFOLDER}/ and then loaded like any private folder.",
                    },
                ),
                "resolution": (
                    "INT",
                    {
                        "default": 512,
                        "min": MIN_RESOLUTION,
                        "max": MAX_RESOLUTION,
                        "step": RESOLUTION_MULTIPLE,
                        "tooltip": "Side of the square each image is cropped and resized to: 512 for "
                        "SD1.x, 768 for SD2.x-v, 1024 for SDXL. A multiple of 8.",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, folder, resolution):
        # ComfyUI re-runs the node when this value changes, and publishes it (see
        # _PROCESS_KEY): an HMAC-SHA256 under the process key of the folder's content
        # fingerprint and the resolution. On an unusable folder, a fresh NaN makes it run, so
        # that load() reports the problem (any failure here is re-raised there). Fresh, not
        # math.nan: ComfyUI compares lists of these values, and list equality treats one
        # object as equal to itself even when it is NaN.
        try:
            content = folder_fingerprint(resolve_folder(folder))
        except Exception:
            return float("nan")
        message = f"{content}\n{resolution}".encode()
        return "hmac-sha256:" + hmac.new(_PROCESS_KEY, message, hashlib.sha256).hexdigest()

    def load(self, folder, resolution):
        path = resolve_folder(folder)
        key = _installation_key()
        # One step of a fixed, public total: a per-file bar would publish the count.
        progress = comfy_compat.progress_bar(1)
        loaded = load_image_folder(
            path, resolution=resolution, check_cancelled=comfy_compat.raise_if_cancelled
        )
        image_keys = tuple(keyed_fingerprint(d, key) for d in loaded.pixel_digests)
        progress.update_absolute(1, 1)
        return (
            PrivateImageSet(source=loaded, image_keys=image_keys, key_check=key_check_value(key)),
        )


def _installation_key() -> bytes:
    """This installation's fingerprint key (``dp/fingerprint.py``), in ComfyUI's user folder."""
    return load_or_create_key(comfy_compat.user_directory() / "dp_adapt" / "fingerprint.key")


NODE_CLASS_MAPPINGS = {"DPAdaptLoadPrivateImages": DPLoadPrivateImagesNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptLoadPrivateImages": "DP Load Private Images"}
