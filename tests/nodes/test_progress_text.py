"""The phase and ETA text DP Textual Inversion Train shows on its node: public values only."""

from __future__ import annotations

import logging
import re
import uuid

import pytest
import torch

N_HAT = 6


@pytest.fixture(scope="module")
def env(comfy):
    from comfyui_dp_adapt.nodes.textual_inversion import DPTextualInversionTrainNode
    from comfyui_dp_adapt.tests.support.tiny_components import tiny_sd1_components

    return {
        **tiny_sd1_components(),
        "node": DPTextualInversionTrainNode(),
        "images": torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(4)),
    }


def fresh_budget():
    """A budget of its own ledger collection, declaring n_hat = N_HAT."""
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.nodes import comfy_compat

    return PrivacyBudget(
        epsilon=1.0,
        delta=1e-5,
        total=TotalBudget(epsilon=8.0, delta=1e-5),
        ledger_name=f"text-{uuid.uuid4().hex[:8]}",
        ledger_directory=comfy_compat.user_directory() / "dp_adapt" / "ledgers",
        declared_dataset_size=N_HAT,
    )


def phase_texts(env, monkeypatch, count: int, method: str) -> list[str]:
    """Every text the node showed while releasing from ``count`` images."""
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    shown = []
    monkeypatch.setattr(
        comfy_compat, "progress_text", lambda text, node_id: shown.append((text, node_id))
    )
    budget = fresh_budget()
    keys = tuple(f"hmac-sha256:text-{uuid.uuid4().hex}" for _ in range(count))
    with torch.inference_mode():
        env["node"].train(
            model=env["model"],
            clip=env["clip"],
            vae=env["vae"],
            private_images=private_image_set(env["images"][:count], keys),
            budget=budget,
            embedding_name=f"text_{uuid.uuid4().hex[:6]}",
            num_vectors=1,
            initializer_word="painting",
            template_set="style",
            steps=2,
            learning_rate=0.01,
            images_per_batch=4,
            sampling_rate=0.5,
            clip_norm=0.5,
            bound_mode="clip",
            overwrite=False,
            method=method,
            unique_id="17",
        )
    assert {node_id for _, node_id in shown} == {"17"}, "shown on the node that runs"
    return [text for text, _ in shown]


def without_timing(texts: list[str]) -> list[str]:
    return [re.sub(r", about [0-9.]+ (s|min|h) left", "", text) for text in texts]


@pytest.mark.parametrize("method", ["DPAgg-TI", "DP-SGD"])
def test_phase_texts_for_3_and_5_images_are_identical_up_to_timing(env, monkeypatch, method):
    """n_hat = 6 in chunks of 4: 2 chunks whatever the count, so the texts (phases, public
    progress, n_hat) are the same for 3 and 5 images; only the measured ETAs may differ."""
    three = phase_texts(env, monkeypatch, 3, method)
    five = phase_texts(env, monkeypatch, 5, method)
    assert without_timing(three) == without_timing(five)
    assert three[0] == "encoding 0/2 chunks (n_hat = 6)"
    assert "encoding 2/2 chunks (n_hat = 6)" in three
    assert "training 4/4 chunk steps (n_hat = 6)" in three
    assert any(re.search(r"about [0-9.]+ (s|min|h) left", text) for text in three)
    if method == "DPAgg-TI":
        assert any(text.startswith("commit:") for text in three)
    assert three[-1].startswith("saving the embedding file")


def test_eta_is_the_time_per_public_unit_times_the_units_left():
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.inversion_model import PhaseText

    now = [100.0]
    texts = []
    original = comfy_compat.progress_text
    comfy_compat.progress_text = lambda text, node_id: texts.append(text)
    try:
        phase = PhaseText("3", n_hat=100, clock=lambda: now[0])
        phase.show("encoding", 0, 13, unit="chunks")
        now[0] += 90.0  # 3 chunks in 90 s: 30 s each, 10 left
        phase.show("encoding", 3, 13, unit="chunks")
    finally:
        comfy_compat.progress_text = original
    assert texts == [
        "encoding 0/13 chunks (n_hat = 100)",
        "encoding 3/13 chunks (n_hat = 100), about 5 min left",
    ]


def test_without_send_progress_text_the_phase_goes_to_the_server_log(comfy, caplog):
    """The March 2024 ComfyUI has no send_progress_text and tests run no server: the line
    is logged at INFO instead."""
    from comfyui_dp_adapt.nodes import comfy_compat

    with caplog.at_level(logging.INFO, logger=comfy_compat.__name__):
        comfy_compat.progress_text("encoding 1/2 chunks (n_hat = 6)", "5")
    assert "encoding 1/2 chunks (n_hat = 6)" in caplog.text


def test_clip_aggregate_texts_for_3_and_5_images_are_identical_up_to_timing(comfy, monkeypatch):
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes.clip_aggregate import DPAggregateCLIPEmbeddingsNode
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    clip_vision = tiny_models.build_tiny_clip_vision()
    images = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    seen = {}
    for count in (3, 5):
        shown = seen[count] = []
        monkeypatch.setattr(
            comfy_compat, "progress_text", lambda text, node_id, shown=shown: shown.append(text)
        )
        budget = fresh_budget()
        keys = tuple(f"hmac-sha256:text-{uuid.uuid4().hex}" for _ in range(count))
        with torch.inference_mode():
            DPAggregateCLIPEmbeddingsNode().aggregate(
                clip_vision=clip_vision,
                private_images=private_image_set(images[:count], keys),
                budget=budget,
                sampling_rate=0.5,
                images_per_batch=4,
                unique_id="9",
            )
    assert without_timing(seen[3]) == without_timing(seen[5])
    assert without_timing(seen[3])[:3] == [
        "embedding 0/2 chunks (n_hat = 6)",
        "embedding 1/2 chunks (n_hat = 6)",
        "embedding 2/2 chunks (n_hat = 6)",
    ]
    assert seen[3][-1].startswith("commit:")
