"""Keyed dataset fingerprints: the ledger's dataset key without a membership oracle.

A plain SHA-256 of the private files lets anyone holding a candidate collection test
whether it is the private one. The fingerprint the nodes output is therefore an HMAC-SHA256
(RFC 2104) of the raw content hash under a random key that never leaves this installation
(stored next to the ledgers). It still identifies the same files consistently for the
ledger, but reveals nothing testable to someone without the key.
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


def load_or_create_key(path: Path) -> bytes:
    """The installation's fingerprint key, created once (atomically, owner-only permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise DpAdaptError(
                f"fingerprint key {path} is damaged ({len(key)} bytes, expected {KEY_BYTES}). "
                "Restore it from a backup; deleting it starts new ledger datasets."
            ) from None
        return key
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def keyed_fingerprint(content_fingerprint: str, key: bytes) -> str:
    """``hmac-sha256:<hex>`` of a content fingerprint under the installation key."""
    digest = hmac.new(key, content_fingerprint.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest
