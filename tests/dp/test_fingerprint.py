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
