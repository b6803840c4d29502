"""Showing user-given paths in messages without flooding them (a 5,000-character path)."""

from __future__ import annotations

MAX_SHOWN_PATH = 200


def shown_path(path: object, limit: int = MAX_SHOWN_PATH) -> str:
    """``path`` as a message shows it: control characters escaped, and at most ``limit``
    characters, longer ones keeping their start and end around an ellipsis."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return f"{text[:keep]}…{text[-keep:]}"
