"""What every benchmark here shares: the pack under a fixed name, a scratch ComfyUI imported
in-process, and the real SD1.5 sizes for random-weight models on a GPU."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_dp_adapt"


def _register_package() -> None:
    """Make the repository importable as ``comfyui_dp_adapt`` (what ComfyUI would name it)."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package


_register_package()
from comfyui_dp_adapt.nodes.tiny_models import (  # noqa: E402
    SD15_TEXT,
    SD15_UNET,
    SD_VAE_DDCONFIG,
)

__all__ = [
    "SD15_TEXT",
    "SD15_UNET",
    "SD_VAE_DDCONFIG",
    "bootstrap_comfyui",
    "peak_rss",
    "reset_peak_rss",
]


def bootstrap_comfyui(cuda: bool, prefix: str) -> Path:
    """Register the pack, copy ComfyUI to a scratch folder (removed at exit), import it."""
    _register_package()
    from comfyui_dp_adapt.headless import comfy_env

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    comfy_dir = comfy_env.make_scratch_comfyui(scratch / "ComfyUI")
    comfy_env.import_comfyui_in_process(comfy_dir, cpu=not cuda)
    return scratch


def reset_peak_rss() -> None:
    """Forget the loading's peak (the checkpoint file and its fp32 copy are briefly both in
    memory), so that the reported peak is the training's: Linux resets VmHWM on "5"."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak includes loading


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, per address space and fresh at
    exec. Not Linux: ``ru_maxrss``, which Linux would carry over from a parent."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
