"""Loading a private image folder: every colour mode, cropping, order, refusals, digests,
and nothing published that depends on the folder's contents."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.images import (
    MAX_SHOWN_PATH,
    ImageFolderError,
    folder_fingerprint,
    load_image_folder,
    shown_path,
)

R = 64
RED, GREEN, BLUE = (220, 30, 40), (30, 200, 60), (40, 50, 210)


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rgb(folder: Path, name: str, seed: int = 0, size=(96, 72)) -> Path:
    path = folder / name
    Image.fromarray(_noise(*size, seed=seed)).save(path)
    return path


def _rgba(folder: Path) -> Path:
    pixels = np.dstack([_noise(96, 72), np.full((72, 96), 128, np.uint8)])
    pixels[:, :48, 3] = 0
    Image.fromarray(pixels).save(folder / "rgba.png")
    return folder / "rgba.png"


def _palette(folder: Path, *, transparent: bool) -> Path:
    image = Image.fromarray(_noise(96, 72)).quantize(colors=16)
    path = folder / ("p_transparent.png" if transparent else "p.png")
    image.save(path, transparency=0) if transparent else image.save(path)
    return path


def _grey(folder: Path) -> Path:
    Image.fromarray(_noise(96, 72)[:, :, 0]).save(folder / "l.png")
    return folder / "l.png"


def _grey_alpha(folder: Path) -> Path:
    Image.fromarray(_noise(96, 72)[:, :, :2], mode="LA").save(folder / "la.png")
    return folder / "la.png"


def _grey16(folder: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (72, 1))
    Image.fromarray(ramp).save(folder / "i16.png")
    return folder / "i16.png"


def _cmyk_jpeg(folder: Path) -> Path:
    Image.fromarray(_noise(96, 72)).convert("CMYK").save(folder / "cmyk.jpg")
    return folder / "cmyk.jpg"


def _rotated_jpeg(folder: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(96, 72)).save(folder / "rotated.jpg", exif=exif.tobytes())
    return folder / "rotated.jpg"


def _other_formats(folder: Path, extension: str) -> Path:
    path = folder / f"image.{extension}"
    Image.fromarray(_noise(96, 72)).save(path)
    return path


# kind -> (the mode Pillow opens the written file in, writer)
WRITERS = {
    "RGB": ("RGB", lambda f: _rgb(f, "rgb.png")),
    "RGBA": ("RGBA", _rgba),
    "P": ("P", lambda f: _palette(f, transparent=False)),
    "P+transparency": ("P", lambda f: _palette(f, transparent=True)),
    "L": ("L", _grey),
    "LA": ("LA", _grey_alpha),
    "I;16": ("I;16", _grey16),
    "CMYK JPEG": ("CMYK", _cmyk_jpeg),
    "EXIF-rotated JPEG": ("RGB", _rotated_jpeg),
    "webp": ("RGB", lambda f: _other_formats(f, "webp")),
    "bmp": ("RGB", lambda f: _other_formats(f, "bmp")),
    "tiff": ("RGB", lambda f: _other_formats(f, "tiff")),
    "gif": ("P", lambda f: _other_formats(f, "gif")),
}


def _assert_image_batch(images: torch.Tensor, n: int) -> None:
    assert images.shape == (n, R, R, 3)
    assert images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_mode_loads_as_comfyui_image_batch(tmp_path, kind):
    mode, writer = WRITERS[kind]
    with Image.open(writer(tmp_path)) as source:
        assert source.mode == mode, "the file really is in the mode under test"
        assert ("transparency" in source.info) == (kind == "P+transparency")
    result = load_image_folder(tmp_path, resolution=R)
    _assert_image_batch(result.images, 1)
    assert result.count == 1
    assert result.images.std() > 0.05, "the content survives, not a flat fill"


@pytest.mark.parametrize("writer", [_rgba, _palette])
def test_transparent_pixels_are_composited_on_white(tmp_path, writer):
    if writer is _palette:
        image = Image.new("P", (80, 80), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.save(tmp_path / "clear.png", transparency=0)
    else:
        Image.new("RGBA", (80, 80), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    images = load_image_folder(tmp_path, resolution=R).images
    torch.testing.assert_close(images, torch.ones_like(images))


def test_sixteen_bit_range_maps_to_unit_interval_without_saturating(tmp_path):
    _grey16(tmp_path)
    images = load_image_folder(tmp_path, resolution=R).images
    assert images.min() < 0.15 and images.max() > 0.85, "the ramp spans the cropped range"
    assert (images >= 1.0).float().mean() < 0.05, "values above 255 must not clip to white"
    assert 0.4 < images.mean() < 0.6
    assert len(torch.unique(images[0, 0, :, 0])) > R // 2


def test_dark_sixteen_bit_image_stays_dark(tmp_path):
    values = np.full((64, 64), 200, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "dark.png")
    images = load_image_folder(tmp_path, resolution=R).images
    torch.testing.assert_close(images, torch.full_like(images, 200 / 65535), atol=1e-4, rtol=0)


def test_float_image_in_unit_range_loads_and_outside_is_refused(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (80, 1))
    Image.fromarray(ramp).save(tmp_path / "float.tiff")
    images = load_image_folder(tmp_path, resolution=R).images
    assert images.min() < 0.05 and images.max() > 0.95
    Image.fromarray(ramp * 300).save(tmp_path / "float.tiff")
    with pytest.raises(ImageFolderError, match=r"float\.tiff.*\[0, 1\]"):
        load_image_folder(tmp_path, resolution=R)


@pytest.mark.parametrize(
    ("size", "extension"), [((400, 100), "png"), ((100, 400), "png"), ((1600, 400), "jpg")]
)
def test_non_square_images_are_centre_cropped(tmp_path, size, extension):
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    long_side = max(size)
    bands = [(0, long_side // 4, RED), (long_side // 4, 3 * long_side // 4, GREEN)]
    bands.append((3 * long_side // 4, long_side, BLUE))
    for start, stop, colour in bands:
        if width > height:
            pixels[:, start:stop] = colour
        else:
            pixels[start:stop, :] = colour
    Image.fromarray(pixels).save(tmp_path / f"banded.{extension}", quality=95)
    images = load_image_folder(tmp_path, resolution=R).images
    expected = torch.tensor(GREEN, dtype=torch.float32) / 255
    tolerance = 2 / 255 if extension == "png" else 6 / 255  # JPEG's own error
    torch.testing.assert_close(images[0], expected.expand(R, R, 3), atol=tolerance, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    # Stored wide: left half red, right half blue. Orientation 6 displays it rotated 90
    # degrees clockwise, so the stored left side becomes the displayed top.
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :64], pixels[:, 64:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = load_image_folder(tmp_path, resolution=R).images[0]
    top, bottom = image[: R // 4].mean(dim=(0, 1)), image[-R // 4 :].mean(dim=(0, 1))
    assert top[0] > top[2] + 0.5, "displayed top is the stored left (red) half"
    assert bottom[2] > bottom[0] + 0.5, "displayed bottom is the stored right (blue) half"


def test_images_come_in_sorted_name_order_deterministically(tmp_path):
    levels = {"b.png": 60, "a.png": 200, "c.png": 120}
    for name, level in levels.items():
        Image.new("L", (70, 70), level).save(tmp_path / name)
    first = load_image_folder(tmp_path, resolution=R)
    means = [float(image.mean()) * 255 for image in first.images]
    assert means == pytest.approx([levels[name] for name in sorted(levels)], abs=1)
    torch.testing.assert_close(load_image_folder(tmp_path, resolution=R).images, first.images)


def test_hidden_and_non_image_entries_are_skipped(tmp_path):
    _rgb(tmp_path, "kept.png")
    _rgb(tmp_path, "ALSO_KEPT.JPG", seed=1)
    _rgb(tmp_path, ".hidden.png", seed=2)
    _rgb(tmp_path, "._appledouble.jpg", seed=3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    _rgb(tmp_path / "folder.png", "nested.png", seed=4)
    try:
        (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    except OSError:
        pass  # no symbolic links here; the rest of the test still holds
    result = load_image_folder(tmp_path, resolution=R)
    assert result.count == 2
    assert result.images.shape[0] == 2


def test_gif_loads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), RED), Image.new("RGB", (80, 80), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image = load_image_folder(tmp_path, resolution=R).images[0]
    assert image[..., 0].mean() > image[..., 2].mean() + 0.5


def test_small_images_are_upscaled_to_the_resolution(tmp_path):
    _rgb(tmp_path, "small.png", size=(20, 30))
    _assert_image_batch(load_image_folder(tmp_path, resolution=R).images, 1)


# --- refusals ---------------------------------------------------------------------------


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", resolution=R)


def test_file_instead_of_folder_is_refused(tmp_path):
    path = _rgb(tmp_path, "one.png")
    with pytest.raises(ImageFolderError, match="not a folder"):
        load_image_folder(path, resolution=R)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageFolderError, match="holds no image files") as caught:
        load_image_folder(tmp_path, resolution=R)
    assert str(tmp_path) in str(caught.value)


def test_random_bytes_with_image_extension_are_refused(tmp_path):
    (tmp_path / "fake.png").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ImageFolderError, match=r"fake\.png.*not a .*image"):
        load_image_folder(tmp_path, resolution=R)


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_truncated_files_are_refused(tmp_path, extension):
    buffer = io.BytesIO()
    Image.fromarray(_noise(256, 256)).save(buffer, format="PNG" if extension == "png" else "JPEG")
    data = buffer.getvalue()
    (tmp_path / f"cut.{extension}").write_bytes(data)
    assert load_image_folder(tmp_path, resolution=R).count == 1, "the whole file loads"
    (tmp_path / f"cut.{extension}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match=rf"cut\.{extension}.*image file is truncated"):
        load_image_folder(tmp_path, resolution=R)


def test_a_pillow_wide_truncation_override_is_warned_about(tmp_path, monkeypatch, caplog):
    _rgb(tmp_path, "a.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    load_image_folder(tmp_path, resolution=R)
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text


def test_pixel_count_above_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    _rgb(tmp_path, "big.png", size=(100, 80))

    def no_decoding(self):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageFolderError, match=r"big\.png.*8000 pixels.*max_image_pixels=7999"):
        load_image_folder(tmp_path, resolution=R, max_image_pixels=7999)


@pytest.mark.parametrize("pillow_limit", [5000, 3000])  # warning range, then error range
def test_pillow_decompression_bomb_check_is_reported(tmp_path, monkeypatch, pillow_limit):
    _rgb(tmp_path, "bomb.png", size=(100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(ImageFolderError, match=r"bomb\.png.*too large to decode safely"):
        load_image_folder(tmp_path, resolution=R)


def test_more_images_than_allowed_are_refused(tmp_path):
    for i in range(3):
        _rgb(tmp_path, f"{i}.png", seed=i)
    with pytest.raises(ImageFolderError, match=r"more than max_images=2") as caught:
        load_image_folder(tmp_path, resolution=R, max_images=2)
    assert "3 image" not in str(caught.value), "the exact count is private"


@pytest.mark.parametrize("resolution", [0, 56, 100, 2056, 512.0, True, "512"])
def test_bad_resolution_is_refused(tmp_path, resolution):
    _rgb(tmp_path, "a.png")
    with pytest.raises(InvalidParameterError, match=rf"resolution=.*{resolution!r}"):
        load_image_folder(tmp_path, resolution=resolution)


@pytest.mark.parametrize("argument", ["max_image_pixels", "max_images"])
def test_bad_limits_are_refused(tmp_path, argument):
    _rgb(tmp_path, "a.png")
    with pytest.raises(InvalidParameterError, match=f"{argument}=0"):
        load_image_folder(tmp_path, resolution=R, **{argument: 0})


# --- fingerprint --------------------------------------------------------------------------


def _bmp_set(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [_rgb(folder, f"{i}.bmp", seed=i) for i in range(count)]


def test_fingerprint_ignores_names_and_order(tmp_path):
    originals = _bmp_set(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for i, path in enumerate(reversed(originals)):
        shutil.copyfile(path, tmp_path / "b" / f"renamed_{i}.bmp")
    first = load_image_folder(tmp_path / "a", resolution=R)
    second = load_image_folder(tmp_path / "b", resolution=R)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("sha256:") and len(first.fingerprint) == 7 + 64
    assert not torch.equal(first.images, second.images), "same files, other order"


def test_fingerprint_changes_with_one_byte_of_one_file(tmp_path):
    paths = _bmp_set(tmp_path)
    before = load_image_folder(tmp_path, resolution=R).fingerprint
    data = bytearray(paths[1].read_bytes())
    data[-1] ^= 1  # a pixel byte: the file stays a valid image
    paths[1].write_bytes(bytes(data))
    assert load_image_folder(tmp_path, resolution=R).fingerprint != before


def test_fingerprint_counts_duplicates(tmp_path):
    paths = _bmp_set(tmp_path, count=2)
    before = folder_fingerprint(tmp_path)
    shutil.copyfile(paths[0], tmp_path / "copy.bmp")
    assert folder_fingerprint(tmp_path) != before


def test_fingerprint_does_not_depend_on_resolution(tmp_path):
    _bmp_set(tmp_path)
    fingerprints = {load_image_folder(tmp_path, resolution=r).fingerprint for r in (64, 128)}
    assert len(fingerprints) == 1


def test_folder_fingerprint_matches_the_loaded_fingerprint(tmp_path):
    _bmp_set(tmp_path)
    (tmp_path / "skipped.txt").write_text("x")
    assert folder_fingerprint(tmp_path) == load_image_folder(tmp_path, resolution=R).fingerprint


# --- privacy hygiene ----------------------------------------------------------------------


def test_loading_writes_nothing_anywhere(tmp_path, monkeypatch):
    folder = tmp_path / "private"
    folder.mkdir()
    for writer in (_rgba, _grey16, _cmyk_jpeg, _rotated_jpeg):
        writer(folder)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))

    def refuse(*args, **kwargs):
        raise AssertionError("loading private images must not create temporary files")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    real_open, real_os_open = builtins.open, os.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise AssertionError(f"opened {file} for writing")
        return real_open(file, mode, *args, **kwargs)

    def read_only_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise AssertionError(f"opened {path} for writing")
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(os, "open", read_only_os_open)

    def snapshot():
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())

    before = snapshot()
    assert load_image_folder(folder, resolution=R).count == 4
    assert snapshot() == before
    assert list(scratch.iterdir()) == []


def test_repr_shows_neither_pixels_nor_count(tmp_path):
    _rgb(tmp_path, "a.png")
    loaded = load_image_folder(tmp_path, resolution=R)
    for text in (repr(loaded), str(loaded)):
        assert text == "PrivateImages(<private>)"


def test_cancel_check_runs_before_every_file(tmp_path):
    for i in range(3):
        _rgb(tmp_path, f"{i}.png", seed=i)
    calls = []
    load_image_folder(tmp_path, resolution=R, check_cancelled=lambda: calls.append(1))
    assert len(calls) == 3

    class Cancelled(Exception):
        pass

    def cancel_on_second_file():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):
        load_image_folder(tmp_path, resolution=R, check_cancelled=cancel_on_second_file)
    assert len(calls) == 2


def _log_of_loading(folder: Path, caplog) -> list[tuple[str, int, str]]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        load_image_folder(folder, resolution=R)
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def _mixed_set(folder: Path, count: int) -> None:
    # PNG and TIFF decoders log at DEBUG level per chunk and tag.
    folder.mkdir()
    for i in range(count):
        _rgb(folder, f"secret_{i}.{('png', 'tiff', 'jpg')[i % 3]}", seed=i, size=(90 + i, 70))
    _palette(folder, transparent=True)


def test_log_does_not_depend_on_the_folders_contents(tmp_path, caplog):
    _mixed_set(tmp_path / "three", count=3)
    _mixed_set(tmp_path / "four", count=4)
    (tmp_path / "four" / "notes.txt").write_text("skipped")
    three = _log_of_loading(tmp_path / "three", caplog)
    four = _log_of_loading(tmp_path / "four", caplog)
    assert three, "the load is logged"
    assert three == four
    text = " ".join(message for _, _, message in three)
    assert "three" not in text and "secret" not in text, "no folder or file names"


def test_pillow_stays_quiet_about_private_files_and_other_threads_are_untouched(
    tmp_path, caplog, recwarn, monkeypatch
):
    import threading
    import warnings

    from PIL import ImageOps

    _mixed_set(tmp_path / "private", count=3)
    real_transpose = ImageOps.exif_transpose

    def warning_transpose(image, **kwargs):
        # Pillow warns about some files (corrupt EXIF, odd TIFF tags...), per file.
        warnings.warn(f"odd file of size {image.size}", UserWarning, stacklevel=1)
        return real_transpose(image, **kwargs)

    monkeypatch.setattr(ImageOps, "exif_transpose", warning_transpose)
    png_logger = logging.getLogger("PIL.PngImagePlugin")
    other_thread_logged = []

    def log_elsewhere():
        png_logger.debug("from another thread")
        other_thread_logged.append(True)

    with caplog.at_level(logging.DEBUG):
        load_image_folder(tmp_path / "private", resolution=R)
        thread = threading.Thread(target=log_elsewhere)
        thread.start()
        thread.join()
    pillow = [r.getMessage() for r in caplog.records if r.name.startswith("PIL")]
    assert pillow == ["from another thread"]
    assert not [w for w in recwarn if "odd file" in str(w.message)], "warnings are silenced"


# --- per-image content digests ---------------------------------------------------------


def test_each_row_carries_the_sha256_of_its_own_file(tmp_path):
    levels = {"b.png": 60, "a.png": 200, "c.png": 120}
    for name, level in levels.items():
        Image.new("L", (70, 70), level).save(tmp_path / name)
    loaded = load_image_folder(tmp_path, resolution=R)
    assert len(loaded.content_digests) == loaded.images.shape[0] == 3
    for row, name in enumerate(sorted(levels)):
        expected = "sha256:" + hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert loaded.content_digests[row] == expected
        assert float(loaded.images[row].mean()) * 255 == pytest.approx(levels[name], abs=1)


def test_digests_do_not_depend_on_names_or_resolution(tmp_path):
    originals = _bmp_set(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for i, path in enumerate(originals):
        shutil.copyfile(path, tmp_path / "b" / f"z_{9 - i}.bmp")
    first = load_image_folder(tmp_path / "a", resolution=64).content_digests
    second = load_image_folder(tmp_path / "b", resolution=128).content_digests
    assert sorted(first) == sorted(second)
    assert len(set(first)) == 3


# --- hostile folder paths ------------------------------------------------------------------

MAX_MESSAGE = 500


def _refusal(folder) -> str:
    with pytest.raises(ImageFolderError) as caught:
        load_image_folder(folder, resolution=R)
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE, message
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), (
        "no chained OSError repeating the whole path in the traceback"
    )
    return message


def test_symbolic_link_loop_is_refused_clearly(tmp_path):
    try:
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
    except OSError:
        pytest.skip("symbolic links are not available here")
    assert "symbolic-link loop" in _refusal(tmp_path / "a")
    assert "symbolic-link loop" in _refusal(tmp_path / "a" / "inside")


def test_nul_character_in_the_path_is_refused_clearly(tmp_path):
    message = _refusal(tmp_path / "abc\x00def")
    assert "NUL character" in message and "\x00" not in message


@pytest.mark.parametrize("shape", ["one long name", "many folders"])
def test_five_thousand_character_path_is_refused_and_shortened(tmp_path, shape):
    tail = "x" * 5000 if shape == "one long name" else "/".join(["y" * 99] * 50)
    folder = tmp_path / tail
    message = _refusal(folder)
    assert "too long" in message or "does not exist" in message
    assert "…" in message and tail not in message
    assert str(tmp_path)[:40] in message, "the start of the path is kept"


def test_long_path_of_a_file_is_shortened_too(tmp_path):
    deep = tmp_path.joinpath(*["d" * 60] * 5)
    deep.mkdir(parents=True)
    path = _rgb(deep, "one.png")
    message = _refusal(path)
    assert "not a folder" in message and "…" in message


def test_unlistable_folder_is_refused_clearly(tmp_path, monkeypatch):
    _rgb(tmp_path, "a.png")
    long_folder = tmp_path.joinpath(*["p" * 80] * 4)
    long_folder.mkdir(parents=True)
    _rgb(long_folder, "a.png")

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    for folder in (tmp_path, long_folder):
        message = _refusal(folder)
        assert "no permission" in message


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root"
)
def test_folder_without_read_permission_is_refused_clearly(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    _rgb(folder, "a.png")
    folder.chmod(0)
    try:
        assert "no permission" in _refusal(folder)
    finally:
        folder.chmod(0o700)


def test_broken_image_message_names_the_file_shortened(tmp_path):
    deep = tmp_path.joinpath(*["q" * 80] * 4)
    deep.mkdir(parents=True)
    name = "patient_" + "n" * 200 + ".png"
    (deep / name).write_bytes(b"not an image at all")
    with pytest.raises(ImageFolderError, match=r"not a .*image") as caught:
        load_image_folder(deep, resolution=R)
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE
    assert "patient_" in message and ".png" in message, "the curator can find the file"


def test_looping_link_inside_the_folder_is_skipped_like_a_dangling_one(tmp_path):
    _rgb(tmp_path, "real.png")
    try:
        (tmp_path / "x.png").symlink_to(tmp_path / "y.png")
        (tmp_path / "y.png").symlink_to(tmp_path / "x.png")
    except OSError:
        pytest.skip("symbolic links are not available here")
    assert load_image_folder(tmp_path, resolution=R).images.shape[0] == 1


def test_shown_path_keeps_short_paths_and_shortens_long_ones():
    assert shown_path("/data/private") == "/data/private"
    long = "/start/" + "m" * 5000 + "/end.png"
    shown = shown_path(long)
    assert len(shown) <= MAX_SHOWN_PATH
    assert shown.startswith("/start/") and shown.endswith("/end.png") and "…" in shown
    assert shown_path("a\x00b\nc") == "a\\x00b\\nc"
