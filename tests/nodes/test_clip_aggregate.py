"""DP Aggregate CLIP Embeddings in a real (in-process) ComfyUI on tiny models, and the privacy
contract between it and the Universal Guidance Sampler."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.errors import BudgetExceededError, DpAdaptError

N_IMAGES = 6
FINGERPRINT = "hmac-sha256:test-clip-images"


@pytest.fixture(scope="module")
def env(comfy):
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes.clip_aggregate import DPAggregateCLIPEmbeddingsNode

    generator = torch.Generator().manual_seed(0)
    return {
        "node": DPAggregateCLIPEmbeddingsNode(),
        "clip_vision": tiny_models.build_tiny_clip_vision(),
        "images": torch.rand(N_IMAGES, 64, 64, 3, generator=generator),
        "ledgers": comfy_compat.user_directory() / "dp_adapt" / "ledgers",
    }


def make_budget(env, *, epsilon=1.0, total=8.0):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget

    return PrivacyBudget(
        epsilon=epsilon,
        delta=1e-5,
        total=TotalBudget(epsilon=total, delta=1e-5),
        ledger_name=f"clip-{uuid.uuid4().hex[:8]}",
        ledger_directory=env["ledgers"],
    )


def aggregate(env, budget, **overrides):
    kwargs = dict(
        clip_vision=env["clip_vision"],
        images=env["images"],
        dataset_size=N_IMAGES,
        fingerprint=FINGERPRINT,
        budget=budget,
        sampling_rate=1.0,
        images_per_batch=4,
    )
    kwargs.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = env["node"].aggregate(**kwargs)
    return out["result"]


def ledger_records(budget) -> int:
    if not budget.ledger_path.exists():
        return 0
    data = json.loads(budget.ledger_path.read_text())
    return sum(len(d["releases"]) for d in data["datasets"].values())


def ledger_snapshot(env) -> dict[str, str]:
    """Every file under the ledger folder with the hash of its bytes."""
    return {
        str(p.relative_to(env["ledgers"])): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(env["ledgers"].rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def encoded(env, monkeypatch):
    """Counts the private images that go through CLIP vision."""
    seen = []
    original = env["clip_vision"].encode_image

    def spy(images, *args, **kwargs):
        seen.append(images.shape[0])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(env["clip_vision"], "encode_image", spy)
    return seen


def test_release_records_exactly_one_entry_and_returns_a_unit_target(env, encoded):
    from comfyui_dp_adapt.dp.accounting import release_event

    budget = make_budget(env)
    target, _, report = aggregate(env, budget)
    assert ledger_records(budget) == 1
    assert sum(encoded) == N_IMAGES and max(encoded) <= 4, "batched, every kept image once"
    assert target.width == 32
    assert torch.isclose(target.embedding.norm(), torch.tensor(1.0), atol=1e-5)
    assert target.event == release_event(
        noise_multiplier=target.noise_multiplier, sampling_rate=1.0
    )
    assert target.epsilon <= 1.0 and target.dataset_size == N_IMAGES
    assert budget.ledger_name in report and "epsilon" in report


def test_the_ledger_entry_is_written_before_the_noise_is_drawn(env, monkeypatch):
    from comfyui_dp_adapt.dp import ledger, mechanism

    events = []
    record, generator = ledger.Ledger.record, mechanism.os_entropy_generator

    def spy_record(self, *args, **kwargs):
        events.append("ledger")
        return record(self, *args, **kwargs)

    def spy_generator(*args, **kwargs):
        events.append("noise")
        return generator(*args, **kwargs)

    monkeypatch.setattr(ledger.Ledger, "record", spy_record)
    monkeypatch.setattr(mechanism, "os_entropy_generator", spy_generator)
    aggregate(env, make_budget(env), sampling_rate=1.0)
    assert events == ["ledger", "noise"]


def test_clip_vision_output_holds_the_estimate_and_nothing_else(env):
    budget = make_budget(env)
    target, output, _ = aggregate(env, budget)
    assert set(vars(output)) == {"image_embeds"}, "no hidden states of private images"
    assert torch.equal(output.image_embeds, target.embedding.unsqueeze(0))
    assert output["image_embeds"] is output.image_embeds  # ComfyUI's own Output class


def test_clip_vision_output_works_in_comfyuis_unclip_path(env):
    """unCLIP Conditioning stores it; the unCLIP / SDXL-Revision adapter consumes it."""
    import comfy.model_base
    import nodes
    from comfy.ldm.modules.encoders.noise_aug_modules import CLIPEmbeddingNoiseAugmentation

    budget = make_budget(env)
    _, output, _ = aggregate(env, budget)
    conditioning = [[torch.zeros(1, 77, 32), {}]]
    with torch.inference_mode():
        (conditioned,) = nodes.unCLIPConditioning().apply_adm(conditioning, output, 1.0, 0.0)
        augmentor = CLIPEmbeddingNoiseAugmentation(
            noise_schedule_config={"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
            timestep_dim=32,
        )
        adm = comfy.model_base.unclip_adm(
            conditioned[0][1]["unclip_conditioning"], "cpu", augmentor, seed=0
        )
    assert conditioned[0][1]["unclip_conditioning"][0]["clip_vision_output"] is output
    assert adm.shape == (1, 64) and torch.isfinite(adm).all()


@pytest.mark.slow  # calibrating z for q < 1 takes seconds
def test_only_the_poisson_sampled_images_are_embedded(env, encoded, monkeypatch):
    from comfyui_dp_adapt.dp import mechanism

    kept = []
    original = mechanism.poisson_sample

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        kept.append(len(result.indices))
        return result

    import comfy.utils

    monkeypatch.setattr(mechanism, "poisson_sample", spy)
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda v, total, *a, **k: progress.append((v, total)))
    budget = make_budget(env)
    try:
        for _ in range(2):
            aggregate(env, budget, sampling_rate=0.5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert set(progress) == {(N_IMAGES, N_IMAGES)}, "progress shows the public n, never m"
    assert len(kept) == 2
    assert sum(encoded) == sum(kept), "exactly the kept images, each once"
    assert ledger_records(budget) == 2


def test_identical_runs_release_different_targets(env):
    budget = make_budget(env)
    torch.manual_seed(0)
    first, _, _ = aggregate(env, budget)
    torch.manual_seed(0)
    second, _, _ = aggregate(env, budget)
    assert not torch.equal(first.embedding, second.embedding), "noise from OS entropy"


def test_the_sampler_never_touches_the_ledger(env):
    from comfyui_dp_adapt.nodes import tiny_models
    from comfyui_dp_adapt.nodes.guidance_sampler import UniversalGuidanceSamplerNode

    budget = make_budget(env)
    target, _, _ = aggregate(env, budget)
    before = ledger_snapshot(env)
    assert ledger_records(budget) == 1
    model, clip, vae = (
        tiny_models.build_tiny_model(),
        tiny_models.build_tiny_clip(),
        tiny_models.build_tiny_vae(),
    )
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a painting"), return_pooled=True)
        for mode, recurrence in (("x0", 1),):
            UniversalGuidanceSamplerNode().sample(
                model=model,
                positive=[[cond, {"pooled_output": pooled}]],
                negative=[[cond, {"pooled_output": pooled}]],
                latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                vae=vae,
                clip_vision=env["clip_vision"],
                target=target,
                seed=1,
                steps=2,
                cfg=2.0,
                sampler_name="euler",
                scheduler="normal",
                denoise=1.0,
                guidance_strength=50.0,
                self_recurrence=recurrence,
                mode=mode,
            )
    assert ledger_snapshot(env) == before
    assert ledger_records(budget) == 1


def test_exhausted_budget_is_refused_before_any_image_is_embedded(env, encoded):
    budget = make_budget(env, epsilon=1.0, total=1.0)
    aggregate(env, budget)
    encoded.clear()
    with pytest.raises(BudgetExceededError, match="spent"):
        aggregate(env, budget)
    assert encoded == [], "refused before any work"
    assert ledger_records(budget) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": torch.zeros(0, 64, 64, 3), "dataset_size": 0}, "non-empty"),
        ({"images": torch.zeros(0, 64, 64, 3)}, "non-empty"),
        ({"clip_vision": None}, "clip_vision is missing"),
        ({"dataset_size": N_IMAGES + 1}, "dataset_size"),
        ({"images": "pixels"}, "IMAGE"),
        ({"sampling_rate": 0.0}, "sampling"),
        ({"sampling_rate": float("nan")}, "sampling"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"images_per_batch": 0}, "images_per_batch"),
    ],
)
def test_bad_inputs_fail_clearly_and_spend_nothing(env, encoded, overrides, message):
    budget = make_budget(env)
    with pytest.raises(DpAdaptError, match=message):
        aggregate(env, budget, **overrides)
    assert ledger_records(budget) == 0
    assert encoded == []


def test_a_single_image_is_refused(env):
    budget = make_budget(env)
    with pytest.raises(DpAdaptError, match="more than one private image"):
        aggregate(env, budget, images=env["images"][:1], dataset_size=1)
    assert ledger_records(budget) == 0
