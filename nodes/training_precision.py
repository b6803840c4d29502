"""The arithmetic the training passes run in: the model's own dtype, or bfloat16 autocast.

- ``model`` (the default): whatever ComfyUI loaded the model in. fp32 on a CPU; fp16 or bf16
  on most GPUs, where ComfyUI's own casts already make training mixed-precision.
- ``bf16``: ``torch.autocast`` to bfloat16 around the training passes. Matrix products,
  convolutions and attention of the UNet and the text encoder run in bfloat16. The weights
  are not copied or changed (each op casts what it needs). The loss, the trained vectors and
  Adam's state stay fp32. On a CPU with native bfloat16 (AVX512-BF16 or AMX) this is where
  the speed is: about 1.6x fp32 per training step at SD1.5 size (``bench/``, docs/performance.md) on
  current ComfyUI. Not on old copies whose transformer blocks add in place: there autograd
  copies every tensor it saves (``lean_training.py``), the weights' casts too, which ate the
  gain in a measurement.

Privacy is the same in both (docs/privacy.md §3.2): each image's vector still depends only on
that image (tested bitwise under bf16 too), and bounding, noise and accounting run in fp32 /
fp64 on the result. The choice is a public setting, recorded with the release.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..dp.errors import InvalidParameterError

logger = logging.getLogger(__name__)

PRECISIONS = ("model", "bf16")

PRECISION_INPUT = (
    list(PRECISIONS),
    {
        "default": PRECISIONS[0],
        "tooltip": "model: train in the dtype ComfyUI loaded the model in (fp32 on a CPU, "
        "fp16/bf16 on a GPU). bf16: bfloat16 autocast for the training passes, about 1.6x "
        "faster on a CPU with AVX512-BF16 or AMX; the trained vectors stay fp32. Privacy is "
        "the same either way.",
    },
)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that make bfloat16 products fast."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse an unknown choice or a device that cannot run it; warn where it would be slow."""
    if precision not in PRECISIONS:
        raise InvalidParameterError(
            f"precision must be one of {', '.join(PRECISIONS)}, got precision={precision!r}."
        )
    if precision != "bf16":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise InvalidParameterError(
            f"precision=bf16 needs autocast, which PyTorch does not offer on device "
            f"{device.type}. Use precision=model."
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidParameterError(
            f"precision=bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
            "has none. Use precision=model (ComfyUI's fp16)."
        )
    if device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "precision=bf16 on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there "
            "and slower than fp32. precision=model is faster on this machine."
        )
    from .comfy_compat import transformer_blocks_add_in_place

    if transformer_blocks_add_in_place():
        # There autograd must copy every tensor it saves (lean_training.py), the weights'
        # bfloat16 casts included: measured no faster than fp32 at SD1.5 size.
        logger.warning(
            "precision=bf16 gains little on this ComfyUI version: its transformer blocks add "
            "in place, so training copies every tensor autograd saves. Update ComfyUI for "
            "the speed-up."
        )


def training_precision(precision: str, device: torch.device):
    """The context the training loop runs in (checked with ``check_precision`` first).
    Checkpointed blocks recompute under the autocast state of their forward pass."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
