"""Zero-copy normal tensors for inference-mode weights (dp/autograd_alias.py)."""

from __future__ import annotations

import torch

from comfyui_dp_adapt.dp.autograd_alias import autograd_alias


def inference_tensor(*shape) -> torch.Tensor:
    with torch.inference_mode():
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_the_alias_shares_memory_and_autograd_may_save_it():
    weight = inference_tensor(5, 3)
    alias = autograd_alias(weight)
    assert not alias.is_inference() and alias.data_ptr() == weight.data_ptr()
    assert torch.equal(alias, weight)
    x = torch.randn(2, 5, requires_grad=True)
    (x @ torch.nn.Parameter(alias, requires_grad=False)).square().sum().backward()
    reference = torch.randn(2, 5).copy_(x.detach()).requires_grad_(True)
    (reference @ weight.clone()).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_normal_tensors_are_returned_as_they_are():
    tensor = torch.randn(3)
    assert autograd_alias(tensor) is tensor


def test_what_dlpack_cannot_express_is_cloned():
    with torch.inference_mode():
        conjugated = torch.randn(3, dtype=torch.complex64).conj()
    out = autograd_alias(conjugated)
    assert not out.is_inference() and torch.equal(out, conjugated.resolve_conj())
