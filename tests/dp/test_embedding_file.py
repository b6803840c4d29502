"""Embedding files: safe names, atomic no-clobber writes, safetensors only."""

from __future__ import annotations

import os

import pytest
import torch

from comfyui_dp_adapt.dp.embedding_file import (
    EmbeddingExistsError,
    check_writable,
    read_embedding,
    save_embedding,
    validate_embedding_name,
)
from comfyui_dp_adapt.dp.errors import InvalidParameterError

META = {"dp_adapt.epsilon": "1.0"}


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "..",
        "a/b",
        "a\\b",
        "/abs",
        "",
        ".hidden",
        "x" * 65,
        "name with space",
        "a..b",
        "tök",
    ],
)
def test_names_that_could_escape_or_confuse_are_refused(tmp_path, name):
    with pytest.raises(InvalidParameterError, match="embedding name"):
        save_embedding(tmp_path, name, {"emb_params": torch.zeros(1, 4)}, META, overwrite=False)
    assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.parent.glob("*.safetensors")) == []


def test_plain_names_are_kept_exactly():
    assert validate_embedding_name("my-style_v2.1") == "my-style_v2.1"
    assert validate_embedding_name("style.safetensors") == "style"


def test_saved_file_round_trips_tensors_and_metadata(tmp_path):
    value = torch.randn(3, 4)
    path = save_embedding(tmp_path, "tok", {"emb_params": value}, META, overwrite=False)
    assert path == tmp_path.resolve() / "tok.safetensors"
    tensors, metadata = read_embedding(path)
    assert torch.equal(tensors["emb_params"], value)
    assert metadata == META
    assert [p.name for p in tmp_path.iterdir()] == ["tok.safetensors"], "no temp file left behind"


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    first = torch.ones(1, 4)
    save_embedding(tmp_path, "tok", {"emb_params": first}, META, overwrite=False)
    with pytest.raises(EmbeddingExistsError, match="already exists"):
        check_writable(tmp_path, "tok", overwrite=False)
    with pytest.raises(EmbeddingExistsError):
        save_embedding(tmp_path, "tok", {"emb_params": torch.zeros(1, 4)}, META, overwrite=False)
    assert torch.equal(read_embedding(tmp_path / "tok.safetensors")[0]["emb_params"], first)
    save_embedding(tmp_path, "tok", {"emb_params": torch.zeros(1, 4)}, META, overwrite=True)
    assert torch.equal(
        read_embedding(tmp_path / "tok.safetensors")[0]["emb_params"], torch.zeros(1, 4)
    )


def test_a_crash_before_the_final_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_embedding(tmp_path, "tok", {"emb_params": torch.ones(1, 4)}, META, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(InvalidParameterError, match="metadata"):
        save_embedding(
            tmp_path, "tok", {"emb_params": torch.ones(1, 4)}, {"epsilon": 1.0}, overwrite=False
        )
    assert list(tmp_path.iterdir()) == []


def test_a_folder_at_the_files_path_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "tok.safetensors").mkdir()
    with pytest.raises(InvalidParameterError, match=r"'tok\.safetensors'.*is a folder"):
        check_writable(tmp_path, "tok", overwrite=True)


def test_free_space_below_the_files_size_plus_margin_is_refused(tmp_path, monkeypatch):
    import collections

    from comfyui_dp_adapt.dp import embedding_file

    size = embedding_file.embedding_file_bytes(4, 768)
    assert size >= 4 * 4 * 768
    usage = collections.namedtuple("usage", "total used free")
    need = size + embedding_file.FREE_SPACE_MARGIN
    monkeypatch.setattr(embedding_file.shutil, "disk_usage", lambda _p: usage(0, 0, need - 1))
    with pytest.raises(InvalidParameterError, match="KiB free"):
        check_writable(tmp_path, "tok", overwrite=False, size_bytes=size)
    monkeypatch.setattr(embedding_file.shutil, "disk_usage", lambda _p: usage(0, 0, need))
    assert check_writable(tmp_path, "tok", overwrite=False, size_bytes=size).name == (
        "tok.safetensors"
    )
