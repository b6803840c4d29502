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


def make_budget(env, *, epsilon=1.0, total=8.0, declared=N_IMAGES):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget

    return PrivacyBudget(
        epsilon=epsilon,
        delta=1e-5,
        total=TotalBudget(epsilon=total, delta=1e-5),
        ledger_name=f"clip-{uuid.uuid4().hex[:8]}",
        ledger_directory=env["ledgers"],
        declared_dataset_size=declared,
    )


def private_set(images, keys=None):
    """The images (written as PNG files and loaded) with fresh keys, so that no two calls
    share an image's budget."""
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    keys = keys or tuple(f"hmac-sha256:clip-{uuid.uuid4().hex}" for _ in range(len(images)))
    return private_image_set(images, keys)


def aggregate(env, budget, **overrides):
    kwargs = dict(
        clip_vision=env["clip_vision"],
        private_images=private_set(env["images"]),
        budget=budget,
        sampling_rate=1.0,
        images_per_batch=4,
    )
    kwargs.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = env["node"].aggregate(**kwargs)
    return out["result"]


def ledger_records(budget) -> int:
    """Releases recorded under the budget's collection (ledger name)."""
    if not budget.ledger_path.exists():
        return 0
    collection = json.loads(budget.ledger_path.read_text())["collections"].get(budget.ledger_name)
    return len(collection["releases"]) if collection else 0


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
    assert encoded == [4, 4], "every image, in batches of exactly 4 rows (6 padded to 8)"
    assert target.width == 32
    assert torch.isclose(target.embedding.norm(), torch.tensor(1.0), atol=1e-5)
    assert target.event == release_event(
        noise_multiplier=target.noise_multiplier, sampling_rate=1.0
    )
    assert target.epsilon <= 1.0 and target.declared_dataset_size == N_IMAGES
    assert budget.ledger_name in report and "epsilon" in report


def test_a_ledger_that_cannot_be_written_releases_nothing(env, monkeypatch):
    """The noise is drawn inside the ledger commit and published only after the record is
    durable: a failed write leaves no release and no record."""
    import os

    from comfyui_dp_adapt.dp import ledger
    from comfyui_dp_adapt.dp.errors import LedgerError

    def failing_replace(*args, **kwargs):
        raise OSError("disk full")

    budget = make_budget(env)
    monkeypatch.setattr(ledger.os, "replace", failing_replace)
    with pytest.raises(LedgerError):
        aggregate(env, budget)
    monkeypatch.setattr(ledger.os, "replace", os.replace)
    assert ledger_records(budget) == 0


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


def test_work_and_progress_do_not_depend_on_the_sample_or_the_true_count(env, encoded):
    """Constant work (docs/privacy.md §3.2): every image is embedded whatever the Poisson sample, in
    batches padded to the declared n_hat, so folders of 5 and 6 images look the same."""
    import comfy.utils

    seen = {}
    for count in (5, 6):
        progress = []
        encoded.clear()
        comfy.utils.set_progress_bar_global_hook(
            lambda v, total, *a, progress=progress, **k: progress.append((v, total))
        )
        try:
            aggregate(
                env,
                make_budget(env, declared=8),
                private_images=private_set(env["images"][:count]),
                sampling_rate=0.5,
            )
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        seen[count] = (list(encoded), progress)
    assert seen[5] == seen[6]
    assert seen[5][0] == [4, 4], "8 declared images in batches of 4, whatever the sample"


def _progress_of_runs(env, counts, *, declared):
    """(values and totals the progress bar showed) per folder size, each a fresh release."""
    from comfyui_dp_adapt.tests.support.progress import recorded_progress

    images = torch.rand(max(counts), 64, 64, 3, generator=torch.Generator().manual_seed(9))
    seen = {}
    for count in counts:
        with recorded_progress() as seen[count]:
            aggregate(
                env,
                make_budget(env, declared=declared),
                private_images=private_set(images[:count]),
                images_per_batch=2,
            )
    return seen


def test_progress_of_a_folder_larger_than_n_hat_does_not_show_its_size(env, encoded):
    """Progress values and totals are functions of n_hat alone (docs/privacy.md §1): with
    n_hat = 4, folders of 5, 6 and 9 images show the same bar (held at its total while the
    extra images are embedded), and so do 3 and 4. The work itself covers every image."""
    seen = _progress_of_runs(env, (5, 6, 9), declared=4)
    assert seen[5] == seen[6] == seen[9] == [(1, 2), (2, 2)]
    assert sum(encoded) == 2 * (3 + 3 + 5), "every image embedded, in padded pairs"
    below = _progress_of_runs(env, (3, 4), declared=4)
    assert below[3] == below[4] == seen[5]


def test_identical_runs_release_different_targets(env):
    """Two releases (two collections) of the same images with the same workflow seed."""
    images = private_set(env["images"])
    torch.manual_seed(0)
    first, _, _ = aggregate(env, make_budget(env), private_images=images)
    torch.manual_seed(0)
    second, _, _ = aggregate(env, make_budget(env), private_images=images)
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
        ({"clip_vision": None}, "clip_vision is missing"),
        ({"private_images": torch.zeros(2, 64, 64, 3)}, "DP Load Private Images"),
        ({"sampling_rate": 0.0}, "sampling"),
        ({"sampling_rate": float("nan")}, "sampling"),
        ({"images_per_batch": 0}, "images_per_batch"),
    ],
)
def test_bad_inputs_fail_clearly_and_spend_nothing(env, encoded, overrides, message):
    budget = make_budget(env)
    with pytest.raises(DpAdaptError, match=message):
        aggregate(env, budget, **overrides)
    assert ledger_records(budget) == 0
    assert encoded == []


def test_an_identical_rerun_reuses_the_target_and_spends_nothing(env):
    budget = make_budget(env)
    images = private_set(env["images"])
    first, _, _ = aggregate(env, budget, private_images=images)
    second, _, report = aggregate(env, budget, private_images=images)
    assert torch.equal(first.embedding, second.embedding)
    assert first.parameters["release_id"] == second.parameters["release_id"]
    rid = first.parameters["release_id"][:12]
    assert ledger_records(budget) == 1
    assert f"release {rid} (recorded earlier) published again; nothing spent" in report
    assert report.startswith(f"Published again: release {rid}")


def test_the_report_and_card_stay_true_when_shown_again(env):
    """ComfyUI re-shows a cached report on a re-queue: it names its release and is in the
    past tense, and the card's figures are the report's (public values only)."""
    budget = make_budget(env)
    with torch.inference_mode():
        out = env["node"].aggregate(
            clip_vision=env["clip_vision"],
            private_images=private_set(env["images"]),
            budget=budget,
            sampling_rate=1.0,
            images_per_batch=4,
        )
    target, _, report = out["result"]
    rid = target.parameters["release_id"][:12]
    spent = budget.ledger().spent(budget.ledger_name, delta=budget.total.delta)
    assert out["ui"]["text"] == [report]
    assert report.startswith(f"Private: (eps = {target.epsilon:.4g}, delta = {target.delta:.3g})")
    assert f"release {rid} spent eps {target.epsilon:.4g} (its own guarantee" in report
    assert f"stood at eps {spent:.4g} of {budget.total.epsilon:g} after it" in report
    for stale in ("before,", "after this release", "remaining", "this run"):
        assert stale not in report
    (card,) = out["ui"]["dp_card"]
    assert card["release"] == rid and card["reused"] is False
    assert card["headline"] == report.splitlines()[0]
    assert card["spent"] == pytest.approx(spent)
    assert (card["epsilon"], card["total"]) == (target.epsilon, budget.total.epsilon)


def test_a_nan_image_does_not_change_whether_the_release_happens(env, monkeypatch):
    """One image whose embedding is not finite contributes 0 (docs/privacy.md §2.4)."""
    original = env["clip_vision"].encode_image

    def poisoned(images, *args, **kwargs):
        out = original(images, *args, **kwargs)
        out["image_embeds"][0] = float("nan")
        return out

    monkeypatch.setattr(env["clip_vision"], "encode_image", poisoned)
    target, _, _ = aggregate(env, make_budget(env))
    assert torch.isfinite(target.embedding).all()


def test_overlapping_folders_share_their_images_budget(env):
    """Two collections (ledger names) with shared images: the shared images' spending
    carries over, so no image ever exceeds its own total (docs/privacy.md §7)."""
    shared = private_set(env["images"][:5])
    first = make_budget(env, epsilon=1.0, total=1.0)
    aggregate(env, first, private_images=shared)
    added = private_set(
        env["images"], (*shared.image_keys, f"hmac-sha256:clip-new-{uuid.uuid4().hex}")
    )
    second = make_budget(env, epsilon=1.0, total=1.0)  # another ledger name, fresh collection
    aggregate(env, second, private_images=added)
    ledger = second.ledger()
    spent = [ledger.image_spent(key, delta=1e-5) for key in added.image_keys]
    assert all(s <= 1.0 for s in spent), "a shared image was charged past its total"
    assert spent[-1] > 0, "the new image took part in the second release"
    assert ledger_records(first) == 1 and ledger_records(second) == 1


def test_a_text_clip_in_the_clip_vision_socket_is_named_and_refused(env, encoded):
    """A text CLIP once failed with AttributeError: 'CLIP' object has no attribute 'model'."""
    from comfyui_dp_adapt.nodes import tiny_models

    budget = make_budget(env)
    with pytest.raises(DpAdaptError, match=r"must be a CLIP vision model.*got a CLIP \(a text"):
        aggregate(env, budget, clip_vision=tiny_models.build_tiny_clip())
    assert ledger_records(budget) == 0
    assert encoded == []


def test_a_vision_model_with_non_finite_outputs_is_refused_before_anything_is_spent(env):
    """Once it succeeded and spent epsilon on a pure-noise release."""
    from comfyui_dp_adapt.nodes import tiny_models

    broken = tiny_models.build_tiny_clip_vision()
    with torch.inference_mode():  # the loader's weights are inference tensors
        broken.model.visual_projection.weight.fill_(float("nan"))
    seen = []
    original = broken.encode_image
    broken.encode_image = lambda images, *a, **k: (
        seen.append(images.shape[0]) or original(images, *a, **k)
    )
    budget = make_budget(env)
    with pytest.raises(DpAdaptError, match="non-finite values on a public grey image"):
        aggregate(env, budget, clip_vision=broken)
    assert ledger_records(budget) == 0
    assert seen == [], "no private image was embedded"


def test_a_batch_setting_above_n_hat_pads_to_n_hat_rows_only(env, encoded):
    """images_per_batch = 256 with n_hat = 4 once padded the pass to 256 rows."""
    aggregate(
        env,
        make_budget(env, declared=4),
        private_images=private_set(env["images"][:3]),
        images_per_batch=256,
    )
    assert encoded == [4]
