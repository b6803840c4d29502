"""bf16 autocast training (nodes/training_precision.py) on ComfyUI's tiny SD1.x / SDXL models:
the UNet computes in bfloat16, the trained vectors and Adam's state stay fp32, the gradient
stays close to fp32's, the images stay uncoupled bitwise, the model is left untouched."""

from __future__ import annotations

import pytest
import torch

from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.inversion import InversionConfig, train_per_image_embeddings
from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(comfy, request):
    from comfyui_dp_adapt.nodes import comfy_compat, inversion_model
    from comfyui_dp_adapt.tests.support.tiny_components import tiny_sd1_components

    parts = tiny_sd1_components(family=request.param)
    images = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(11))
    parts["latents"] = torch.cat(
        [
            comfy_compat.encode_latents(parts["model"], parts["vae"], images[i : i + 1])
            for i in range(5)
        ]
    )
    parts["family"] = inversion_model.detect_family(parts["model"], parts["clip"])
    return parts


def _train(tiny, rows, *, precision, per_batch=2, steps=2, seeds=(41, 42, 43, 44, 45)):
    from comfyui_dp_adapt.nodes import inversion_model as im

    clip, family = tiny["clip"], tiny["family"]
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        im.training_passes(tiny["model"], precision=precision) as denoise_loss,
    ):
        return train_per_image_embeddings(
            tiny["latents"][rows],
            initial=im.token_vectors(clip, family, "painting"),
            prompts=im.tokenize_templates(clip, family, STYLE_TEMPLATES, 1),
            config=InversionConfig(steps=steps, learning_rate=0.01, images_per_batch=per_batch),
            seeds=[seeds[i] for i in rows],
            text_forward=im.make_text_forward(clip, family),
            denoise_loss=denoise_loss,
            public_rows=6,
        )


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


def test_bf16_computes_the_unet_in_bfloat16_and_keeps_vectors_and_adam_fp32(tiny, monkeypatch):
    unet = tiny["model"].model.diffusion_model
    before = _weights(unet)
    seen_dtypes = set()
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen_dtypes.add(o.dtype)) for m in linears]
    optimisers = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    try:
        vectors = _train(tiny, [0, 1, 2], precision="bf16")
    finally:
        for hook in hooks:
            hook.remove()
    assert seen_dtypes == {torch.bfloat16}, "the UNet's products run in bfloat16"
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    initial = _initial(tiny)
    assert (vectors - initial).abs().amax() > 0, "training moved the vectors"
    assert optimisers, "the trainer uses Adam"
    for optimiser in optimisers:
        for group in optimiser.param_groups:
            assert all(p.dtype == torch.float32 for p in group["params"])
        for state in optimiser.state.values():
            assert state["exp_avg"].dtype == torch.float32
            assert state["exp_avg_sq"].dtype == torch.float32
    after = _weights(unet)
    assert all(after[k].dtype == before[k].dtype for k in before), "weights keep their dtype"
    assert all(torch.equal(after[k], before[k]) for k in before), "weights are unchanged"


def _initial(tiny):
    from comfyui_dp_adapt.nodes import inversion_model as im

    return im.token_vectors(tiny["clip"], tiny["family"], "painting")


def test_bf16_gradient_points_where_the_fp32_gradient_does(tiny):
    """One step's update direction: bfloat16 rounding, not a different gradient."""
    from comfyui_dp_adapt.nodes import inversion_model as im

    clip, family, model = tiny["clip"], tiny["family"], tiny["model"]
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:2], 1)
    generator = torch.Generator().manual_seed(3)
    latents = tiny["latents"][:2]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([300.0, 700.0])

    def gradient(precision):
        with torch.inference_mode(False), torch.enable_grad():
            vectors = _initial(tiny).repeat(2, 1, 1).clone().requires_grad_(True)
            with im.training_passes(model, precision=precision) as denoise_loss:
                context = im.make_text_forward(clip, family)(prompts.ids, prompts.mask, vectors)
                loss = denoise_loss(latents, context, timesteps, noise)
                assert loss.dtype == torch.float32, "the loss is fp32"
                (grad,) = torch.autograd.grad(loss.sum(), vectors)
        return grad.reshape(-1)

    exact, rounded = gradient("model"), gradient("bf16")
    assert exact.abs().max() > 0 and rounded.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(exact, rounded, dim=0)
    assert cosine > 0.98, f"cosine {float(cosine):.4f}"
    assert not torch.equal(exact, rounded), "bf16 did change the arithmetic"


@pytest.mark.parametrize("per_batch", [2, 4])
def test_bf16_removing_any_image_leaves_the_others_bitwise_identical(tiny, per_batch):
    """docs/privacy.md §3.2 under bf16 autocast: padded chunks re-split, others unchanged."""
    full = _train(tiny, list(range(5)), precision="bf16", per_batch=per_batch)
    for removed in range(5):
        keep = [i for i in range(5) if i != removed]
        assert torch.equal(full[keep], _train(tiny, keep, precision="bf16", per_batch=per_batch)), (
            f"removing image {removed} moved another"
        )


def test_unknown_precision_is_refused_by_name(comfy):
    from comfyui_dp_adapt.nodes.training_precision import check_precision

    with pytest.raises(InvalidParameterError, match=r"precision must be one of model, bf16"):
        check_precision("fp8", torch.device("cpu"))


def test_bf16_on_a_device_without_autocast_is_refused(comfy):
    """Refused before training, not left to autocast, which may only warn and run fp32."""
    from comfyui_dp_adapt.nodes.training_precision import check_precision

    with pytest.raises(InvalidParameterError, match=r"needs autocast.*device meta"):
        check_precision("bf16", torch.device("meta"))
    check_precision("model", torch.device("meta"))  # the default needs nothing


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("adds_in_place", [False, True])
def test_bf16_warns_where_it_would_not_be_faster(comfy, monkeypatch, caplog, native, adds_in_place):
    """A CPU without native bfloat16, or a ComfyUI copy whose blocks add in place."""
    from comfyui_dp_adapt.nodes import comfy_compat, training_precision

    monkeypatch.setattr(training_precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(comfy_compat, "transformer_blocks_add_in_place", lambda: adds_in_place)
    with caplog.at_level("WARNING"):
        training_precision.check_precision("bf16", torch.device("cpu"))
    assert ("without AVX512-BF16 or AMX" in caplog.text) == (not native)
    assert ("add in place" in caplog.text) == adds_in_place
    caplog.clear()
    with caplog.at_level("WARNING"):
        training_precision.check_precision("model", torch.device("cpu"))
    assert caplog.text == "", "the default precision never warns"


def test_bf16_dpsgd_per_example_gradients_stay_uncoupled_bitwise(tiny):
    """docs/privacy.md §4 under bf16 autocast: changing one example's latent leaves every other
    example's gradient bitwise equal, and the gradients come back fp32 for clipping."""
    from comfyui_dp_adapt.dp.dpsgd import per_example_gradients
    from comfyui_dp_adapt.nodes import inversion_model as im

    clip, family = tiny["clip"], tiny["family"]
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:3], 1)
    latents = tiny["latents"][:3]
    generator = torch.Generator().manual_seed(6)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        im.training_passes(tiny["model"], precision="bf16") as denoise_loss,
    ):
        text_forward = im.make_text_forward(clip, family)

        def grads(lat):
            return per_example_gradients(
                lat,
                _initial(tiny),
                prompts.ids,
                prompts.mask,
                timesteps,
                noise,
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )

        together = grads(latents)
        changed = latents.clone()
        changed[1] = torch.randn_like(changed[1])
        after = grads(changed)
    assert together.dtype == torch.float32 and together.abs().amax() > 0
    assert torch.equal(together[0], after[0]) and torch.equal(together[2], after[2])
    assert not torch.equal(together[1], after[1])
