"""The "DP Load Private Images" node: a private image folder as one IMAGE batch.

Private per DP_SPEC section 1: the pixels and the file names. This node shows no preview,
writes no temporary file and returns no "ui" images; it logs counts only. Its outputs are
the batch (for DP nodes only), n (public) and the dataset's fingerprint (the ledger's
key): a keyed hash (HMAC) of the files' contents under a key kept in ComfyUI's user folder,
so nobody without that key can test a candidate collection against it.
"""

from __future__ import annotations

from pathlib import Path

from ..dp.images import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    RESOLUTION_MULTIPLE,
    ImageFolderError,
    folder_fingerprint,
    load_image_folder,
)
from . import comfy_compat


def resolve_folder(folder: str) -> Path:
    """The folder a user typed: absolute as given, relative to ComfyUI's input directory.

    A relative path must stay inside the input directory once ``..`` and symbolic links are
    resolved, so a workflow cannot reach elsewhere by a path that looks local.
    """
    text = folder.strip() if isinstance(folder, str) else ""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()  # as pasted by Windows' "Copy as path"
    if not text:
        raise ImageFolderError(
            "folder is empty: give a folder inside ComfyUI's input directory "
            "(e.g. my_private_images) or an absolute path."
        )
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    base = comfy_compat.input_directory().resolve()
    resolved = (base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ImageFolderError(
            f"folder={folder!r} leads outside ComfyUI's input directory {base} (through '..' "
            "or a symbolic link). Give a folder inside it, or an absolute path."
        )
    return resolved


class DPLoadPrivateImagesNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("images", "dataset_size", "fingerprint")
    OUTPUT_TOOLTIPS = (
        "The private images as one batch (n, resolution, resolution, 3). Connect it ONLY to "
        "DP nodes: anything else (preview, save) leaks the images.",
        "Number of images n. Public under the privacy guarantee; connect it to the DP node.",
        "Fingerprint of the folder's contents (identifies the dataset in the budget ledger): a "
        "keyed hash, testable only with this installation's key. Connect it to the DP node.",
    )
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a folder of private images (png, jpg, webp, bmp, tiff, gif) for a DP node: "
        "each image is centre-cropped to a square and resized. No previews and no temporary "
        "files; file names are never logged or output. Re-runs when the folder's files change."
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
                        "directory, or an absolute path. Sub-folders and hidden files are ignored.",
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
        # ComfyUI re-runs the node when this value changes. On an unusable folder, a fresh NaN
        # makes it run, so that load() reports the problem. Fresh, not math.nan: ComfyUI
        # compares lists of these values, and list equality treats one object as equal to
        # itself even when it is NaN.
        try:
            return folder_fingerprint(resolve_folder(folder))
        except (ImageFolderError, OSError):
            return float("nan")

    def load(self, folder, resolution):
        progress = None

        def on_progress(done: int, total: int) -> None:
            nonlocal progress
            comfy_compat.raise_if_cancelled()
            if progress is None:
                progress = comfy_compat.progress_bar(max(1, total))
            progress.update_absolute(done, total)

        loaded = load_image_folder(
            resolve_folder(folder), resolution=resolution, on_progress=on_progress
        )
        return (loaded.images, loaded.count, published_fingerprint(loaded.fingerprint))


def published_fingerprint(content_fingerprint: str) -> str:
    """The keyed fingerprint (``dp/fingerprint.py``) under this installation's key."""
    from ..dp.fingerprint import keyed_fingerprint, load_or_create_key

    key_path = comfy_compat.user_directory() / "dp_adapt" / "fingerprint.key"
    return keyed_fingerprint(content_fingerprint, load_or_create_key(key_path))


NODE_CLASS_MAPPINGS = {"DPAdaptLoadPrivateImages": DPLoadPrivateImagesNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptLoadPrivateImages": "DP Load Private Images"}
