"""The "DP Load Private Images" node inside a real ComfyUI (in-process, CPU)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dp_adapt.dp.images import ImageFolderError, folder_fingerprint

R = 64


def _write_images(folder: Path, count: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (72, 96, 3), dtype=np.uint8)
        paths.append(folder / f"{prefix}_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


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


def _assert_comfy_image(images: torch.Tensor, n: int) -> None:
    assert isinstance(images, torch.Tensor)
    assert images.shape == (n, R, R, 3)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_reads_a_folder_relative_to_the_input_directory(node, input_subfolder):
    _write_images(input_subfolder, 3)
    result = node().load(folder=input_subfolder.name, resolution=R)
    assert isinstance(result, tuple), "plain outputs: no 'ui' block with previews"
    images, dataset_size, fingerprint = result
    _assert_comfy_image(images, 3)
    assert dataset_size == 3
    raw = folder_fingerprint(input_subfolder)
    assert fingerprint.startswith("hmac-sha256:")
    assert raw.split(":", 1)[1] not in fingerprint, "the raw content hash is never output"
    assert node().load(folder=input_subfolder.name, resolution=R)[2] == fingerprint, "stable key"


def test_reads_an_absolute_path(node, tmp_path):
    _write_images(tmp_path / "private", 2)
    images, dataset_size, _ = node().load(folder=str(tmp_path / "private"), resolution=R)
    _assert_comfy_image(images, 2)
    assert dataset_size == 2


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


def test_is_changed_follows_the_files_contents(node, input_subfolder):
    paths = _write_images(input_subfolder, 2)
    first = node.IS_CHANGED(folder=input_subfolder.name, resolution=R)
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) == first
    Image.new("RGB", (80, 80), (10, 20, 30)).save(paths[1])
    assert node.IS_CHANGED(folder=input_subfolder.name, resolution=R) != first


def test_is_changed_makes_comfyui_rerun_on_an_unusable_folder(node):
    first = node.IS_CHANGED(folder="no_such_folder_here", resolution=R)
    second = node.IS_CHANGED(folder="no_such_folder_here", resolution=R)
    assert [first] != [second], "ComfyUI compares lists; a repeated NaN object would be equal"


def test_file_names_never_reach_the_log(node, input_subfolder, caplog):
    _write_images(input_subfolder, 2, prefix="secret_patient_name")
    with caplog.at_level(logging.DEBUG):
        node().load(folder=input_subfolder.name, resolution=R)
    assert caplog.text, "the load is logged"
    assert "secret_patient_name" not in caplog.text


def test_node_declares_tooltips_and_outputs(node):
    from comfyui_dp_adapt.nodes import private_images

    assert private_images.NODE_CLASS_MAPPINGS == {"DPAdaptLoadPrivateImages": node}
    assert private_images.NODE_DISPLAY_NAME_MAPPINGS["DPAdaptLoadPrivateImages"] == (
        "DP Load Private Images"
    )
    for name, (_, options) in node.INPUT_TYPES()["required"].items():
        assert options.get("tooltip"), f"input {name} has no tooltip"
    assert node.RETURN_TYPES == ("IMAGE", "INT", "STRING")
    assert len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
    assert callable(getattr(node(), node.FUNCTION))
