"""Private image sets for node tests, built the way the loader builds them: the pictures
are written as lossless 8-bit PNG files and read back with ``dp.images.load_image_folder``
(no tensor-backed shortcut exists in the pack, so tests go through the production path)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_SCRATCH: Path | None = None


def _scratch() -> Path:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="dp-adapt-private-sets-"))
        atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
    return _SCRATCH


def quantized(images: torch.Tensor) -> torch.Tensor:
    """``images`` (n, R, R, 3) in [0, 1] as an 8-bit PNG holds them: what the set decodes."""
    return torch.from_numpy(_as_uint8(images)).float() / 255.0


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    """One lossless PNG per row of ``images`` (n, R, R, 3), named in row order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row, pixels in enumerate(_as_uint8(images)):
        path = folder / f"{row:06d}.png"
        Image.fromarray(pixels[..., :3]).save(path)
        paths.append(path)
    return paths


def installation_key_check() -> str | None:
    """The key check value the loader node would attach (the in-process ComfyUI's
    installation key), or None where no ComfyUI is loaded (dp-level tests)."""
    try:
        import folder_paths  # noqa: F401
    except ImportError:
        return None
    from comfyui_dp_adapt.dp.fingerprint import key_check_value
    from comfyui_dp_adapt.nodes.private_images import _installation_key

    return key_check_value(_installation_key())


def private_image_set(
    images: torch.Tensor,
    keys: Sequence[str] | None = None,
    *,
    folder: Path | None = None,
):
    """A PrivateImageSet of the rows of ``images`` (n, R, R, 3), square, R a multiple of 8.

    ``keys``: the ledger keys, one per row (default: fresh random ones, so that no two
    calls share a picture's budget). Rows must differ (the loader keeps one of equal
    pictures); the decoded rows equal ``quantized(images)``.
    """
    from comfyui_dp_adapt.dp.images import load_image_folder
    from comfyui_dp_adapt.dp.private_set import PrivateImageSet

    if images.dim() != 4 or images.shape[1] != images.shape[2]:
        raise ValueError("private_image_set takes square images (n, R, R, 3)")
    folder = folder or _scratch() / uuid.uuid4().hex
    write_pngs(images, folder)
    source = load_image_folder(folder, resolution=int(images.shape[1]))
    if source.count != images.shape[0]:
        raise ValueError("private_image_set needs pairwise different images")
    keys = (
        tuple(keys)
        if keys is not None
        else tuple(f"hmac-sha256:test-{uuid.uuid4().hex}" for _ in range(source.count))
    )
    return PrivateImageSet(source=source, image_keys=keys, key_check=installation_key_check())


def decoded(private, size: int = 16) -> torch.Tensor:
    """Every decoded picture of a private set, (n, R, R, 3): for small test sets only."""
    return torch.cat([batch.pixels for batch in private.batches(size)])
