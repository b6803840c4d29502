"""Memory-lean gradient passes through ComfyUI's UNet: fused attention and block checkpointing.

For the length of a training loop, and undone afterwards:

- **Fused attention.** ComfyUI picks its attention function once at start-up; on a CPU it is
  the chunked "sub-quadratic" one, whose chunks autograd keeps for backward. Inside the loop
  the UNet's cross-attention calls PyTorch's ``scaled_dot_product_attention`` instead
  (ComfyUI's own ``attention_pytorch``), whose fused kernels (flash / memory-efficient, CPU
  and CUDA) do not materialise the attention matrix in backward either.
- **Gradient checkpointing** (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
  Cost"): every ResBlock and SpatialTransformer of the UNet keeps only its inputs; its inner
  activations are recomputed in backward. Peak activation memory falls from the sum over all
  blocks to about one block, for one extra forward pass. Not on old ComfyUI, whose
  transformer blocks add in place (``x += n``): recomputation would save the tensor the add
  then changes, and the gradient came out 15 % wrong in a test, silently. There autograd
  keeps cloning what it saves (``saved_tensor_clones``), for the whole pass.

Gradients are unchanged up to floating-point rounding (tested against the plain pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


def _checkpointable_types() -> tuple[type, ...]:
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return (ResBlock, SpatialTransformer)


def saved_tensor_clones(enabled: bool, module: torch.nn.Module | None = None):
    """Clone what autograd saves, except ``module``'s weights (``dp/autograd_alias.py``)."""
    from ..dp.autograd_alias import clone_saved_tensors

    return clone_saved_tensors(enabled, keep=() if module is None else (module,))


def _checkpointed(forward):
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return forward(*args, **kwargs)  # nothing here leads back to a trained vector
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def lean_unet_passes(model, *, checkpoint_blocks: bool = True) -> Iterator[bool]:
    """Within the block: fused attention and, where the ComfyUI copy allows it, per-block
    checkpointing of ``model``'s UNet (a ComfyUI MODEL). Yields whether autograd must still
    clone what it saves (old ComfyUI, see the module's docstring). Everything is restored on
    exit, errors included."""
    from comfy.ldm.modules import attention

    from .comfy_compat import transformer_blocks_add_in_place

    in_place = transformer_blocks_add_in_place()
    diffusion_model = model.model.diffusion_model
    previous_attention = attention.optimized_attention
    fused = getattr(attention, "attention_pytorch", None)
    patched = []
    try:
        if fused is not None:
            attention.optimized_attention = fused
        if checkpoint_blocks and not in_place:
            types = _checkpointable_types()
            for module in diffusion_model.modules():
                if isinstance(module, types) and "forward" not in module.__dict__:
                    module.forward = _checkpointed(module.forward)
                    patched.append(module)
        yield in_place
    finally:
        attention.optimized_attention = previous_attention
        for module in patched:
            del module.forward
