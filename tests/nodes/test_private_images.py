"""The "DP Load Private Images" node inside a real ComfyUI (in-process, CPU).

Everything the node publishes (outputs' types, IS_CHANGED values, log lines, progress
events, error messages) is checked not to depend on the private folder beyond what the
user typed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dp_adapt.dp.fingerprint import keyed_fingerprint, load_or_create_key
from comfyui_dp_adapt.dp.images import ImageFolderError, folder_fingerprint
from comfyui_dp_adapt.dp.private_set import SOCKET_TYPE, PrivateImageSet

R = 64
MAX_MESSAGE = 500


def _write_images(folder: Path, count: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (72, 96, 3), dtype=np.uint8)
        paths.append(folder / f"{prefix}_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixel_digest(path: Path) -> str:
    """``"sha256:<hex>"`` of the picture's canonical pixels (RGB here): kind, size, bytes."""
    import struct

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    header = b"rgb-uint8\0" + struct.pack("<II", *rgb.size)
    return "sha256:" + hashlib.sha256(header + rgb.tobytes()).hexdigest()


def _decoded(private: PrivateImageSet) -> torch.Tensor:
    return torch.cat([batch.pixels for batch in private.batches(2)])


@pytest.fixture
def node(comfy):
    from comfyui_dp_adapt.nodes.private_images import DPLoadPrivateImagesNode

    return DPLoadPrivateImagesNode


@pytest.fixture
def input_dir(comfy) -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory()).resolve()


@pytest.fixture
def input_subfolder(input_dir):
    folder = input_dir / f"dp_adapt_test_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def user_dir(comfy, tmp_path, monkeypatch) -> Path:
    """A fresh ComfyUI user directory: a fresh installation key."""
    from comfyui_dp_adapt.nodes import comfy_compat

    directory = tmp_path / "user"
    monkeypatch.setattr(comfy_compat, "user_directory", lambda: directory)
    return directory


def _installation_key(user_dir: Path) -> bytes:
    return load_or_create_key(user_dir / "dp_adapt" / "fingerprint.key")


def _load(node, folder, resolution: int = R) -> PrivateImageSet:
    result = node().load(folder=str(folder), resolution=resolution)
    assert isinstance(result, tuple), "plain outputs: no 'ui' block with previews"
    assert len(result) == 1, "one output: no count, no fingerprint string"
    assert isinstance(result[0], PrivateImageSet)
    return result[0]


def _assert_comfy_image(images: torch.Tensor, n: int) -> None:
    assert isinstance(images, torch.Tensor)
    assert images.shape == (n, R, R, 3)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


# --- the output ---------------------------------------------------------------------------


def test_reads_a_folder_relative_to_the_input_directory(node, input_subfolder, user_dir):
    paths = _write_images(input_subfolder, 3)
    loaded = _load(node, input_subfolder.name)
    _assert_comfy_image(_decoded(loaded), 3)
    key = _installation_key(user_dir)
    expected = [keyed_fingerprint(_pixel_digest(p), key) for p in sorted(paths)]
    assert list(loaded.image_keys) == expected, "one key per image, row for row"
    assert len(set(loaded.image_keys)) == 3
    for image_key, path in zip(loaded.image_keys, sorted(paths), strict=True):
        assert image_key.startswith("hmac-sha256:")
        assert _sha256(path) not in image_key, "the plain SHA-256 is never output"
        assert _pixel_digest(path).split(":")[1] not in image_key
    assert folder_fingerprint(input_subfolder).split(":", 1)[1] not in "".join(loaded.image_keys)
    assert _load(node, input_subfolder.name).image_keys == loaded.image_keys, "stable keys"


def test_keys_follow_rows_when_files_are_named_in_another_order(node, tmp_path, user_dir):
    levels = {"b.png": 60, "a.png": 200, "c.png": 120}
    (tmp_path / "private").mkdir()
    for name, level in levels.items():
        Image.new("L", (70, 70), level).save(tmp_path / "private" / name)
    loaded = _load(node, tmp_path / "private")
    key = _installation_key(user_dir)
    by_key = {
        keyed_fingerprint(_pixel_digest(tmp_path / "private" / name), key): level
        for name, level in levels.items()
    }
    for image, image_key in zip(_decoded(loaded), loaded.image_keys, strict=True):
        assert float(image.mean()) * 255 == pytest.approx(by_key[image_key], abs=1)


def test_keys_do_not_depend_on_file_name_or_resolution(node, tmp_path, user_dir):
    originals = _write_images(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    for i, path in enumerate(originals):
        shutil.copyfile(path, tmp_path / "b" / f"renamed_{9 - i}.png")
    first = _load(node, tmp_path / "a", resolution=64).image_keys
    second = _load(node, tmp_path / "b", resolution=128).image_keys
    assert sorted(first) == sorted(second)
    assert first != second, "other names, other order: the rows move, the keys follow"


def test_a_resaved_renamed_or_reformatted_picture_keeps_its_key(node, tmp_path, user_dir):
    """The unit of privacy is the picture as decoded pixels (docs/privacy.md §1): the audit
    saw one picture in 6 releases at composed epsilon 2.71 against its total of 2.0,
    because each re-save of it got a fresh key."""
    from PIL import PngImagePlugin

    pixels = np.random.default_rng(4).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    text = PngImagePlugin.PngInfo()
    text.add_text("Description", "exported again")
    exif = Image.Exif()
    exif[0x0112] = 6
    copies = {
        "original": ("a.png", pixels, {}),
        "other compression": ("a.png", pixels, {"compress_level": 0}),
        "text chunk": ("a.png", pixels, {"pnginfo": text}),
        "renamed": ("renamed copy.png", pixels, {}),
        "lossless webp": ("a.webp", pixels, {"lossless": True}),
        "tiff": ("a.tiff", pixels, {}),
        "bmp": ("a.bmp", pixels, {}),
        # Stored unrotated with an orientation tag: displays as the rotated pixels.
        "exif orientation": ("a.png", np.rot90(pixels, k=1).copy(), {"exif": exif.tobytes()}),
    }
    keys = {}
    for kind, (name, stored, options) in copies.items():
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        Image.fromarray(stored).save(folder / name, **options)
        (keys[kind],) = _load(node, folder).image_keys
    assert len(set(keys.values())) == 1, keys
    pixels[0, 0, 0] ^= 1
    (tmp_path / "changed").mkdir()
    Image.fromarray(pixels).save(tmp_path / "changed" / "a.png")
    assert _load(node, tmp_path / "changed").image_keys[0] != keys["original"]


def test_two_identical_pictures_in_a_folder_give_one_row(node, tmp_path, user_dir):
    paths = _write_images(tmp_path / "private", 3)
    with Image.open(paths[1]) as image:
        image.save(tmp_path / "private" / "zz_same_pixels.bmp")
    shutil.copyfile(paths[2], tmp_path / "private" / "img_2 copy.png")
    loaded = _load(node, tmp_path / "private")
    assert len(loaded.image_keys) == len(set(loaded.image_keys)) == 3
    _assert_comfy_image(_decoded(loaded), 3)
    alone = _load(node, tmp_path / "private").image_keys
    assert alone == loaded.image_keys


def test_a_folder_of_1001_pictures_loads(node, tmp_path, user_dir):
    """No count cap (docs/privacy.md §1): whether a release happens must not depend on n."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1001):
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    loaded = _load(node, folder)
    assert len(loaded.image_keys) == 1001
    assert loaded.resolution == R


def test_a_picture_edited_after_loading_is_refused_by_name_when_decoded(node, tmp_path, user_dir):
    paths = _write_images(tmp_path / "private", 3)
    loaded = _load(node, tmp_path / "private")
    Image.new("RGB", (96, 72), (1, 2, 3)).save(paths[1])
    with pytest.raises(ImageFolderError, match=r"img_1\.png.*changed since DP Load Private"):
        _decoded(loaded)


def test_keys_differ_between_installations(node, tmp_path, monkeypatch, comfy):
    from comfyui_dp_adapt.nodes import comfy_compat

    _write_images(tmp_path / "private", 2)
    keys = []
    for install in ("one", "two"):
        monkeypatch.setattr(comfy_compat, "user_directory", lambda i=install: tmp_path / i)
        keys.append(_load(node, tmp_path / "private").image_keys)
        assert (tmp_path / install / "dp_adapt" / "fingerprint.key").is_file()
    assert not set(keys[0]) & set(keys[1])


def test_reads_an_absolute_path(node, tmp_path, user_dir):
    _write_images(tmp_path / "private", 2)
    loaded = _load(node, tmp_path / "private")
    _assert_comfy_image(_decoded(loaded), 2)
    assert repr(loaded) == "PrivateImageSet(<private>)"
    assert repr(loaded.source) == "PrivateImages(<private>)"


def test_node_declares_one_dp_only_output_and_tooltips(node, comfy):
    import nodes as comfy_nodes

    from comfyui_dp_adapt.nodes import private_images

    assert private_images.NODE_CLASS_MAPPINGS == {"DPAdaptLoadPrivateImages": node}
    assert private_images.NODE_DISPLAY_NAME_MAPPINGS["DPAdaptLoadPrivateImages"] == (
        "DP Load Private Images"
    )
    for name, (_, options) in node.INPUT_TYPES()["required"].items():
        assert options.get("tooltip"), f"input {name} has no tooltip"
    assert node.RETURN_TYPES == (SOCKET_TYPE,) == ("DP_PRIVATE_IMAGES",)
    assert node.RETURN_NAMES == ("private_images",)
    assert len(node.OUTPUT_TOOLTIPS) == 1 and "DP nodes" in node.OUTPUT_TOOLTIPS[0]
    assert "DP nodes" in node.DESCRIPTION
    assert callable(getattr(node(), node.FUNCTION))
    # ComfyUI links only matching socket types: core preview and save take IMAGE.
    for core in ("PreviewImage", "SaveImage"):
        image_input = comfy_nodes.NODE_CLASS_MAPPINGS[core].INPUT_TYPES()["required"]["images"]
        assert image_input[0] == "IMAGE" != SOCKET_TYPE


# --- folder paths -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "nested dotdot"])
def test_relative_path_escaping_the_input_directory_is_refused(node, input_dir, tmp_path, how):
    _write_images(tmp_path / "outside", 1)
    relative = os.path.relpath(tmp_path / "outside", input_dir)
    assert relative.startswith("..")
    if how == "nested dotdot":
        relative = os.path.join("a", "..", relative)
    with pytest.raises(ImageFolderError, match="outside ComfyUI's input directory"):
        node().load(folder=relative, resolution=R)


def test_symlink_out_of_the_input_directory_is_refused(node, input_subfolder, tmp_path):
    _write_images(tmp_path / "outside", 1)
    link = input_subfolder / "link"
    try:
        link.symlink_to(tmp_path / "outside", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links are not available here")
    relative = f"{input_subfolder.name}/link"
    with pytest.raises(ImageFolderError, match="outside ComfyUI's input directory"):
        node().load(folder=relative, resolution=R)
    assert math.isnan(node.IS_CHANGED(folder=relative, resolution=R))


def test_empty_folder_input_is_refused(node):
    with pytest.raises(ImageFolderError, match="folder is empty"):
        node().load(folder="  ", resolution=R)


def _hostile_folders(input_subfolder: Path, tmp_path: Path) -> dict[str, str]:
    (input_subfolder / "empty").mkdir()
    (input_subfolder / "only_text").mkdir()
    (input_subfolder / "only_text" / "notes.txt").write_text("no images")
    _write_images(input_subfolder, 1)
    folders = {
        "empty folder": f"{input_subfolder.name}/empty",
        "no image files": str(input_subfolder / "only_text"),
        "NUL byte (relative)": "abc\x00def",
        "NUL byte (absolute)": str(tmp_path / "abc\x00def"),
        "5000-character name (relative)": "x" * 5000,
        "5000-character path (absolute)": str(tmp_path / "/".join(["y" * 99] * 50)),
        "a file, not a folder": f"{input_subfolder.name}/img_0.png",
        "missing": "no_such_folder_here",
    }
    try:
        (input_subfolder / "a").symlink_to(input_subfolder / "b")
        (input_subfolder / "b").symlink_to(input_subfolder / "a")
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
    except OSError:
        return folders
    folders["symbolic-link loop (relative)"] = f"{input_subfolder.name}/a"
    folders["symbolic-link loop (absolute)"] = str(tmp_path / "a")
    return folders


def test_hostile_folders_give_short_clear_errors(node, input_subfolder, tmp_path, user_dir):
    for what, folder in _hostile_folders(input_subfolder, tmp_path).items():
        with pytest.raises(ImageFolderError) as caught:
            node().load(folder=folder, resolution=R)
        message = str(caught.value)
        assert len(message) <= MAX_MESSAGE, f"{what}: {len(message)} characters"
        assert "\x00" not in message, what
        error = caught.value
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
        assert math.isnan(node.IS_CHANGED(folder=folder, resolution=R)), what


def test_unlistable_folder_gives_a_clear_error(node, input_subfolder, monkeypatch, user_dir):
    import errno

    _write_images(input_subfolder, 1)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ImageFolderError, match="no permission") as caught:
        node().load(folder=input_subfolder.name, resolution=R)
    assert len(str(caught.value)) <= MAX_MESSAGE


# --- IS_CHANGED ---------------------------------------------------------------------------


def test_is_changed_follows_the_files_contents(node, input_subfolder):
    paths = _write_images(input_subfolder, 2)
    first = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) == first, "cache works"
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=2 * R) != first
    Image.new("RGB", (80, 80), (10, 20, 30)).save(paths[1])
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) != first


def test_is_changed_changes_when_one_image_is_added_or_removed(node, input_subfolder):
    paths = _write_images(input_subfolder, 3)
    three = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    extra = input_subfolder / "extra.png"
    Image.new("RGB", (80, 80), (10, 20, 30)).save(extra)
    four = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    extra.unlink()
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) == three
    paths[0].unlink()
    two = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    assert len({three, four, two}) == 3


def test_is_changed_is_no_plain_digest_of_the_files(node, input_subfolder):
    paths = _write_images(input_subfolder, 3)
    value = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    assert isinstance(value, str)
    folder_digest = folder_fingerprint(input_subfolder).split(":", 1)[1]
    digests = [folder_digest] + [_sha256(p) for p in paths]
    digests.append(hashlib.sha256(f"sha256:{folder_digest}\n{R}".encode()).hexdigest())
    for digest in digests:
        assert digest not in value


def test_is_changed_differs_between_server_processes(node, input_subfolder, monkeypatch):
    from comfyui_dp_adapt.nodes import private_images

    _write_images(input_subfolder, 2)
    first = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    # A restarted server draws a new process key.
    monkeypatch.setattr(private_images, "_PROCESS_KEY", secrets.token_bytes(32))
    second = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) == second
    assert second != first


def test_process_key_is_never_stored(comfy, tmp_path):
    from comfyui_dp_adapt.nodes import comfy_compat, private_images

    key = private_images._PROCESS_KEY
    assert len(key) == 32
    user = comfy_compat.user_directory()
    if user.is_dir():
        for path in user.rglob("*"):
            assert not path.is_file() or key not in path.read_bytes()


def test_is_changed_makes_comfyui_rerun_on_an_unusable_folder(node):
    first = node.IS_CHANGED(folder="no_such_folder_here", resolution=R)
    second = node.IS_CHANGED(folder="no_such_folder_here", resolution=R)
    assert [first] != [second], "ComfyUI compares lists; a repeated NaN object would be equal"


# --- logs and progress --------------------------------------------------------------------


def _folders_of_three_and_four(tmp_path: Path) -> tuple[Path, Path]:
    _write_images(tmp_path / "three", 3, prefix="secret_patient_name")
    _write_images(tmp_path / "four", 4, prefix="secret_patient_name")
    (tmp_path / "four" / "notes.txt").write_text("skipped")
    return tmp_path / "three", tmp_path / "four"


def test_log_is_identical_for_three_and_four_images(node, tmp_path, user_dir, caplog):
    logs = []
    for folder in _folders_of_three_and_four(tmp_path):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            _load(node, folder)
        logs.append([(r.name, r.levelno, r.getMessage()) for r in caplog.records])
    assert logs[0], "the load is logged"
    assert logs[0] == logs[1]
    text = "\n".join(message for _, _, message in logs[0])
    assert "secret_patient_name" not in text and "three" not in text


def test_progress_is_identical_for_three_and_four_images(node, tmp_path, user_dir, monkeypatch):
    from comfyui_dp_adapt.nodes import comfy_compat

    events: list[tuple] = []

    class RecordingBar:
        def __init__(self, total):
            events.append(("new", total))

        def update(self, value):
            events.append(("update", value))

        def update_absolute(self, value, total=None, preview=None):
            events.append(("update_absolute", value, total))

    monkeypatch.setattr(comfy_compat, "progress_bar", RecordingBar)
    recorded = []
    for folder in _folders_of_three_and_four(tmp_path):
        events.clear()
        _load(node, folder)
        recorded.append(list(events))
    assert recorded[0], "the user sees progress"
    assert recorded[0] == recorded[1]


def test_cancel_is_checked_between_files(node, tmp_path, user_dir, monkeypatch):
    from comfyui_dp_adapt.nodes import comfy_compat

    _write_images(tmp_path / "private", 3)
    checks = []

    class Interrupted(Exception):
        pass

    def cancel_on_second_file():
        checks.append(1)
        if len(checks) == 2:
            raise Interrupted

    monkeypatch.setattr(comfy_compat, "raise_if_cancelled", cancel_on_second_file)
    with pytest.raises(Interrupted):
        _load(node, tmp_path / "private")
    assert len(checks) == 2


# --- the demo's built-in collection ('demo:dotted') ----------------------------------------


@pytest.fixture
def demo_input(comfy, tmp_path, monkeypatch) -> Path:
    """A fresh ComfyUI input directory, so each test sees the demo folder unpainted."""
    from comfyui_dp_adapt.nodes import comfy_compat

    directory = tmp_path / "input"
    directory.mkdir()
    monkeypatch.setattr(comfy_compat, "input_directory", lambda: directory)
    return directory


def _pixels_by_name(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())}


def test_demo_choice_paints_the_demo_worlds_dotted_set(node, demo_input, tmp_path, user_dir):
    from comfyui_dp_adapt.demo.world import write_style_set
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    _load(node, DEMO_FOLDER)
    painted = demo_input / DEMO_SUBFOLDER
    reference = tmp_path / "reference"
    write_style_set(reference, count=100)  # what `python demo/world.py DIR` writes
    expected = _pixels_by_name(reference)
    got = _pixels_by_name(painted)
    assert sorted(got) == sorted(expected), "the same files as demo/world.py's set"
    for name, pixels in expected.items():
        assert np.array_equal(got[name], pixels), f"{name} differs from demo/world.py's"
    assert [p.name for p in demo_input.iterdir()] == [DEMO_SUBFOLDER], "no temp folder left"


def test_demo_choice_paints_once(node, demo_input, user_dir, monkeypatch):
    from comfyui_dp_adapt.demo import world
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    first = _load(node, DEMO_FOLDER)
    painted = demo_input / DEMO_SUBFOLDER
    stamps = {p.name: p.stat().st_mtime_ns for p in painted.iterdir()}

    def no_repaint(*args, **kwargs):
        raise AssertionError("the demo set was painted again")

    monkeypatch.setattr(world, "write_style_set", no_repaint)
    second = _load(node, DEMO_FOLDER)
    assert second.image_keys == first.image_keys
    assert {p.name: p.stat().st_mtime_ns for p in painted.iterdir()} == stamps


def test_demo_choice_equals_loading_its_folder_by_path(node, demo_input, user_dir):
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    demo = _load(node, DEMO_FOLDER)
    by_path = _load(node, demo_input / DEMO_SUBFOLDER)
    assert demo.image_keys == by_path.image_keys
    assert len(set(demo.image_keys)) == 100
    assert torch.equal(_decoded(demo), _decoded(by_path))
    is_changed = node.IS_CHANGED(folder=DEMO_FOLDER, resolution=R)
    assert is_changed == node.IS_CHANGED(folder=str(demo_input / DEMO_SUBFOLDER), resolution=R)


def test_demo_choice_ignores_a_half_painted_folder_left_by_a_crash(node, demo_input, user_dir):
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    stale = demo_input / f".{DEMO_SUBFOLDER}.partial-crashed"
    recent = demo_input / f".{DEMO_SUBFOLDER}.partial-still-painting"
    for leftover in (stale, recent):
        _write_images(leftover, 2, prefix="world")
    old = os.stat(stale).st_mtime - 2 * 3600
    os.utime(stale, (old, old))

    loaded = _load(node, DEMO_FOLDER)
    assert len(set(loaded.image_keys)) == 100, "the full set, not the leftover's pictures"
    assert loaded.image_keys == _load(node, demo_input / DEMO_SUBFOLDER).image_keys
    assert not stale.exists(), "a stale half-painted folder is removed"
    assert recent.is_dir(), "a painter at work in another process keeps its folder"


def test_demo_choice_interrupted_while_painting_leaves_no_folder(
    node, demo_input, user_dir, monkeypatch
):
    from comfyui_dp_adapt.demo import world
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    real = world.write_style_set

    def crash_midway(folder, **kwargs):
        real(folder, count=3)
        raise KeyboardInterrupt("cancelled while painting")

    monkeypatch.setattr(world, "write_style_set", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        _load(node, DEMO_FOLDER)
    assert list(demo_input.iterdir()) == [], "nothing half-painted where the loader looks"
    monkeypatch.setattr(world, "write_style_set", real)
    assert len(set(_load(node, DEMO_FOLDER).image_keys)) == 100
    assert (demo_input / DEMO_SUBFOLDER).is_dir()


def test_demo_choice_is_documented_in_the_tooltip(node):
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    folder_type, options = node.INPUT_TYPES()["required"]["folder"]
    assert folder_type == "STRING", "a STRING widget, so existing workflows still validate"
    assert DEMO_FOLDER in options["tooltip"] and DEMO_SUBFOLDER in options["tooltip"]
    assert "stand in for a private collection" in options["tooltip"]


def test_demo_choice_is_the_set_run_workflow_py_paints(node, demo_input, tmp_path, user_dir):
    from comfyui_dp_adapt.headless import runner
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER, DEMO_SUBFOLDER

    _load(node, DEMO_FOLDER)
    headless = tmp_path / "headless"
    runner._write_sample_images(headless, demo_world=True)
    expected = _pixels_by_name(headless)
    got = _pixels_by_name(demo_input / DEMO_SUBFOLDER)
    assert sorted(got) == sorted(expected)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)


def test_an_unknown_demo_collection_is_refused_naming_the_one_there_is(node, demo_input):
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER

    with pytest.raises(ImageFolderError) as refused:
        node().load(folder="demo:striped", resolution=R)
    assert "demo:striped" in str(refused.value) and DEMO_FOLDER in str(refused.value)
    assert list(demo_input.iterdir()) == [], "nothing painted"
