"""The DP Textual Inversion Train node in a real (in-process) ComfyUI on tiny models."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.dp.errors import BudgetExceededError, DpAdaptError, InvalidParameterError

N_IMAGES = 4


@pytest.fixture(scope="module")
def env(comfy):
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.textual_inversion import DPTextualInversionTrainNode
    from comfyui_dp_adapt.tests.support.tiny_components import tiny_sd1_components

    images = torch.rand(N_IMAGES, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return {
        **tiny_sd1_components(),
        "node": DPTextualInversionTrainNode(),
        "images": images,
        "ledgers": comfy_compat.user_directory() / "dp_adapt" / "ledgers",
    }


def make_budget(env, *, name=None, epsilon=1.0, total=8.0, declared=N_IMAGES):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget

    return PrivacyBudget(
        epsilon=epsilon,
        delta=1e-5,
        total=TotalBudget(epsilon=total, delta=1e-5),
        ledger_name=name or f"test-{uuid.uuid4().hex[:8]}",
        ledger_directory=env["ledgers"],
        declared_dataset_size=declared,
    )


def private_set(images, keys=None):
    """The images (written as PNG files and loaded) with fresh keys, so that no two tests
    share an image's budget."""
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    keys = keys or tuple(f"hmac-sha256:test-{uuid.uuid4().hex}" for _ in range(len(images)))
    return private_image_set(images, keys)


def train(env, budget, name, **overrides):
    kwargs = dict(
        model=env["model"],
        clip=env["clip"],
        vae=env["vae"],
        private_images=private_set(env["images"]),
        budget=budget,
        embedding_name=name,
        num_vectors=2,
        initializer_word="painting",
        template_set="style",
        steps=2,
        learning_rate=0.01,
        images_per_batch=2,
        sampling_rate=1.0,
        clip_norm=0.5,
        bound_mode="clip",
        overwrite=False,
    )
    kwargs.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return env["node"].train(**kwargs)


def ledger_records(budget) -> int:
    """Releases recorded under the budget's collection (ledger name)."""
    path = budget.ledger_path
    if not path.exists():
        return 0
    collection = json.loads(path.read_text())["collections"].get(budget.ledger_name)
    return len(collection["releases"]) if collection else 0


def test_release_writes_file_ledger_entry_and_token(env):
    budget = make_budget(env)
    name = f"tok_{uuid.uuid4().hex[:6]}"
    out = train(env, budget, name)
    token, report = out["result"]
    assert token == f"embedding:{name}"
    path = env["embeddings"] / f"{name}.safetensors"
    tensors, _metadata = read_embedding(path)
    assert tensors["emb_params"].shape == (2, 32)
    assert torch.isfinite(tensors["emb_params"]).all()
    assert ledger_records(budget) == 1
    assert "epsilon" in report and budget.ledger_name in report


def test_metadata_holds_the_dp_event_and_public_parameters_only(env):
    from comfyui_dp_adapt.dp.accounting import event_from_dict, release_event

    budget = make_budget(env)
    name = f"meta_{uuid.uuid4().hex[:6]}"
    train(env, budget, name)
    _, metadata = read_embedding(env["embeddings"] / f"{name}.safetensors")
    event = event_from_dict(json.loads(metadata["dp_adapt.dp_event"]))
    z = float(metadata["dp_adapt.noise_multiplier"])
    assert event == release_event(noise_multiplier=z, sampling_rate=1.0)
    assert float(metadata["dp_adapt.epsilon"]) <= 1.0
    assert metadata["dp_adapt.declared_dataset_size"] == str(budget.declared_dataset_size)
    allowed = {
        "method",
        "release_id",
        "dp_event",
        "epsilon",
        "epsilon_target",
        "delta",
        "adjacency",
        "sampling_rate",
        "declared_dataset_size",
        "clip_norm",
        "noise_multiplier",
        "bound_mode",
        "num_vectors",
        "steps",
        "learning_rate",
        "initializer_word",
        "template_set",
        "model_family",
        "precision",
        "package_version",
    }
    assert {key.removeprefix("dp_adapt.") for key in metadata} == allowed
    assert "hmac-sha256" not in json.dumps(metadata), "image keys stay in the ledger"


def test_the_released_token_differs_between_identical_runs(env):
    """Two releases (two collections) with identical inputs and workflow seeds differ."""
    images = private_set(env["images"])
    torch.manual_seed(0)
    train(env, make_budget(env), "same_a", private_images=images)
    torch.manual_seed(0)
    train(env, make_budget(env), "same_b", private_images=images)
    a = read_embedding(env["embeddings"] / "same_a.safetensors")[0]["emb_params"]
    b = read_embedding(env["embeddings"] / "same_b.safetensors")[0]["emb_params"]
    assert not torch.equal(a, b), "DP noise must come from OS entropy, not the workflow seed"


def test_cancel_mid_training_writes_nothing_and_spends_nothing(env):
    import comfy.model_management
    import comfy.utils

    budget = make_budget(env)
    name = f"cancel_{uuid.uuid4().hex[:6]}"
    seen = []

    def hook(value, total, preview, *args, **kwargs):
        seen.append(value)
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(env, budget, name, steps=10)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert 2 in seen, "training had started"
    assert not (env["embeddings"] / f"{name}.safetensors").exists()
    assert ledger_records(budget) == 0
    assert budget.ledger().spent(budget.ledger_name, delta=1e-5) == 0


def test_exhausted_budget_is_refused_before_training(env):
    budget = make_budget(env, epsilon=1.0, total=1.0)
    train(env, budget, f"first_{uuid.uuid4().hex[:6]}")
    name = f"second_{uuid.uuid4().hex[:6]}"
    with pytest.raises(BudgetExceededError, match="spent") as error:
        train(env, budget, name)
    assert "total" in str(error.value)
    assert not (env["embeddings"] / f"{name}.safetensors").exists()
    assert ledger_records(budget) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embedding_name": "../escape"}, "embedding name"),
        ({"steps": 0}, "steps"),
        ({"private_images": "wrong socket"}, "DP Load Private Images"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"sampling_rate": 0.0}, "sampling"),
        ({"num_vectors": 0}, "num_vectors"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(env, overrides, message):
    budget = make_budget(env)
    before = sorted(p.name for p in env["embeddings"].iterdir())
    with pytest.raises(DpAdaptError, match=message):
        train(
            env, budget, overrides.pop("embedding_name", f"bad_{uuid.uuid4().hex[:6]}"), **overrides
        )
    assert sorted(p.name for p in env["embeddings"].iterdir()) == before
    assert ledger_records(budget) == 0


def test_existing_name_is_refused_before_spending(env):
    budget = make_budget(env)
    name = f"exists_{uuid.uuid4().hex[:6]}"
    train(env, budget, name)
    with pytest.raises(DpAdaptError, match="already exists"):
        train(env, budget, name, steps=3)
    assert ledger_records(budget) == 1


def test_identical_rerun_reuses_the_release_and_spends_nothing(env):
    """Idempotent releases (docs/privacy.md §7): same settings, same images -> same file, no spend,
    even when the previous run's file was deleted and ComfyUI's cache is gone."""
    budget = make_budget(env)
    images = private_set(env["images"])
    name = f"again_{uuid.uuid4().hex[:6]}"
    first = train(env, budget, name, private_images=images)
    path = env["embeddings"] / f"{name}.safetensors"
    token_a, meta_a = read_embedding(path)
    train(env, budget, name, private_images=images)  # the file exists: same release, fine
    path.unlink()
    again = train(env, budget, name, private_images=images)
    token_b, meta_b = read_embedding(path)
    assert torch.equal(token_a["emb_params"], token_b["emb_params"])
    assert meta_a["dp_adapt.release_id"] == meta_b["dp_adapt.release_id"]
    assert ledger_records(budget) == 1
    assert "published again; nothing spent" in again["result"][1]
    assert first["result"][0] == again["result"][0]


@pytest.mark.parametrize("method", ["DPAgg-TI", "DP-SGD"])
def test_bf16_precision_releases_and_is_recorded_as_a_setting(env, method):
    """precision=bf16 trains under bfloat16 autocast: a finite token, the choice in the file's
    metadata and the report, and a run that differs only in precision is a new release."""
    budget = make_budget(env)
    images = private_set(env["images"])
    name = f"bf16_{uuid.uuid4().hex[:6]}"
    common = dict(private_images=images, method=method, sampling_rate=0.5, overwrite=True)
    out = train(env, budget, name, precision="bf16", **common)
    tensors, metadata = read_embedding(env["embeddings"] / f"{name}.safetensors")
    assert tensors["emb_params"].dtype == torch.float32
    assert torch.isfinite(tensors["emb_params"]).all()
    assert metadata["dp_adapt.precision"] == "bf16"
    assert "bf16 autocast" in out["result"][1]
    again = train(env, budget, name, precision="model", **common)
    assert "nothing spent" not in again["result"][1]
    assert ledger_records(budget) == 2
    _, metadata = read_embedding(env["embeddings"] / f"{name}.safetensors")
    assert metadata["dp_adapt.precision"] == "model"


def test_an_unknown_precision_is_refused_before_anything_is_spent(env):
    budget = make_budget(env)
    name = f"prec_{uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidParameterError, match="precision must be one of"):
        train(env, budget, name, precision="fp8")
    assert ledger_records(budget) == 0
    assert not (env["embeddings"] / f"{name}.safetensors").exists()


def test_a_failed_run_in_between_does_not_make_the_rerun_spend(env):
    budget = make_budget(env)
    images = private_set(env["images"])
    name = f"fail_{uuid.uuid4().hex[:6]}"
    train(env, budget, name, private_images=images)
    with pytest.raises(DpAdaptError):
        train(env, budget, name, private_images=images, clip_norm=0.0)
    train(env, budget, name, private_images=images)
    assert ledger_records(budget) == 1


def test_embeddings_folder_that_is_a_file_is_a_clear_error(env, monkeypatch, tmp_path):
    from comfyui_dp_adapt.nodes import comfy_compat

    blocker = tmp_path / "embeddings"
    blocker.write_text("not a folder")
    monkeypatch.setattr(comfy_compat, "embeddings_directories", lambda: [blocker])
    budget = make_budget(env)
    with pytest.raises(InvalidParameterError, match="is a file, not a folder"):
        train(env, budget, f"file_{uuid.uuid4().hex[:6]}")
    assert ledger_records(budget) == 0


def test_unknown_model_family_is_refused(env):
    import comfy.supported_models

    budget = make_budget(env)
    model = env["model"].clone()
    original = model.model.model_config
    model.model.model_config = comfy.supported_models.SDXL(dict(original.unet_config))
    try:
        with pytest.raises(InvalidParameterError, match="SDXL"):
            train(env, budget, f"fam_{uuid.uuid4().hex[:6]}", model=model)
    finally:
        model.model.model_config = original
    assert ledger_records(budget) == 0


# --- DP-SGD, the paper's baseline (docs/privacy.md §4) -------------------------------------


def test_dpsgd_release_writes_a_loadable_token_with_its_composed_event(env):
    from comfyui_dp_adapt.dp.accounting import dpsgd_event, event_from_dict

    budget = make_budget(env)
    name = f"sgd_{uuid.uuid4().hex[:6]}"
    out = train(env, budget, name, method="DP-SGD", steps=3, sampling_rate=0.5)
    token, report = out["result"]
    tensors, metadata = read_embedding(env["embeddings"] / f"{name}.safetensors")
    assert tensors["emb_params"].shape == (2, 32) and torch.isfinite(tensors["emb_params"]).all()
    assert metadata["dp_adapt.method"] == "DP-SGD"
    z = float(metadata["dp_adapt.noise_multiplier"])
    event = event_from_dict(json.loads(metadata["dp_adapt.dp_event"]))
    assert event == dpsgd_event(noise_multiplier=z, sampling_rate=0.5, steps=3)
    assert float(metadata["dp_adapt.epsilon"]) <= 1.0
    assert "T = 3 steps" in report and "DPAgg-TI at the same budget" in report
    assert ledger_records(budget) == 1 and token == f"embedding:{name}"


def test_dpsgd_cancelled_mid_training_spends_nothing(env):
    import comfy.model_management
    import comfy.utils

    budget = make_budget(env)
    name = f"sgdcancel_{uuid.uuid4().hex[:6]}"

    def hook(value, total, preview, *args, **kwargs):
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(env, budget, name, method="DP-SGD", steps=4, sampling_rate=0.5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert not (env["embeddings"] / f"{name}.safetensors").exists()
    assert ledger_records(budget) == 0


def _progress_of_runs(env, method, counts, *, declared):
    """(value, total) of every progress update the user saw, per folder size."""
    from comfyui_dp_adapt.tests.support.progress import recorded_progress

    images = torch.rand(max(counts), 64, 64, 3, generator=torch.Generator().manual_seed(9))
    seen = {}
    for count in counts:
        with recorded_progress() as seen[count]:
            train(
                env,
                make_budget(env, declared=declared),
                f"work_{uuid.uuid4().hex[:6]}",
                private_images=private_set(images[:count]),
                method=method,
                steps=2,
                sampling_rate=0.5,
            )
    return seen


@pytest.mark.parametrize("method", ["DPAgg-TI", "DP-SGD"])
def test_progress_does_not_depend_on_the_sample_or_the_count(env, method):
    """Progress values and totals are functions of public settings only (docs/privacy.md
    §1), also past n_hat: with n_hat = 4 (2 chunks of 2), folders of 5, 6 and 9 images show
    the same bar, held at its total while the extra images are processed, as do 3 and 4."""
    seen = _progress_of_runs(env, method, (3, 4, 5, 6, 9), declared=4)
    assert seen[3] == seen[4] == seen[5] == seen[6] == seen[9]
    total = 2 * (2 + 1)  # chunks of n_hat x (encoding + steps)
    assert seen[9] == [(value, total) for value in range(1, total + 1)]


def test_dpsgd_warns_when_steps_times_q_samples_almost_nothing(env):
    out = train(
        env,
        make_budget(env),
        f"sgdfew_{uuid.uuid4().hex[:6]}",
        method="DP-SGD",
        steps=1,
        sampling_rate=0.5,
    )
    assert "WARNING: T x q = 0.5 < 1" in out["result"][1]


def test_dpsgd_refuses_a_delta_not_below_the_sampling_rate(env):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget

    budget = PrivacyBudget(
        epsilon=1.0,
        delta=0.2,
        total=TotalBudget(epsilon=8.0, delta=0.2),
        ledger_name=f"test-{uuid.uuid4().hex[:8]}",
        ledger_directory=env["ledgers"],
        declared_dataset_size=N_IMAGES,
    )
    with pytest.raises(InvalidParameterError, match="delta must be below the sampling rate"):
        train(env, budget, f"sgddelta_{uuid.uuid4().hex[:6]}", method="DP-SGD", sampling_rate=0.1)
    assert ledger_records(budget) == 0


def test_a_text_encoder_that_ignores_its_prompt_is_refused_before_anything_is_spent(env):
    """Weights never loaded (zeros): every prompt gives the same context."""
    from comfyui_dp_adapt.nodes import tiny_models

    clip = tiny_models.build_tiny_clip(embedding_directory=[str(env["embeddings"])])
    with torch.inference_mode():
        for tensor in clip.cond_stage_model.clip_l.transformer.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    budget = make_budget(env)
    name = f"probe_{uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidParameterError, match="same output whatever the prompt"):
        train(env, budget, name, clip=clip)
    assert ledger_records(budget) == 0
    assert not (env["embeddings"] / f"{name}.safetensors").exists()


@pytest.mark.parametrize("broken", ["unet", "text encoder"])
def test_a_model_with_non_finite_outputs_is_refused_before_anything_is_spent(env, broken):
    """The public probe: a damaged checkpoint is refused before any private image is read."""
    from comfyui_dp_adapt.nodes import tiny_models

    model, clip = env["model"], env["clip"]
    if broken == "unet":
        model = tiny_models.build_tiny_model()
        target = list(model.model.diffusion_model.out.parameters())[-1]
    else:
        clip = tiny_models.build_tiny_clip(embedding_directory=[str(env["embeddings"])])
        target = clip.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight
    with torch.inference_mode():
        target.fill_(float("nan"))
    budget = make_budget(env)
    name = f"probe_{uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidParameterError, match="non-finite values on a public"):
        train(env, budget, name, model=model, clip=clip)
    assert ledger_records(budget) == 0
    assert not (env["embeddings"] / f"{name}.safetensors").exists()


def test_a_folder_in_the_way_of_the_file_is_refused_by_name_before_spending(env):
    """`embeddings/NAME.safetensors` as a folder: overwrite cannot replace it, so the run is
    refused before the commit (it once spent the budget and then failed on the rename)."""
    budget = make_budget(env)
    name = f"folder_{uuid.uuid4().hex[:6]}"
    (env["embeddings"] / f"{name}.safetensors").mkdir()
    with pytest.raises(InvalidParameterError, match=rf"'{name}.safetensors'.*is a folder"):
        train(env, budget, name, overwrite=True)
    assert ledger_records(budget) == 0


def test_too_little_free_space_is_refused_before_spending(env, monkeypatch):
    import collections

    from comfyui_dp_adapt.dp import embedding_file

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(embedding_file.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 0))
    budget = make_budget(env)
    with pytest.raises(InvalidParameterError, match="KiB free; the embedding file needs"):
        train(env, budget, f"full_{uuid.uuid4().hex[:6]}")
    assert ledger_records(budget) == 0


def test_a_write_failing_after_the_commit_says_so_and_a_rerun_writes_it_free(env, monkeypatch):
    """The disk fills between the check and the write: the message says the release IS
    recorded (id, epsilon), nothing was written and why, and the same prompt queued again
    writes the file through the ledger's idempotent reuse, spending nothing more."""
    import errno

    import safetensors.torch

    from comfyui_dp_adapt.dp.embedding_file import EmbeddingNotWrittenError

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    budget = make_budget(env)
    images = private_set(env["images"])
    name = f"late_{uuid.uuid4().hex[:6]}"
    path = env["embeddings"] / f"{name}.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full)
        with pytest.raises(EmbeddingNotWrittenError) as failed:
            train(env, budget, name, private_images=images)
    message = str(failed.value)
    record = json.loads(budget.ledger_path.read_text())["collections"][budget.ledger_name]
    (release_id,) = record["releases"]
    assert "IS recorded" in message and "epsilon = " in message
    assert release_id in message
    assert "nothing was written" in message and "No space left on device" in message
    assert "queue the same prompt again" in message and "no further cost" in message
    assert not path.exists()
    again = train(env, budget, name, private_images=images)
    _tensors, metadata = read_embedding(path)
    assert metadata["dp_adapt.release_id"] == release_id
    assert ledger_records(budget) == 1
    assert "published again; nothing spent" in again["result"][1]


def test_model_and_clip_of_different_checkpoints_are_named_before_any_work(env):
    """An SD1 UNet reading 64-wide context with a 32-wide CLIP once failed deep in training
    with 'mat1 and mat2 shapes cannot be multiplied' (29 lines of traceback)."""
    from comfyui_dp_adapt.nodes import tiny_models

    other = tiny_models.build_tiny_model(unet_overrides={"context_dim": 64})
    budget = make_budget(env)
    with pytest.raises(
        InvalidParameterError, match=r"different checkpoints.*width 32.*width 64"
    ) as refused:
        train(env, budget, f"mix_{uuid.uuid4().hex[:6]}", model=other)
    assert "MODEL" in str(refused.value) and "CLIP" in str(refused.value)
    assert ledger_records(budget) == 0


def test_cancel_during_an_images_vae_encoding_stops_inside_that_image(env, monkeypatch):
    """At 2048 px one VAE pass is long: Cancel pressed while the first picture is being
    encoded stops inside that pass (no picture finishes encoding), spending nothing."""
    import comfy.model_management

    from comfyui_dp_adapt.nodes import comfy_compat

    started, finished = [], []
    original = comfy_compat.encode_latents

    def encode(model, vae, images):
        started.append(1)
        out = original(model, vae, images)
        finished.append(1)
        return out

    def press_cancel(*_args):
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy_compat, "encode_latents", encode)
    encoder = env["vae"].first_stage_model.encoder
    handle = next(iter(encoder.children())).register_forward_hook(press_cancel)
    budget = make_budget(env)
    name = f"cancel_enc_{uuid.uuid4().hex[:6]}"
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(env, budget, name)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert started == [1] and finished == []
    assert not (env["embeddings"] / f"{name}.safetensors").exists()
    assert ledger_records(budget) == 0
