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
