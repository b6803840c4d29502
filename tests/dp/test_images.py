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


def _pixels(folder: Path, **kwargs) -> torch.Tensor:
    """Every picture of ``folder`` as the DP nodes get them: loaded, then decoded in batches."""
    loaded = load_image_folder(folder, resolution=kwargs.pop("resolution", R), **kwargs)
    return torch.cat([batch.pixels for batch in loaded.batches(2)])


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
    images = _pixels(tmp_path)
    _assert_image_batch(images, 1)
    assert result.count == 1
    assert images.std() > 0.05, "the content survives, not a flat fill"


@pytest.mark.parametrize("writer", [_rgba, _palette])
def test_transparent_pixels_are_composited_on_white(tmp_path, writer):
    if writer is _palette:
        image = Image.new("P", (80, 80), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.save(tmp_path / "clear.png", transparency=0)
    else:
        Image.new("RGBA", (80, 80), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    images = _pixels(tmp_path)
    torch.testing.assert_close(images, torch.ones_like(images))


def test_sixteen_bit_range_maps_to_unit_interval_without_saturating(tmp_path):
    _grey16(tmp_path)
    images = _pixels(tmp_path)
    assert images.min() < 0.15 and images.max() > 0.85, "the ramp spans the cropped range"
    assert (images >= 1.0).float().mean() < 0.05, "values above 255 must not clip to white"
    assert 0.4 < images.mean() < 0.6
    assert len(torch.unique(images[0, 0, :, 0])) > R // 2


def test_dark_sixteen_bit_image_stays_dark(tmp_path):
    values = np.full((64, 64), 200, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "dark.png")
    images = _pixels(tmp_path)
    torch.testing.assert_close(images, torch.full_like(images, 200 / 65535), atol=1e-4, rtol=0)


def test_float_image_in_unit_range_loads_and_outside_is_refused(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (80, 1))
    Image.fromarray(ramp).save(tmp_path / "float.tiff")
    images = _pixels(tmp_path)
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
    images = _pixels(tmp_path)
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
    image = _pixels(tmp_path)[0]
    top, bottom = image[: R // 4].mean(dim=(0, 1)), image[-R // 4 :].mean(dim=(0, 1))
    assert top[0] > top[2] + 0.5, "displayed top is the stored left (red) half"
    assert bottom[2] > bottom[0] + 0.5, "displayed bottom is the stored right (blue) half"


def test_images_come_in_sorted_name_order_deterministically(tmp_path):
    levels = {"b.png": 60, "a.png": 200, "c.png": 120}
    for name, level in levels.items():
        Image.new("L", (70, 70), level).save(tmp_path / name)
    first = _pixels(tmp_path)
    means = [float(image.mean()) * 255 for image in first]
    assert means == pytest.approx([levels[name] for name in sorted(levels)], abs=1)
    torch.testing.assert_close(_pixels(tmp_path), first)


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
    assert _pixels(tmp_path).shape[0] == 2


def test_gif_loads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), RED), Image.new("RGB", (80, 80), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image = _pixels(tmp_path)[0]
    assert image[..., 0].mean() > image[..., 2].mean() + 0.5


def test_small_images_are_upscaled_to_the_resolution(tmp_path):
    _rgb(tmp_path, "small.png", size=(20, 30))
    _assert_image_batch(_pixels(tmp_path), 1)


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
    with pytest.raises(ImageFolderError, match=r"big\.png.*max_image_pixels=7999") as caught:
        load_image_folder(tmp_path, resolution=R, max_image_pixels=7999)
    _assert_nothing_measured(str(caught.value), "100", "80", "8000", folder=tmp_path)


@pytest.mark.parametrize("pillow_limit", [5000, 3000])  # warning range, then error range
def test_pillow_decompression_bomb_check_is_reported(tmp_path, monkeypatch, pillow_limit):
    _rgb(tmp_path, "bomb.png", size=(100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(ImageFolderError, match=r"bomb\.png.*too large to decode safely") as caught:
        load_image_folder(tmp_path, resolution=R)
    _assert_nothing_measured(str(caught.value), "100", "80", "8000", folder=tmp_path)


def _assert_nothing_measured(message: str, *measured: str, folder: Path) -> None:
    """No number measured from the private file (its size, pixel count, values) is shown.

    The folder's own path is the user's setting, not a measurement, and may hold any digits
    (pytest numbers its temporary folders: ``pytest-100``), so it is cut out first.
    """
    import re

    numbers = set(re.findall(r"\d+(?:\.\d+)?", message.replace(str(folder), "<folder>")))
    assert not numbers & set(measured), message


def test_float_and_wide_integer_refusals_show_no_pixel_values(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (80, 1))
    Image.fromarray(ramp * 300 - 17).save(tmp_path / "float.tiff")
    with pytest.raises(ImageFolderError, match=r"float\.tiff.*\[0, 1\]") as caught:
        load_image_folder(tmp_path, resolution=R)
    message = str(caught.value)
    _assert_nothing_measured(message, "-17", "17", "283", "300", "80", folder=tmp_path)
    assert "-17.0" not in message and "283.0" not in message
    (tmp_path / "float.tiff").unlink()
    wide = np.tile(np.arange(70_000, 70_080, dtype=np.int32), (80, 1))
    Image.fromarray(wide, mode="I").save(tmp_path / "wide.tiff")
    with pytest.raises(ImageFolderError, match=r"wide\.tiff.*16-bit range") as caught:
        load_image_folder(tmp_path, resolution=R)
    _assert_nothing_measured(str(caught.value), "70000", "70079", "80", folder=tmp_path)


def test_decoder_errors_lose_the_numbers_they_measured(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_noise(256, 256)).save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match=r"cut\.png.*image file is truncated") as caught:
        load_image_folder(tmp_path, resolution=R)
    assert "bytes not processed" not in str(caught.value)
    reason = str(caught.value).split(f"{tmp_path}: ", 1)[1]
    assert not any(c.isdigit() for c in reason), reason


def test_a_thousand_and_one_images_load_without_any_count_limit(tmp_path):
    """No refusal depends on the number of images (docs/privacy.md §1): there is no cap."""
    import inspect

    for i in range(1001):
        Image.fromarray(_noise(8, 8, seed=i)).save(tmp_path / f"{i:04d}.png")
    loaded = load_image_folder(tmp_path, resolution=R)
    assert loaded.count == 1001
    assert "max_images" not in inspect.signature(load_image_folder).parameters
    batches = list(loaded.batches(400))
    assert [b.pixels.shape[0] for b in batches] == [400, 400, 201]
    assert [(b.start, b.stop) for b in batches] == [(0, 400), (400, 800), (800, 1001)]


def test_the_loaded_folder_holds_no_pixels_and_batches_hold_at_most_their_size(tmp_path):
    """Memory is bounded by the batch size, not by n: the read folder keeps paths and
    digests only, and each batch is a fresh (size, R, R, 3) tensor."""
    import dataclasses

    for i in range(7):
        _rgb(tmp_path, f"{i}.png", seed=i)
    loaded = load_image_folder(tmp_path, resolution=R)
    for item in dataclasses.fields(loaded):
        value = getattr(loaded, item.name)
        assert not isinstance(value, (torch.Tensor, np.ndarray)), item.name
        if isinstance(value, tuple):
            assert all(isinstance(v, (str, Path)) for v in value), item.name
    sizes = []
    for batch in loaded.batches(3):
        assert batch.pixels.shape[1:] == (R, R, 3)
        sizes.append(batch.pixels.shape[0])
    assert max(sizes) <= 3 and sum(sizes) == 7


_PEAK_PROBE = """
import sys, types
from pathlib import Path
package = types.ModuleType("comfyui_dp_adapt")
package.__path__ = [sys.argv[1]]
sys.modules["comfyui_dp_adapt"] = package
from comfyui_dp_adapt.dp.images import load_image_folder
loaded = load_image_folder(Path(sys.argv[2]), resolution=256)
for batch in getattr(loaded, "batches", lambda size: ())(8):
    pass
status = Path("/proc/self/status").read_text()
print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's VmHWM")
def test_peak_memory_of_loading_and_decoding_does_not_grow_with_the_number_of_images(tmp_path):
    """Read pass and decoding in batches of 8, in a fresh process each (VmHWM, the peak
    resident set): 160 pictures at 256 px peak no higher than 16 do, within 40 MiB. Holding
    every decoded picture would take 0.75 MiB each, over 100 MiB more for 160."""
    import subprocess
    import sys

    def peak_kib(count: int) -> int:
        folder = tmp_path / str(count)
        folder.mkdir()
        for i in range(count):
            Image.fromarray(_noise(64, 64, seed=i)).save(folder / f"{i:04d}.png")
        pack = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_PROBE, str(pack), str(folder)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        return int(out.stdout.strip().splitlines()[-1])

    small, large = peak_kib(16), peak_kib(160)
    assert large - small < 40 * 1024, f"peak grew by {(large - small) / 1024:.0f} MiB"


@pytest.mark.parametrize("resolution", [0, 56, 100, 2056, 512.0, True, "512"])
def test_bad_resolution_is_refused(tmp_path, resolution):
    _rgb(tmp_path, "a.png")
    with pytest.raises(InvalidParameterError, match=rf"resolution=.*{resolution!r}"):
        load_image_folder(tmp_path, resolution=resolution)


def test_bad_limits_are_refused(tmp_path):
    _rgb(tmp_path, "a.png")
    with pytest.raises(InvalidParameterError, match="max_image_pixels=0"):
        load_image_folder(tmp_path, resolution=R, max_image_pixels=0)
    with pytest.raises(InvalidParameterError, match="size=0"):
        next(load_image_folder(tmp_path, resolution=R).batches(0))


# --- folder fingerprint (ComfyUI's IS_CHANGED) ------------------------------------------------


def _bmp_set(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [_rgb(folder, f"{i}.bmp", seed=i) for i in range(count)]


def test_folder_fingerprint_ignores_names_and_order(tmp_path):
    originals = _bmp_set(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for i, path in enumerate(reversed(originals)):
        shutil.copyfile(path, tmp_path / "b" / f"renamed_{i}.bmp")
    first, second = folder_fingerprint(tmp_path / "a"), folder_fingerprint(tmp_path / "b")
    assert first == second
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert not torch.equal(_pixels(tmp_path / "a"), _pixels(tmp_path / "b")), "other order"


def test_folder_fingerprint_changes_with_one_byte_of_one_file(tmp_path):
    paths = _bmp_set(tmp_path)
    before = folder_fingerprint(tmp_path)
    data = bytearray(paths[1].read_bytes())
    data[-1] ^= 1  # a pixel byte: the file stays a valid image
    paths[1].write_bytes(bytes(data))
    assert folder_fingerprint(tmp_path) != before


def test_folder_fingerprint_counts_duplicates_and_skips_other_files(tmp_path):
    paths = _bmp_set(tmp_path, count=2)
    before = folder_fingerprint(tmp_path)
    (tmp_path / "skipped.txt").write_text("x")
    assert folder_fingerprint(tmp_path) == before
    shutil.copyfile(paths[0], tmp_path / "copy.bmp")
    assert folder_fingerprint(tmp_path) != before


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


# --- per-picture pixel digests (the ledger's unit: one picture as decoded pixels) -----------


def _digests(folder: Path, resolution: int = R) -> tuple[str, ...]:
    return load_image_folder(folder, resolution=resolution).pixel_digests


def test_each_row_carries_the_digest_of_its_own_pixels(tmp_path):
    levels = {"b.png": 60, "a.png": 200, "c.png": 120}
    for name, level in levels.items():
        Image.new("L", (70, 70), level).save(tmp_path / name)
    loaded = load_image_folder(tmp_path, resolution=R)
    pixels = _pixels(tmp_path)
    assert len(loaded.pixel_digests) == pixels.shape[0] == 3
    for row, name in enumerate(sorted(levels)):
        (alone := tmp_path / f"alone_{row}").mkdir()
        shutil.copyfile(tmp_path / name, alone / name)
        assert loaded.pixel_digests[row] == _digests(alone)[0]
        assert loaded.pixel_digests[row].startswith("sha256:")
        assert float(pixels[row].mean()) * 255 == pytest.approx(levels[name], abs=1)


def test_pixel_digest_is_the_hash_of_kind_size_and_pixel_bytes(tmp_path):
    import struct

    from comfyui_dp_adapt.dp.images import pixel_digest

    pixels = _noise(96, 72)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    rgb = hashlib.sha256(b"rgb-uint8\0" + struct.pack("<II", 96, 72) + pixels.tobytes())
    assert _digests(tmp_path) == ("sha256:" + rgb.hexdigest(),)
    grey = np.tile(np.linspace(0, 1, 96, dtype=np.float32), (72, 1))
    expected = hashlib.sha256(b"grey-float32le\0" + struct.pack("<II", 96, 72))
    expected.update(grey.astype("<f4").tobytes())
    assert pixel_digest(Image.fromarray(grey)) == "sha256:" + expected.hexdigest()


def _same_pixels_written_otherwise(folder: Path, pixels: np.ndarray) -> dict[str, Path]:
    """The same pixels in files whose bytes all differ: other PNG compression, a text chunk,
    other lossless formats, another name, 8-bit greyscale stored as RGB."""
    folder.mkdir()
    image = Image.fromarray(pixels)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "re-saved by an editor")
    written = {
        "png level 9": ("original.png", {"compress_level": 9}),
        "png level 1": ("level1.png", {"compress_level": 1}),
        "png with text chunk": ("text.png", {"pnginfo": text}),
        "renamed": ("Holiday 2019 (copy).png", {}),
        "lossless webp": ("copy.webp", {"lossless": True, "quality": 100}),
        "tiff": ("copy.tiff", {}),
        "bmp": ("copy.bmp", {}),
    }
    paths = {}
    for kind, (name, options) in written.items():
        image.save(folder / name, **options)
        paths[kind] = folder / name
    return paths


def test_lossless_resaves_metadata_and_renames_are_the_same_picture(tmp_path):
    pixels = _noise(96, 72, seed=5)
    paths = _same_pixels_written_otherwise(tmp_path / "copies", pixels)
    contents = {path.read_bytes() for path in paths.values()}
    assert len(contents) == len(paths), "every copy's bytes differ"
    digests = {}
    for kind, path in paths.items():
        (alone := tmp_path / kind.replace(" ", "_")).mkdir()
        shutil.copyfile(path, alone / path.name)
        (digests[kind],) = _digests(alone)
    assert len(set(digests.values())) == 1, digests


def test_exif_rotation_tag_and_already_rotated_pixels_are_the_same_picture(tmp_path):
    stored = _noise(96, 72, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    (tmp_path / "tagged").mkdir()
    Image.fromarray(stored).save(tmp_path / "tagged" / "a.png", exif=exif.tobytes())
    (tmp_path / "rotated").mkdir()
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / "rotated" / "a.png")
    (tmp_path / "untagged").mkdir()
    Image.fromarray(stored).save(tmp_path / "untagged" / "a.png")
    tagged, rotated = _digests(tmp_path / "tagged"), _digests(tmp_path / "rotated")
    assert tagged == rotated
    assert _digests(tmp_path / "untagged") != tagged, "orientation is part of the picture"


def test_greyscale_saved_as_rgb_is_the_same_picture(tmp_path):
    grey = _noise(96, 72)[:, :, 0]
    (tmp_path / "l").mkdir()
    (tmp_path / "rgb").mkdir()
    Image.fromarray(grey).save(tmp_path / "l" / "a.png")
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "rgb" / "a.png")
    assert _digests(tmp_path / "l") == _digests(tmp_path / "rgb")


def test_one_changed_pixel_is_another_picture(tmp_path):
    pixels = _noise(96, 72, seed=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "x.png")
    pixels[40, 50, 1] ^= 1
    Image.fromarray(pixels).save(tmp_path / "b" / "x.png")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "b")


def test_exact_duplicates_in_one_folder_are_one_picture_kept_in_name_order(tmp_path):
    _rgb(tmp_path, "b.png", seed=1)
    _rgb(tmp_path, "c.png", seed=2)
    Image.open(tmp_path / "b.png").save(tmp_path / "a_copy.bmp")  # same pixels, first by name
    shutil.copyfile(tmp_path / "c.png", tmp_path / "d.png")
    loaded = load_image_folder(tmp_path, resolution=R)
    assert loaded.count == 2
    assert [p.name for p in loaded.paths] == ["a_copy.bmp", "c.png"]
    assert len(set(loaded.pixel_digests)) == 2


def test_digests_do_not_depend_on_names_or_resolution(tmp_path):
    originals = _bmp_set(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for i, path in enumerate(originals):
        shutil.copyfile(path, tmp_path / "b" / f"z_{9 - i}.bmp")
    first = _digests(tmp_path / "a", resolution=64)
    second = _digests(tmp_path / "b", resolution=128)
    assert sorted(first) == sorted(second)
    assert len(set(first)) == 3


def test_a_jpeg_digest_does_not_depend_on_the_resolution(tmp_path):
    """Decoded at full size for every resolution (no reduced-scale JPEG drafts)."""
    Image.fromarray(_noise(640, 480)).save(tmp_path / "a.jpg", quality=90)
    assert _digests(tmp_path, resolution=64) == _digests(tmp_path, resolution=512)


# --- decoding on demand -------------------------------------------------------------------


def test_a_file_changed_after_loading_is_refused_by_name_at_decoding(tmp_path):
    paths = [_rgb(tmp_path, f"{name}.png", seed=i) for i, name in enumerate("abc")]
    loaded = load_image_folder(tmp_path, resolution=R)
    pixels = _noise(96, 72, seed=1)
    Image.fromarray(pixels).save(paths[1], compress_level=0)  # same pixels, new bytes
    assert len(list(loaded.batches(2))) == 2, "a lossless re-save changes nothing"
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(paths[1])
    with pytest.raises(ImageFolderError, match=r"'b\.png'.*changed since.*queue the prompt"):
        list(loaded.batches(2))
    paths[1].unlink()
    with pytest.raises(ImageFolderError, match=r"'b\.png'.*changed since"):
        list(loaded.batches(2))
    paths[1].write_bytes(b"not an image any more")
    with pytest.raises(ImageFolderError, match=r"'b\.png'.*changed since"):
        list(loaded.batches(2))


def test_decoding_checks_cancel_before_every_file(tmp_path):
    for i in range(5):
        _rgb(tmp_path, f"{i}.png", seed=i)
    loaded = load_image_folder(tmp_path, resolution=R)
    calls = []
    assert len(list(loaded.batches(2, check_cancelled=lambda: calls.append(1)))) == 3
    assert len(calls) == 5


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
    assert _pixels(tmp_path).shape[0] == 1


def test_shown_path_keeps_short_paths_and_shortens_long_ones():
    assert shown_path("/data/private") == "/data/private"
    long = "/start/" + "m" * 5000 + "/end.png"
    shown = shown_path(long)
    assert len(shown) <= MAX_SHOWN_PATH
    assert shown.startswith("/start/") and shown.endswith("/end.png") and "…" in shown
    assert shown_path("a\x00b\nc") == "a\\x00b\\nc"
