"""Universal guidance maths (dp/guidance.py) on small differentiable toy models, in float64.

The toy denoiser depends nonlinearly on x (so "full" and "x0" really differ) and the toy
"decoder + image encoder" is a nonlinear map to a unit sphere; the real ComfyUI models are
covered in tests/nodes/test_guidance_sampler.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_dp_adapt.dp.errors import DpAdaptError
from comfyui_dp_adapt.dp.guidance import (
    MAX_SELF_RECURRENCE,
    MAX_VIEWS,
    ClipTarget,
    GuidanceConfig,
    GuidanceMode,
    GuidanceSchedule,
    WeightSwap,
    augmented_views,
    check_target_width,
    clip_guidance_loss,
    eps_form_prediction,
    guided_prediction,
    latents_for_clip,
    make_guidance_loss,
    preprocess_for_clip,
    renoise,
)

B, C, H, W, D = 3, 4, 4, 4, 8
DT = torch.float64


def toy_parts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g, dtype=DT) / 2
    decode_w = torch.randn(3 * 8 * 8, C * H * W, generator=g, dtype=DT) / (C * H * W) ** 0.5
    embed_w = torch.randn(D, 3 * 8 * 8, generator=g, dtype=DT) / 8
    target = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=DT), dim=0)

    def make_denoiser(sigma: float):
        def denoiser(x):
            # nonlinear in x, so d denoised / dx is far from the identity
            eps = torch.tanh(torch.einsum("bchw,cd->bdhw", x / math.sqrt(1 + sigma**2), mix))
            return x - sigma * eps

        return denoiser

    def decode(latents):
        return torch.sigmoid(latents.flatten(1) @ decode_w.T).view(-1, 3, 8, 8)

    def embed(images):
        return torch.tanh(images.flatten(1) @ embed_w.T)

    loss = make_guidance_loss(decode=decode, embed=embed, target=target)
    return make_denoiser, loss, target


@pytest.mark.parametrize("mode", list(GuidanceMode))
@pytest.mark.parametrize("sigma", [0.3, 1.7, 9.0])
def test_sigma_form_equals_the_papers_eps_form(mode, sigma):
    make_denoiser, loss, _ = toy_parts()
    denoiser = make_denoiser(sigma)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1), dtype=DT) * (1 + sigma)
    strength = 0.7
    sigma_form = guided_prediction(
        x,
        torch.full((B,), sigma, dtype=DT),
        denoiser(x),
        loss_fn=loss,
        strength=strength,
        mode=mode,
        denoiser=denoiser,
    ).denoised

    alpha_bar = 1.0 / (1.0 + sigma**2)  # sigma^2 = (1 - abar) / abar

    def eps_fn(z_t):
        x_ = z_t / math.sqrt(alpha_bar)
        return (x_ - denoiser(x_)) / sigma

    paper = eps_form_prediction(
        x * math.sqrt(alpha_bar),
        alpha_bar,
        eps_fn=eps_fn,
        loss_fn=loss,
        strength=strength,
        mode=mode,
    )
    assert (sigma_form - denoiser(x)).abs().max() > 1e-3, "the correction must not be trivial"
    torch.testing.assert_close(sigma_form, paper, rtol=1e-10, atol=1e-10)


def test_full_and_x0_modes_differ_when_the_denoiser_is_nonlinear():
    make_denoiser, loss, _ = toy_parts()
    denoiser = make_denoiser(1.7)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2), dtype=DT)
    results = {
        mode: guided_prediction(
            x, 1.7, denoiser(x), loss_fn=loss, strength=1.0, mode=mode, denoiser=denoiser
        ).gradient
        for mode in GuidanceMode
    }
    assert not torch.allclose(results[GuidanceMode.FULL], results[GuidanceMode.X0], atol=1e-6)


def test_guidance_step_lowers_the_loss():
    make_denoiser, loss, _ = toy_parts()
    denoiser = make_denoiser(0.5)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(3), dtype=DT)
    before = denoiser(x)
    step = guided_prediction(x, 0.5, before, loss_fn=loss, strength=0.05, mode="x0")
    assert (loss(step.denoised) < loss(before)).all()


def test_each_images_correction_depends_on_that_image_only():
    make_denoiser, loss, _ = toy_parts()
    denoiser = make_denoiser(1.0)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(4), dtype=DT)
    changed = x.clone()
    changed[2] = torch.randn(C, H, W, generator=torch.Generator().manual_seed(5), dtype=DT)
    a, b = (
        guided_prediction(
            v, 1.0, denoiser(v), loss_fn=loss, strength=1.0, mode="full", denoiser=denoiser
        ).denoised
        for v in (x, changed)
    )
    assert torch.equal(a[:2], b[:2])
    assert not torch.equal(a[2], b[2])


def test_renoise_is_algorithm_1_in_the_variance_exploding_variable():
    # Bansal et al. Alg. 1: z_t = sqrt(a_t / a_s) z_s + sqrt(1 - a_t / a_s) eps', s = t - 1.
    sigma_s, sigma_t = 0.8, 2.5
    a_s, a_t = 1 / (1 + sigma_s**2), 1 / (1 + sigma_t**2)
    g = torch.Generator().manual_seed(6)
    x_s = torch.randn(B, C, H, W, generator=g, dtype=DT)
    noise = torch.randn(B, C, H, W, generator=g, dtype=DT)
    z_s = math.sqrt(a_s) * x_s
    z_t = math.sqrt(a_t / a_s) * z_s + math.sqrt(1 - a_t / a_s) * noise
    torch.testing.assert_close(renoise(x_s, sigma_s, sigma_t, noise) * math.sqrt(a_t), z_t)
    with pytest.raises(DpAdaptError, match="sigma_from"):
        renoise(x_s, sigma_t, sigma_s, noise)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": float("nan")}, "guidance_strength"),
        ({"strength": -0.5}, "guidance_strength"),
        ({"strength": float("inf")}, "guidance_strength"),
        ({"strength": True}, "guidance_strength"),
        ({"strength": 1.0, "self_recurrence": MAX_SELF_RECURRENCE + 1}, "self_recurrence"),
        ({"strength": 1.0, "self_recurrence": -1}, "self_recurrence"),
        ({"strength": 1.0, "self_recurrence": 1.5}, "self_recurrence"),
        ({"strength": 1.0, "mode": "latent"}, "mode"),
        ({"strength": 1.0, "decode_size": "half"}, "decode_size"),
        ({"strength": 1.0, "schedule": "linear"}, "schedule"),
        ({"strength": 1.0, "views": 0}, "views"),
        ({"strength": 1.0, "views": MAX_VIEWS + 1}, "views"),
        ({"strength": 1.0, "views": 2.5}, "views"),
        ({"strength": 1.5, "schedule": "normalized"}, "normalized"),
    ],
)
def test_bad_guidance_settings_fail_clearly(kwargs, message):
    with pytest.raises(DpAdaptError, match=message) as error:
        GuidanceConfig(**kwargs)
    assert "got" in str(error.value), "the message echoes the value received"


def test_default_schedule_is_the_papers_sigma_squared():
    assert GuidanceConfig(strength=1.0).schedule is GuidanceSchedule.SIGMA_SQUARED
    assert GuidanceConfig(strength=1.0, schedule="constant").schedule is GuidanceSchedule.CONSTANT


@pytest.mark.parametrize("sigma", [0.3, 1.7, 14.6])
def test_constant_schedule_moves_the_prediction_by_s_times_the_gradient_at_every_sigma(sigma):
    """``constant``: denoised' = denoised - s * grad, whatever the noise level; ``sigma^2``
    (eq. 2) is the same step scaled by sigma^2."""
    make_denoiser, loss, _ = toy_parts(4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, C, H, W, generator=g, dtype=DT) * math.sqrt(1 + sigma**2)
    denoised = make_denoiser(sigma)(x)
    strength = 3.0
    steps = {
        schedule: guided_prediction(
            x, sigma, denoised, loss_fn=loss, strength=strength, mode="x0", schedule=schedule
        )
        for schedule in GuidanceSchedule
    }
    constant = steps[GuidanceSchedule.CONSTANT]
    paper = steps[GuidanceSchedule.SIGMA_SQUARED]
    torch.testing.assert_close(constant.gradient, paper.gradient)
    assert float(constant.gradient.abs().max()) > 0
    torch.testing.assert_close(denoised - constant.denoised, strength * constant.gradient)
    torch.testing.assert_close(denoised - paper.denoised, sigma**2 * (denoised - constant.denoised))


@pytest.mark.parametrize("sigma", [0.3, 14.6])
def test_normalized_schedule_moves_each_prediction_by_s_times_its_own_norm(sigma):
    """``normalized``: denoised' = denoised - s |denoised| grad / |grad|, per image."""
    make_denoiser, loss, _ = toy_parts(6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, C, H, W, generator=g, dtype=DT) * math.sqrt(1 + sigma**2)
    denoised = make_denoiser(sigma)(x)
    strength = 0.15
    step = guided_prediction(
        x, sigma, denoised, loss_fn=loss, strength=strength, mode="x0", schedule="normalized"
    )
    moved = (denoised - step.denoised).flatten(1)
    torch.testing.assert_close(moved.norm(dim=1), strength * denoised.flatten(1).norm(dim=1))
    direction = torch.nn.functional.cosine_similarity(moved, step.gradient.flatten(1), dim=1)
    torch.testing.assert_close(direction, torch.ones(B, dtype=DT))
    assert (loss(step.denoised) < loss(denoised)).all(), "a small step lowers every loss"


def test_normalized_schedule_leaves_a_prediction_with_zero_gradient_unchanged():
    denoised = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(8), dtype=DT)

    def flat_for_the_first(latents):  # image 0's loss does not depend on its latent
        return torch.cat([latents[:1].sum(dim=(1, 2, 3)) * 0, latents[1:].sum(dim=(1, 2, 3))])

    step = guided_prediction(
        denoised,
        1.0,
        denoised,
        loss_fn=flat_for_the_first,
        strength=0.2,
        mode="x0",
        schedule="normalized",
    )
    assert torch.equal(step.denoised[0], denoised[0])
    assert torch.isfinite(step.denoised).all()
    assert not torch.equal(step.denoised[1], denoised[1])


def test_augmented_views_are_deterministic_crops_and_flips_starting_with_the_image():
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(9), dtype=DT)
    assert augmented_views(images, 1) is images
    views = augmented_views(images, 4, call=3)
    assert views.shape == (8, 3, 16, 12)
    torch.testing.assert_close(views[:2], images)
    torch.testing.assert_close(views, augmented_views(images, 4, call=3))
    assert not torch.allclose(views[2:], augmented_views(images, 4, call=4)[2:])
    assert views.min() >= images.min() and views.max() <= images.max()  # bilinear: no overshoot
    with pytest.raises(DpAdaptError, match="views"):
        augmented_views(images, 0)


def test_loss_over_views_is_the_mean_over_views_and_stays_per_image():
    g = torch.Generator().manual_seed(10)
    embed_w = torch.randn(D, 3 * 8 * 8, generator=g, dtype=DT) / 8
    target = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=DT), dim=0)

    def decode(latents):
        return torch.sigmoid(latents.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, :3])

    def embed(images):
        return torch.tanh(images.flatten(1) @ embed_w.T)

    latents = torch.randn(B, C, H, W, generator=g, dtype=DT, requires_grad=True)
    loss = make_guidance_loss(decode=decode, embed=embed, target=target, views=3)
    values = loss(latents)
    expected = clip_guidance_loss(embed(augmented_views(decode(latents), 3, 0)), target)
    torch.testing.assert_close(values, expected.view(3, B).mean(dim=0))
    (grad,) = torch.autograd.grad(values[1], latents)
    assert float(grad[1].abs().sum()) > 0
    assert float(grad[0].abs().sum()) == 0 and float(grad[2].abs().sum()) == 0


def test_recurrence_up_to_the_bound_is_accepted():
    config = GuidanceConfig(strength=2.0, mode="x0", self_recurrence=MAX_SELF_RECURRENCE)
    assert config.mode is GuidanceMode.X0


@pytest.mark.parametrize(
    ("latent_size", "clip_size", "ratio", "expected"),
    [
        ((64, 64), 224, 8, (28, 28)),  # SD1.5 at 512 px, ViT-L/14
        ((64, 96), 224, 8, (28, 42)),  # landscape: the shorter side is CLIP's size
        ((128, 128), 336, 8, (42, 42)),  # SDXL at 1024 px, a 336 px CLIP
        ((75, 64), 224, 8, (33, 28)),
    ],
)
def test_latents_for_clip_decode_to_clips_size_on_the_shorter_side(
    latent_size, clip_size, ratio, expected
):
    latents = torch.randn(2, 4, *latent_size)
    assert tuple(latents_for_clip(latents, clip_size=clip_size, downscale_ratio=ratio).shape) == (
        2,
        4,
        *expected,
    )


def test_latents_for_clip_leave_small_latents_alone_and_pass_gradients_at_full_size():
    small = torch.randn(1, 4, 28, 40)
    assert latents_for_clip(small, clip_size=224, downscale_ratio=8) is small
    # A smooth field survives the resize (antialiased bilinear): the mean and the ramp's ends.
    ramp = torch.linspace(-1.0, 1.0, 64).view(1, 1, 1, 64).expand(1, 4, 64, 64).clone()
    shrunk = latents_for_clip(ramp, clip_size=224, downscale_ratio=8)
    assert abs(float(shrunk.mean() - ramp.mean())) < 1e-3
    assert float(shrunk[..., 0].mean()) < -0.9 and float(shrunk[..., -1].mean()) > 0.9
    leaf = torch.randn(2, 4, 64, 64, requires_grad=True)
    latents_for_clip(leaf, clip_size=224, downscale_ratio=8).sum().backward()
    assert leaf.grad.shape == leaf.shape
    # The resize averages: each input pixel's weights sum to (28/64)^2 of an output pixel's.
    assert torch.allclose(leaf.grad.sum(), torch.tensor(2 * 4 * 28 * 28.0), rtol=1e-4)


def _target(width: int = D) -> ClipTarget:
    return ClipTarget(
        embedding=torch.nn.functional.normalize(torch.ones(width), dim=0),
        event=None,
        epsilon=1.0,
        delta=1e-5,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        declared_dataset_size=10,
    )


def test_target_must_be_a_finite_unit_vector():
    with pytest.raises(DpAdaptError, match="unit norm"):
        ClipTarget(
            embedding=torch.ones(4),
            event=None,
            epsilon=1.0,
            delta=1e-5,
            noise_multiplier=1.0,
            sampling_rate=1.0,
            declared_dataset_size=10,
        )
    with pytest.raises(DpAdaptError, match="NaN"):
        ClipTarget(
            embedding=torch.tensor([float("nan"), 1.0]),
            event=None,
            epsilon=1.0,
            delta=1e-5,
            noise_multiplier=1.0,
            sampling_rate=1.0,
            declared_dataset_size=10,
        )
    assert _target().width == D


def test_target_built_in_inference_mode_holds_a_tensor_autograd_can_save():
    with torch.inference_mode():
        target = _target()
    x = torch.ones(1, D, requires_grad=True)
    (grad,) = torch.autograd.grad(clip_guidance_loss(x, target.embedding).sum(), x)
    assert not target.embedding.is_inference()
    assert grad.abs().sum() > 0


def test_target_from_another_clip_width_is_refused():
    with pytest.raises(DpAdaptError, match=r"width 8 .* width 16"):
        check_target_width(_target(), 16)
    check_target_width(_target(), D)


def test_loss_is_minus_cosine_to_the_target():
    target = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 2.0]), dim=0)
    embeddings = torch.tensor([[2.0, 4.0, 4.0], [0.0, 0.0, -5.0]])
    torch.testing.assert_close(
        clip_guidance_loss(embeddings, target), torch.tensor([-1.0, 2.0 / 3.0])
    )


def test_clip_preprocessing_is_differentiable_and_crops_the_centre():
    images = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(7), dtype=DT)
    images.requires_grad_(True)
    pixels = preprocess_for_clip(images, size=20)
    assert pixels.shape == (2, 3, 20, 20)
    (grad,) = torch.autograd.grad(pixels.square().sum(), images)
    assert grad.abs().sum() > 0
    assert grad[:, :, :, :5].abs().max() == 0, "the cropped-away border gets no gradient"


def test_weight_swap_makes_inference_weights_trainable_and_restores_them():
    with torch.inference_mode():
        layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    original = dict(layer.named_parameters())
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="nference tensor"):
        torch.autograd.grad(layer(x).square().sum(), x)
    swap = WeightSwap()
    swap.swap([layer])
    swap.swap([layer])  # idempotent: nothing left to swap
    assert swap.count == len(original)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert grad.abs().sum() > 0
    assert all(not p.is_inference() and not p.requires_grad for p in layer.parameters())
    swap.restore()
    assert all(p is original[name] for name, p in layer.named_parameters())
