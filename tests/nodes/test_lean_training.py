"""Memory-lean UNet passes (fused attention, block checkpointing) on a real ComfyUI's UNet:
the same gradients as the plain pass, everything restored afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(comfy, request):
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    built = tiny_models.build_tiny_model(family=request.param)
    comfy_compat.load_models([built])
    return built


def context_gradient(model, lean: bool) -> tuple[torch.Tensor, ...]:
    """d(denoising loss)/d(context) (and d/d(pooled) on SDXL) at fixed latents,
    timesteps and noise."""
    from comfyui_dp_adapt.nodes import inversion_model as im
    from comfyui_dp_adapt.nodes import tiny_models

    unet = model.model.model_config.unet_config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    inputs = [torch.randn(3, 77, unet["context_dim"], generator=generator)]
    if unet.get("adm_in_channels"):  # SDXL: the pooled text embedding reaches the ADM input
        width = unet["adm_in_channels"] - tiny_models.SDXL_SIZE_EMBEDDING
        inputs.append(torch.randn(3, width, generator=generator))
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    with torch.inference_mode(False), torch.enable_grad():
        inputs = [x.clone().requires_grad_(True) for x in inputs]
        context = inputs[0] if len(inputs) == 1 else tuple(inputs)
        if lean:
            with im.training_passes(model) as loss:
                losses = loss(latents, context, timesteps, noise)
                gradients = torch.autograd.grad(losses.sum(), inputs)
        else:
            losses = im.make_denoise_loss(model)(latents, context, timesteps, noise)
            gradients = torch.autograd.grad(losses.sum(), inputs)
    return gradients


def test_lean_passes_give_the_plain_gradient(model):
    for plain, lean in zip(
        context_gradient(model, lean=False), context_gradient(model, lean=True), strict=True
    ):
        assert plain.abs().max() > 0
        # float32 rounding of a different attention kernel; the bug this guards against was 15 %.
        torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))


def test_blocks_are_checkpointed_only_where_the_copy_allows_it(model):
    from comfy.ldm.modules import attention

    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.inversion_model import training_passes
    from comfyui_dp_adapt.nodes.lean_training import _checkpointable_types

    blocks = [
        m for m in model.model.diffusion_model.modules() if isinstance(m, _checkpointable_types())
    ]
    assert blocks
    with training_passes(model):
        wrapped = [m for m in blocks if "forward" in m.__dict__]
        assert attention.optimized_attention is attention.attention_pytorch
    in_place = comfy_compat.transformer_blocks_add_in_place()
    assert len(wrapped) == (0 if in_place else len(blocks))


def test_everything_is_restored_even_after_an_error(model):
    from comfy.ldm.modules import attention

    from comfyui_dp_adapt.nodes.inversion_model import training_passes

    before = attention.optimized_attention
    with pytest.raises(RuntimeError, match="inside"), training_passes(model):
        raise RuntimeError("inside")
    assert attention.optimized_attention is before
    assert not [m for m in model.model.diffusion_model.modules() if "forward" in m.__dict__]


def test_the_unet_output_is_unchanged_inside_the_lean_passes(model):
    from comfyui_dp_adapt.nodes.inversion_model import training_passes

    unet = model.model.model_config.unet_config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet["context_dim"], generator=generator)
    extra = {}
    if unet.get("adm_in_channels"):
        extra["y"] = torch.randn(2, unet["adm_in_channels"], generator=generator)
    sigma = torch.tensor([1.0, 5.0])

    def denoised():
        with torch.inference_mode():
            return model.model.apply_model(
                x, sigma, c_crossattn=context, transformer_options={}, **extra
            )

    plain = denoised()
    with training_passes(model):
        lean = denoised()
    torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-5)


def test_checkpointing_is_chosen_from_public_pass_sizes_only():
    from comfyui_dp_adapt.nodes.inversion_model import wants_checkpointing

    assert wants_checkpointing((4, 64, 64), images_per_batch=2)  # 2 x 512 px
    assert not wants_checkpointing((4, 32, 32), images_per_batch=2)  # 2 x 256 px
    assert wants_checkpointing((4, 32, 32), images_per_batch=8)


def test_saved_activations_are_cloned_but_weights_are_not():
    """Old ComfyUI adds in place, so what autograd saves is cloned; weights never change in
    place, and cloning them copied the whole UNet at every step."""
    from comfyui_dp_adapt.nodes.lean_training import saved_tensor_clones

    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    with saved_tensor_clones(True, layer):
        y = layer(x)
    saved_input, saved_weight = y.grad_fn._saved_mat1, y.grad_fn._saved_mat2
    assert saved_weight.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert saved_input.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    torch.testing.assert_close(saved_input, x)
    with saved_tensor_clones(True):  # no module given: everything is cloned, as before
        z = layer(x)
    assert (
        z.grad_fn._saved_mat2.untyped_storage().data_ptr()
        != layer.weight.untyped_storage().data_ptr()
    )
