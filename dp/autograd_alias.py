"""Weights that autograd may save, without copying them.

ComfyUI creates model weights under ``torch.inference_mode()``, and autograd refuses to save an
inference tensor for backward, even one that needs no gradient. Cloning each weight outside
inference mode works but holds a second copy of the model (and, redone at every guidance
step, costs the copy's time). A DLPack round trip (``to_dlpack`` / ``from_dlpack``, the
standard zero-copy tensor exchange) gives a normal tensor over the same memory instead: same
values, same storage, no copy. A tensor DLPack cannot express faithfully (a lazily conjugated
or negated view) is cloned instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack


def autograd_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A non-inference tensor with ``tensor``'s values, sharing its memory when possible."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        if tensor.is_conj() or tensor.is_neg():
            # DLPack carries no lazy conjugate/negation bit: the alias would show the
            # un-conjugated values (seen with torch 2.14), so copy instead.
            return tensor.detach().clone()
        try:
            alias = from_dlpack(to_dlpack(tensor.detach()))
        except (RuntimeError, BufferError, TypeError):
            return tensor.detach().clone()
        if alias.is_inference() or alias.data_ptr() != tensor.data_ptr():
            return tensor.detach().clone()
        return alias


@contextmanager
def clone_saved_tensors(
    enabled: bool = True, *, keep: Iterable[torch.nn.Module] = ()
) -> Iterator[None]:
    """Clone every tensor autograd saves, so a later in-place add cannot invalidate it.

    ComfyUI's CLIP layers (and old ComfyUI's transformer blocks) add residuals in place;
    cloning the saved activations makes backward work without touching ComfyUI. Tensors on
    the storage of a parameter or buffer of a ``keep`` module are saved as they are: weights
    are never changed in place, and cloning them (every linear and convolution saves its
    weight) copied the whole model at every pass.
    """
    if not enabled:
        yield
        return
    weights = {
        tensor.untyped_storage().data_ptr()
        for module in keep
        for tensor in (*module.parameters(), *module.buffers())
    }

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() in weights:
            return tensor
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
