"""Keyed image fingerprints: the ledger's per-image keys without a membership oracle.

A plain SHA-256 of a private file lets anyone holding a candidate image test whether it is
one of the private ones. The keys the loader outputs are therefore an HMAC-SHA256 (RFC 2104)
of each picture's pixel digest (``dp.images.pixel_digest``: the SHA-256 of its decoded,
oriented pixels) under a random key that never leaves this installation (stored next to the
ledgers). They identify the same picture consistently for the ledger (whatever its file
name, format, compression, metadata, folder or the loading resolution), but reveal nothing
testable to someone without the key, and nothing shared between two installations.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import DpAdaptError

KEY_BYTES = 32
PREFIX = "hmac-sha256:"
KEY_CHECK_MESSAGE = b"comfyui-dp-adapt key check"


def load_or_create_key(path: Path) -> bytes:
    """The installation's fingerprint key, created once (atomically, owner-only permissions).

    The key is written and flushed to a private temporary file first and then hard-linked
    to ``path``, which fails if ``path`` exists: a concurrent caller therefore sees either
    no key or the whole key, never a half-written one, and two callers racing to create it
    end up with the same key.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_key(path)
        key = path.read_bytes()
    except OSError as error:
        what = "is a folder, not a file" if path.is_dir() else f"cannot be used ({error.strerror})"
        raise DpAdaptError(
            f"fingerprint key {path} {what}. It must be the {KEY_BYTES}-byte key file this "
            "installation created: restore it from a backup (or move the folder aside; a new "
            "key is then created, and a ledger that recorded images under the old key refuses "
            "releases until the old key is restored)."
        ) from error
    if len(key) != KEY_BYTES:
        raise DpAdaptError(
            f"fingerprint key {path} is damaged ({len(key)} bytes, expected {KEY_BYTES}). "
            "Restore it from a backup: a ledger that recorded images under it refuses "
            "releases under any other key."
        )
    return key


def _create_key(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another caller created it first: use theirs
    finally:
        temporary.unlink(missing_ok=True)


def key_check_value(key: bytes) -> str:
    """A public check value of the installation key: HMAC-SHA256(key, KEY_CHECK_MESSAGE), hex.

    The ledger stores it with its image entries and refuses a commit under another key
    (``dp.ledger.Ledger.check_key``). It reveals nothing about the key or any image (an HMAC
    of a fixed public message), and it is not an image key.
    """
    return hmac.new(key, KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()


def keyed_fingerprint(content_fingerprint: str, key: bytes) -> str:
    """``hmac-sha256:<hex>`` of a content fingerprint (the loader passes each picture's
    ``"sha256:<hex>"`` pixel digest, ``dp.images.pixel_digest``) under the installation key."""
    digest = hmac.new(key, content_fingerprint.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest
