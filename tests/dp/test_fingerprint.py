"""Keyed fingerprints: stable per installation, untestable without the key."""

from __future__ import annotations

import os
import stat

import pytest

from comfyui_dp_adapt.dp.errors import DpAdaptError
from comfyui_dp_adapt.dp.fingerprint import keyed_fingerprint, load_or_create_key


def test_key_is_created_once_private_and_reused(tmp_path):
    path = tmp_path / "dp" / "fingerprint.key"
    first = load_or_create_key(path)
    assert len(first) == 32
    assert load_or_create_key(path) == first
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_different_installations_give_unrelated_fingerprints(tmp_path):
    a = load_or_create_key(tmp_path / "a.key")
    b = load_or_create_key(tmp_path / "b.key")
    content = "sha256:" + "ab" * 32
    assert keyed_fingerprint(content, a) == keyed_fingerprint(content, a)
    assert keyed_fingerprint(content, a) != keyed_fingerprint(content, b)
    assert keyed_fingerprint(content, a) != keyed_fingerprint("sha256:" + "ac" * 32, a)
    assert "ab" * 32 not in keyed_fingerprint(content, a)


def test_damaged_key_is_refused_not_replaced(tmp_path):
    path = tmp_path / "fingerprint.key"
    path.write_bytes(b"short")
    with pytest.raises(DpAdaptError, match="damaged"):
        load_or_create_key(path)
    assert path.read_bytes() == b"short"


def test_fingerprint_is_rfc2104_hmac_of_the_content_digest_not_the_digest(tmp_path):
    import hashlib
    import hmac

    key = load_or_create_key(tmp_path / "fingerprint.key")
    content = "sha256:" + hashlib.sha256(b"one private image").hexdigest()
    keyed = keyed_fingerprint(content, key)
    assert keyed == "hmac-sha256:" + hmac.new(key, content.encode(), hashlib.sha256).hexdigest()
    assert content.split(":", 1)[1] not in keyed
    assert keyed != "hmac-sha256:" + hashlib.sha256(content.encode()).hexdigest()


def test_concurrent_first_use_gives_one_whole_key(tmp_path):
    # Two prompts may reach a fresh installation at once: none may read a half-written key.
    from concurrent.futures import ThreadPoolExecutor

    for trial in range(30):
        path = tmp_path / str(trial) / "fingerprint.key"
        with ThreadPoolExecutor(max_workers=8) as pool:
            keys = set(pool.map(lambda _, p=path: load_or_create_key(p), range(16)))
        assert keys == {path.read_bytes()}
        assert list(path.parent.iterdir()) == [path], "no temporary file is left behind"


# --- keys of pictures: the keyed pixel digest (docs/privacy.md §1, §7) ----------------------


def _picture_key(path, key: bytes) -> str:
    """The ledger key the loader gives the picture in ``path``."""
    from comfyui_dp_adapt.dp.images import load_image_folder

    (digest,) = load_image_folder(path.parent, resolution=64).pixel_digests
    return keyed_fingerprint(digest, key)


def _save(folder, name, pixels, **options):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name, **options)
    return folder / name


def test_a_resaved_picture_keeps_its_key_and_one_changed_pixel_does_not(tmp_path):
    """The audit's finding: a picture re-saved with other PNG compression, a text chunk, a
    new name, or as lossless WebP / TIFF / BMP got a fresh key (and a fresh budget)."""
    import numpy as np
    from PIL import PngImagePlugin

    key = load_or_create_key(tmp_path / "fingerprint.key")
    pixels = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "an editor")
    copies = [
        _save(tmp_path / "original", "photo.png", pixels, compress_level=6),
        _save(tmp_path / "level0", "photo.png", pixels, compress_level=0),
        _save(tmp_path / "text", "photo.png", pixels, pnginfo=text),
        _save(tmp_path / "renamed", "IMG_0001 final.png", pixels),
        _save(tmp_path / "webp", "photo.webp", pixels, lossless=True),
        _save(tmp_path / "tiff", "photo.tif", pixels),
        _save(tmp_path / "bmp", "photo.bmp", pixels),
    ]
    # Every copy's bytes differ, but for the renamed one (same bytes, another name).
    assert len({path.read_bytes() for path in copies}) == len(copies) - 1
    keys = {_picture_key(path, key) for path in copies}
    assert len(keys) == 1
    (only,) = keys
    assert only.startswith("hmac-sha256:")
    changed = pixels.copy()
    changed[10, 20, 2] ^= 4
    assert _picture_key(_save(tmp_path / "changed", "photo.png", changed), key) != only
    other_install = load_or_create_key(tmp_path / "other.key")
    assert _picture_key(copies[0], other_install) != only


def test_an_exif_orientation_chunk_and_the_rotated_pixels_give_one_key(tmp_path):
    import numpy as np
    from PIL import Image

    key = load_or_create_key(tmp_path / "fingerprint.key")
    stored = np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated 90 degrees counter-clockwise
    tagged = _save(tmp_path / "tagged", "a.png", stored, exif=exif.tobytes())
    rotated = _save(tmp_path / "rotated", "a.png", np.rot90(stored).copy())
    assert _picture_key(tagged, key) == _picture_key(rotated, key)


def test_the_key_check_value_is_an_hmac_of_a_public_message_and_differs_per_key(tmp_path):
    import hashlib
    import hmac

    from comfyui_dp_adapt.dp.fingerprint import KEY_CHECK_MESSAGE, key_check_value

    a = load_or_create_key(tmp_path / "a.key")
    b = load_or_create_key(tmp_path / "b.key")
    assert KEY_CHECK_MESSAGE == b"comfyui-dp-adapt key check"
    assert key_check_value(a) == hmac.new(a, KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()
    assert key_check_value(a) == key_check_value(load_or_create_key(tmp_path / "a.key"))
    assert key_check_value(a) != key_check_value(b)
    assert a.hex() not in key_check_value(a)


def test_a_key_path_that_is_a_folder_gives_a_clear_error(tmp_path):
    path = tmp_path / "dp_adapt" / "fingerprint.key"
    path.mkdir(parents=True)
    with pytest.raises(DpAdaptError) as error:
        load_or_create_key(path)
    message = str(error.value)
    assert str(path) in message and "is a folder" in message and "backup" in message
    assert path.is_dir() and not any(path.iterdir()), "left as found"


def test_an_unreadable_key_file_gives_a_clear_error(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    path = tmp_path / "fingerprint.key"
    load_or_create_key(path)

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DpAdaptError, match=r"cannot be used \(Permission denied"):
        load_or_create_key(path)
