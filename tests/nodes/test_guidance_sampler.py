"""The Universal Guidance Sampler in a real (in-process) ComfyUI on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_dp_adapt.dp.errors import DpAdaptError
from comfyui_dp_adapt.dp.guidance import MAX_SELF_RECURRENCE, ClipTarget

CFG = 3.0
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "uni_pc"]


_ENVS: dict[str, dict] = {}


def _build_env(family: str) -> dict:
    """Tiny components of ``family`` (sd1 or sdxl: SDXL's two encoders, pooled output and
    ADM conditioning), built once per test session."""
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes.guidance_sampler import UniversalGuidanceSamplerNode

    if family in _ENVS:
        return _ENVS[family]
    model = tiny_models.build_tiny_model(family=family)
    clip = tiny_models.build_tiny_clip(family=family)
    vae = tiny_models.build_tiny_vae()
    clip_vision = tiny_models.build_tiny_clip_vision()
    with torch.inference_mode():
        positive = _encode(clip, "a painting")
        negative = _encode(clip, "")
        # A public reference image stands in for the DP estimate: the sampler only reads it.
        reference = torch.zeros(1, 64, 64, 3)
        reference[..., 0] = 1.0
        reference[:, :32, :, 2] = 1.0
        # built in inference mode, as the aggregate node builds it inside ComfyUI's executor
        target = make_target(comfy_compat.clip_vision_encode(clip_vision, reference)[0])
    _ENVS[family] = {
        "node": UniversalGuidanceSamplerNode(),
        "model": model,
        "clip": clip,
        "vae": vae,
        "clip_vision": clip_vision,
        "positive": positive,
        "negative": negative,
        "target": target,
    }
    return _ENVS[family]


@pytest.fixture(scope="module")
def env(comfy):
    return _build_env("sd1")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family_env(comfy, request):
    """The same checks on SD1.x and on SDXL."""
    return _build_env(request.param)


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def make_target(vector: torch.Tensor) -> ClipTarget:
    return ClipTarget(
        embedding=torch.nn.functional.normalize(vector.float(), dim=0),
        event=None,
        epsilon=1.0,
        delta=1e-5,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        declared_dataset_size=10,
    )


def sample(env, **overrides):
    kwargs = dict(
        model=env["model"],
        positive=env["positive"],
        negative=env["negative"],
        latent_image={"samples": torch.zeros(2, 4, 8, 8)},
        vae=env["vae"],
        clip_vision=env["clip_vision"],
        target=env["target"],
        seed=7,
        steps=3,
        cfg=CFG,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        guidance_strength=20.0,
        self_recurrence=0,
        mode="x0",
    )
    kwargs.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        (latent,) = env["node"].sample(**kwargs)
    return latent["samples"]


def cosine_to_target(env, samples):
    from comfyui_dp_adapt.nodes import comfy_compat

    with torch.inference_mode():
        images = env["vae"].decode(samples)
        embeds = comfy_compat.clip_vision_encode(env["clip_vision"], images)
    return torch.nn.functional.normalize(embeds.float(), dim=1) @ env["target"].embedding


@pytest.fixture
def spy_hook(monkeypatch):
    """Records every call of the guidance hook: its args and what it returned."""
    from comfyui_dp_adapt.nodes import guidance_sampler

    calls = []
    original = guidance_sampler._GuidanceHook.__call__

    def spy(self, args):
        out = original(self, args)
        calls.append({"hook": self, "args": args, "out": out})
        return out

    monkeypatch.setattr(guidance_sampler._GuidanceHook, "__call__", spy)
    return calls


@pytest.mark.parametrize("mode", ["full", "x0"])
def test_hooks_sigma_form_equals_the_papers_eps_form(family_env, mode, monkeypatch):
    """Inside a real sampling run, the node's correction denoised - s*sigma^2*grad equals the
    paper's eps_hat = eps + s*sqrt(1 - abar)*grad_{z_t} l, with z_t = sqrt(abar) x."""
    env = family_env
    from comfyui_dp_adapt.dp.guidance import clone_saved_tensors, eps_form_prediction
    from comfyui_dp_adapt.nodes import comfy_compat, guidance_sampler

    strength = 5.0
    checked = []
    original = guidance_sampler._GuidanceHook.__call__

    def compare(self, args):
        out = original(self, args)
        with torch.inference_mode(False), torch.enable_grad():
            x = args["input"].clone()
            sigma = float(args["sigma"].flatten()[0])
            alpha_bar = 1.0 / (1.0 + sigma**2)
            denoise = comfy_compat.cfg_denoiser(args, self, CFG)

            def eps_fn(z_t):
                x_ = z_t / math.sqrt(alpha_bar)
                with clone_saved_tensors():
                    return (x_ - denoise(x_)) / sigma

            paper = eps_form_prediction(
                x * math.sqrt(alpha_bar),
                alpha_bar,
                eps_fn=eps_fn,
                loss_fn=self.loss_fn,
                strength=strength,
                mode=mode,
            )
        correction = out - args["denoised"]
        checked.append((sigma, float(correction.abs().max())))
        # Compare the corrections themselves, to float32 precision of the latents' scale:
        # the paper's form goes through z_t and eps and rounds at that scale.
        rounding = 8 * torch.finfo(torch.float32).eps * float(args["denoised"].abs().max())
        torch.testing.assert_close(
            correction, (paper - args["denoised"]).to(out.dtype), rtol=1e-3, atol=rounding
        )
        return out

    monkeypatch.setattr(guidance_sampler._GuidanceHook, "__call__", compare)
    sample(env, mode=mode, guidance_strength=strength, steps=2)
    assert len(checked) == 2 and checked[0][0] > checked[1][0] > 0
    assert checked[0][1] > 0.1, f"the guidance must change the prediction: {checked}"


@pytest.mark.parametrize(
    ("mode", "decode_size"), [("full", "full"), ("x0", "full"), ("x0", "clip"), ("full", "clip")]
)
def test_strong_guidance_pulls_the_image_towards_the_target(family_env, mode, decode_size):
    env = family_env
    # "clip" shrinks latents whose image is larger than CLIP's 224 px: 256 px images here.
    side = 32 if decode_size == "clip" else 8
    latent = {"samples": torch.zeros(2, 4, side, side)}
    plain = cosine_to_target(env, sample(env, guidance_strength=0.0, steps=4, latent_image=latent))
    guided = cosine_to_target(
        env,
        sample(
            env,
            guidance_strength=20.0,
            steps=4,
            mode=mode,
            decode_size=decode_size,
            latent_image=latent,
        ),
    )
    assert (guided > plain + 0.02).all(), f"unguided {plain.tolist()}, guided {guided.tolist()}"


def test_constant_schedule_is_the_sigma_squared_step_divided_by_sigma_squared(env, spy_hook):
    """One step from the same noise: schedule "constant" corrects denoised by s * grad, the
    default "sigma^2" by s * sigma^2 * grad (eq. 2 of dp/guidance.py)."""
    corrections = {}
    for schedule in ("sigma^2", "constant"):
        spy_hook.clear()
        sample(env, steps=1, schedule=schedule)
        (call,) = spy_hook
        corrections[schedule] = call["args"]["denoised"] - call["out"]
        sigma = float(call["args"]["sigma"].flatten()[0])
        scale = float(call["args"]["denoised"].abs().max())
    assert sigma > 1 and float(corrections["constant"].abs().max()) > 0
    # Each correction is a float32 difference at the latents' scale; the constant one is
    # then multiplied by sigma^2, and so is its rounding.
    rounding = 8 * torch.finfo(torch.float32).eps * scale * sigma**2
    torch.testing.assert_close(
        corrections["sigma^2"], sigma**2 * corrections["constant"], rtol=1e-3, atol=rounding
    )


def test_normalized_schedule_moves_each_prediction_by_s_times_its_norm(env, spy_hook):
    """Schedule "normalized": every guided step moves each image's prediction by exactly
    s * |denoised| (dp/guidance.py), at high and low noise alike."""
    sample(env, steps=3, schedule="normalized", guidance_strength=0.2)
    assert len(spy_hook) == 3
    for call in spy_hook:
        before = call["args"]["denoised"].flatten(1)
        moved = (before - call["out"].flatten(1)).norm(dim=1)
        torch.testing.assert_close(moved, 0.2 * before.norm(dim=1), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("schedule", ["normalized", "sigma^2"])
def test_guidance_over_views_pulls_the_image_towards_the_target(family_env, schedule):
    env = family_env
    strength = 0.3 if schedule == "normalized" else 20.0
    plain = cosine_to_target(env, sample(env, guidance_strength=0.0, steps=4))
    guided = cosine_to_target(
        env, sample(env, guidance_strength=strength, steps=4, schedule=schedule, views=4)
    )
    assert (guided > plain + 0.02).all(), f"unguided {plain.tolist()}, guided {guided.tolist()}"


def test_views_average_the_loss_over_crops_of_each_prediction(env, spy_hook, monkeypatch):
    """views = 3: CLIP sees three pictures per image at every guided step."""
    from comfyui_dp_adapt.nodes import comfy_compat

    seen = []
    original = comfy_compat.clip_vision_image_embeds

    def spy(clip_vision, pixels):
        seen.append(pixels.shape[0])
        return original(clip_vision, pixels)

    monkeypatch.setattr(comfy_compat, "clip_vision_image_embeds", spy)
    sample(env, steps=2, views=3)
    assert seen == [3 * 2, 3 * 2]
    assert spy_hook[-1]["hook"].config.views == 3


def test_default_schedule_is_the_papers(env, spy_hook):
    sample(env, steps=1)
    default = spy_hook[-1]["hook"].config.schedule.value
    assert default == "sigma^2"


@pytest.mark.parametrize(("decode_size", "decoded_side"), [("full", 32), ("clip", 28)])
def test_decode_size_clip_decodes_latents_at_clips_input_size(
    env, decode_size, decoded_side, monkeypatch
):
    """CLIP vision sees 224 px and the VAE downscales by 8: for a 256 px image "clip" decodes
    28x28 latents (224 px images) instead of the sampled 32x32 ones."""
    from comfyui_dp_adapt.nodes import comfy_compat

    assert env["vae"].downscale_ratio == 8
    assert comfy_compat.clip_vision_settings(env["clip_vision"])[0] == 224
    shapes = []
    original = comfy_compat.vae_decode_differentiable

    def spy(vae, latents):
        shapes.append(tuple(latents.shape))
        return original(vae, latents)

    monkeypatch.setattr(comfy_compat, "vae_decode_differentiable", spy)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    samples = sample(env, steps=1, latent_image=latent, decode_size=decode_size)
    assert samples.shape == (1, 4, 32, 32) and torch.isfinite(samples).all()
    assert shapes and set(shapes) == {(1, 4, decoded_side, decoded_side)}, shapes


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_every_sampler_runs_guided(env, sampler_name, spy_hook):
    plain = sample(env, sampler_name=sampler_name, guidance_strength=0.0)
    spy_hook.clear()
    guided = sample(env, sampler_name=sampler_name, guidance_strength=20.0)
    assert len(spy_hook) >= 3, "the hook runs at every model evaluation"
    assert torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain), "guidance changed the result"
    assert (cosine_to_target(env, guided) > cosine_to_target(env, plain)).all()


def test_self_recurrence_repeats_every_step(env, spy_hook):
    import comfy.utils

    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: progress.append(total))
    try:
        out = sample(env, self_recurrence=2, steps=3, sampler_name="euler")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(spy_hook) == 3 * (2 + 1), "euler evaluates once per step, (k + 1) times"
    sigmas = [float(c["args"]["sigma"].flatten()[0]) for c in spy_hook]
    assert sigmas[0] == sigmas[1] == sigmas[2] > sigmas[3] == sigmas[4] == sigmas[5]
    assert set(progress) == {9}, "one progress bar over every repeated step"
    assert torch.isfinite(out).all()


def test_partial_denoise_starts_lower_and_zero_denoise_returns_the_input(env, spy_hook):
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    sample(env, latent_image=latent, steps=2)
    sigma_max = float(spy_hook[0]["args"]["sigma"].flatten()[0])
    spy_hook.clear()
    out = sample(env, latent_image=latent, steps=2, denoise=0.5, self_recurrence=1)
    assert len(spy_hook) == 2 * 2
    assert float(spy_hook[0]["args"]["sigma"].flatten()[0]) < sigma_max
    assert torch.isfinite(out).all()
    assert torch.equal(sample(env, latent_image=latent, denoise=0.0), latent["samples"])


def test_self_recurrence_zero_is_plain_comfyui_sampling(family_env):
    """With guidance off and no recurrence the node reproduces KSampler bit for bit."""
    env = family_env
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        (expected,) = nodes.common_ksampler(
            env["model"], 7, 3, CFG, "dpmpp_2m", "karras", env["positive"], env["negative"], latent
        )
    ours = sample(
        env,
        latent_image=latent,
        sampler_name="dpmpp_2m",
        scheduler="karras",
        guidance_strength=0.0,
    )
    assert torch.equal(ours, expected["samples"])


def test_the_users_model_and_encoders_are_left_unchanged(family_env):
    env = family_env

    def state():
        return {
            name: (id(t), t.is_inference())
            for part in (
                env["model"].model,
                env["vae"].first_stage_model,
                env["clip_vision"].model,
            )
            for name, t in [*part.named_parameters(), *part.named_buffers()]
        }

    before = state()
    options_before = repr(env["model"].model_options)
    sample(env, mode="full")
    assert state() == before
    assert repr(env["model"].model_options) == options_before


def test_cancel_stops_sampling(env):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, *args, **kwargs):
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(env, steps=4, self_recurrence=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip_vision": None}, "clip_vision is missing"),
        ({"target": "not a target"}, "DP_CLIP_TARGET"),
        ({"target": make_target(torch.ones(16))}, r"width 16 .* width 32"),
        ({"guidance_strength": float("nan")}, "guidance_strength"),
        ({"guidance_strength": -1.0}, "guidance_strength"),
        ({"self_recurrence": MAX_SELF_RECURRENCE + 1}, "self_recurrence"),
        ({"mode": "both"}, "mode"),
        ({"decode_size": "half"}, "decode_size"),
        ({"views": 0}, "views"),
        ({"views": 17}, "views"),
        ({"schedule": "normalized", "guidance_strength": 600.0}, "at most 1"),
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps must be an integer from 1 to 1000"),
        ({"cfg": float("nan")}, r"cfg must be a number from 0 to 100, got cfg=nan"),
        ({"cfg": -1.0}, "cfg must be a number"),
        ({"sampler_name": "dpm_adaptive"}, "chooses its own number of steps"),
        ({"denoise": float("nan")}, "denoise"),
        ({"latent_image": {"samples": torch.zeros(0, 4, 8, 8)}}, "latent_image"),
        (
            {
                "self_recurrence": 1,
                "latent_image": {
                    "samples": torch.zeros(1, 4, 8, 8),
                    "noise_mask": torch.ones(1, 8, 8),
                },
            },
            "noise mask",
        ),
    ],
)
def test_bad_inputs_fail_clearly_before_sampling(env, overrides, message, spy_hook):
    with pytest.raises(DpAdaptError, match=message):
        sample(env, **overrides)
    assert not spy_hook, "nothing was sampled"


def test_a_wrong_socket_is_named_not_a_raw_attribute_error(env, spy_hook):
    """A text CLIP in clip_vision, or a MODEL in vae, used to fail deep inside with
    ``'CLIP' object has no attribute 'model'``."""
    with pytest.raises(
        DpAdaptError, match=r"clip_vision must be a CLIP vision model .* CLIP \(a text"
    ):
        sample(env, clip_vision=env["clip"])
    with pytest.raises(DpAdaptError, match=r"vae must be a VAE .* got a MODEL"):
        sample(env, vae=env["model"])
    assert not spy_hook, "nothing was sampled"


def test_flow_models_are_refused(env):
    import comfy.model_sampling

    if not hasattr(comfy.model_sampling, "CONST"):
        pytest.skip("this ComfyUI has no flow models")

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model = env["model"].clone()
    model.add_object_patch("model_sampling", Flow())
    with pytest.raises(DpAdaptError, match="flow"):
        sample(env, model=model)


def test_differentiable_preprocessing_matches_comfyuis_up_to_8_bit_rounding(comfy):
    import comfy.clip_vision

    from comfyui_dp_adapt.dp.guidance import CLIP_STD, preprocess_for_clip

    images = torch.rand(2, 72, 96, 3, generator=torch.Generator().manual_seed(0))
    expected = comfy.clip_vision.clip_preprocess(images, size=64)
    ours = preprocess_for_clip(images.movedim(-1, 1), size=64)
    assert ours.shape == expected.shape
    step = 1.0 / 255 / min(CLIP_STD)
    assert (ours - expected).abs().max() <= step / 2 + 1e-3


@pytest.mark.parametrize("recurrence", [0, 1])
def test_each_step_says_where_sampling_is_with_an_eta(env, monkeypatch, recurrence):
    from comfyui_dp_adapt.nodes import comfy_compat

    shown = []
    monkeypatch.setattr(
        comfy_compat, "progress_text", lambda text, node: shown.append((text, node))
    )
    sample(env, steps=3, self_recurrence=recurrence, unique_id="7")
    total = 3 * (recurrence + 1)
    assert [t.split(",")[0] for t, _ in shown] == [
        f"guided sampling: step {done}/{total}" for done in range(1, total)
    ]
    assert all(node == "7" and text.endswith(" left") for text, node in shown)
