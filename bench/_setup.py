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

SD15_UNET = {
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": 768,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}


def bootstrap_comfyui(cuda: bool, prefix: str) -> Path:
    """Register the pack, copy ComfyUI to a scratch folder (removed at exit), import it."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    from comfyui_dp_adapt.headless import comfy_env

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    comfy_dir = comfy_env.make_scratch_comfyui(scratch / "ComfyUI")
    comfy_env.import_comfyui_in_process(comfy_dir, cpu=not cuda)
    return scratch
