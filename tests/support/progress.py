"""What ComfyUI's progress bars publish, recorded through its global progress hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def recorded_progress() -> Iterator[list[tuple[int, int]]]:
    """Collects (value, total) of every progress update while the block runs."""
    import comfy.utils

    seen: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda v, total, *a, **k: seen.append((v, total)))
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
