"""The synthetic demo style set: deterministic, varied, loadable as a private folder."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from comfyui_dp_adapt.demo.synthetic_images import main, write_synthetic_style_set
from comfyui_dp_adapt.dp.images import load_image_folder


def _pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in paths]


def test_same_seed_paints_the_same_set(tmp_path):
    first = write_synthetic_style_set(tmp_path / "a", count=3, size=64, seed=7)
    second = write_synthetic_style_set(tmp_path / "b", count=3, size=64, seed=7)
    assert [p.name for p in first] == [p.name for p in second]
    for x, y in zip(_pixels(first), _pixels(second), strict=True):
        np.testing.assert_array_equal(x, y)


def test_other_seed_paints_another_set(tmp_path):
    first = _pixels(write_synthetic_style_set(tmp_path / "a", count=2, size=64, seed=0))
    other = _pixels(write_synthetic_style_set(tmp_path / "b", count=2, size=64, seed=1))
    assert all(not np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_images_within_a_set_differ(tmp_path):
    images = _pixels(write_synthetic_style_set(tmp_path, count=6, size=64))
    for x, y in itertools.combinations(images, 2):
        assert np.abs(x - y).mean() > 2, "each image has its own shapes and layout"


def test_smaller_set_is_a_prefix_of_a_larger_one(tmp_path):
    small = _pixels(write_synthetic_style_set(tmp_path / "s", count=2, size=64))
    large = _pixels(write_synthetic_style_set(tmp_path / "l", count=4, size=64))
    for x, y in zip(small, large[:2], strict=True):
        np.testing.assert_array_equal(x, y)


def test_set_loads_as_a_private_image_folder(tmp_path):
    write_synthetic_style_set(tmp_path, count=4, size=96)
    loaded = load_image_folder(tmp_path, resolution=64)
    assert loaded.count == 4
    assert [tuple(b.pixels.shape) for b in loaded.batches(4)] == [(4, 64, 64, 3)]


def test_command_line_writes_the_requested_count(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--count", "3", "--size", "64"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"style_{i:03d}.png" for i in range(3)
    ]
    assert "3 images" in capsys.readouterr().out


@pytest.mark.parametrize("arguments", [{"count": 0}, {"size": 8}, {"seed": -1}])
def test_bad_arguments_are_refused(tmp_path, arguments):
    name = next(iter(arguments))
    with pytest.raises(ValueError, match=f"{name}="):
        write_synthetic_style_set(tmp_path, **arguments)
