"""The DP Privacy Planner node in a real (in-process) ComfyUI."""

from __future__ import annotations

import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.errors import DpAdaptError


@pytest.fixture(scope="module")
def nodes(comfy):
    from comfyui_dp_adapt.nodes.budget import PrivacyBudgetNode
    from comfyui_dp_adapt.nodes.planner import PrivacyPlannerNode

    return PrivacyBudgetNode(), PrivacyPlannerNode()


def budget(nodes, **overrides):
    kwargs = dict(
        ledger_name=f"plan-{uuid.uuid4().hex[:8]}",
        epsilon=1.0,
        delta=1e-5,
        total_epsilon=4.0,
        total_delta=1e-5,
        declared_dataset_size=100,
    )
    kwargs.update(overrides)
    with torch.inference_mode():
        return nodes[0].make_budget(**kwargs)["result"][0]


def record_one_release(the_budget) -> None:
    """One release at epsilon 1, q = 1 (a Gaussian-DP filter history) in the budget's ledger."""
    from comfyui_dp_adapt.dp.accounting import calibrate_noise_multiplier
    from comfyui_dp_adapt.tests.support.private_sets import installation_key_check

    event = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, sampling_rate=1.0).event
    the_budget.ledger().commit(
        collection=the_budget.ledger_name,
        total=the_budget.total,
        event=event,
        image_keys=["hmac-sha256:x"],
        request_key=f"request-{uuid.uuid4().hex}",
        label="test",
        release=lambda included: {"value": 1},
        key_check=installation_key_check(),  # as the loader's pictures carry it
    )


def plan(nodes, the_budget, dimension=768, sampling_rate=1.0):
    with torch.inference_mode():
        return nodes[1].plan(the_budget, dimension, sampling_rate)


def test_the_plot_is_a_comfyui_image_and_the_report_has_the_calibrated_figures(nodes):
    from comfyui_dp_adapt.dp.accounting import noise_comparison

    out = plan(nodes, budget(nodes))
    plot, report = out["result"]
    assert out["ui"]["text"] == [report]
    assert plot.dtype == torch.float32 and plot.dim() == 4 and plot.shape[0] == 1
    assert plot.shape[-1] == 3 and plot.shape[1] >= 300 and plot.shape[2] >= 500
    assert 0.0 <= plot.min() and plot.max() <= 1.0
    assert plot.std() > 0.05, "the figure is blank"
    comparison = noise_comparison(
        epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        dataset_size=100,
        sampling_rate=1.0,
        dimension=768,
    )
    assert f"{comparison.noise_multiplier:.4g}" in report
    assert f"{comparison.relative_noise:.3g}" in report
    assert f"{comparison.paper_relative_noise:.3g}" in report
    assert "no release recorded yet" in report


def test_the_plot_changes_with_the_settings_it_draws(nodes):
    the_budget = budget(nodes)
    a = plan(nodes, the_budget)["result"][0]
    b = plan(nodes, the_budget, dimension=4 * 768, sampling_rate=0.5)["result"][0]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_the_report_shows_the_ledger_balance_and_refuses_nothing(nodes):
    name = f"spent-{uuid.uuid4().hex[:8]}"
    the_budget = budget(nodes, ledger_name=name, total_epsilon=1.1)
    record_one_release(the_budget)
    _, report = plan(nodes, the_budget)["result"]
    assert f"ledger '{name}': 1 release(s), epsilon " in report and "remaining" not in report
    assert "nearly spent" in report
    assert "would be refused by the ledger" in report and "can use up to eps = " in report
    assert the_budget.ledger().release_count(name) == 1, "planning records nothing"


def test_the_planner_reads_no_images():
    from comfyui_dp_adapt.dp.private_set import SOCKET_TYPE
    from comfyui_dp_adapt.nodes.planner import PrivacyPlannerNode

    kinds = [spec[0] for spec in PrivacyPlannerNode.INPUT_TYPES()["required"].values()]
    assert SOCKET_TYPE not in kinds and "IMAGE" not in kinds


@pytest.mark.parametrize(
    ("dimension", "sampling_rate", "message"),
    [(768, 0.0, "sampling_rate"), (0, 1.0, "dimension")],
)
def test_bad_inputs_are_refused_clearly(nodes, dimension, sampling_rate, message):
    with pytest.raises(DpAdaptError, match=message):
        plan(nodes, budget(nodes), dimension=dimension, sampling_rate=sampling_rate)


def test_a_delta_not_below_the_sampling_rate_is_refused(nodes):
    the_budget = budget(nodes, delta=0.5, total_delta=0.5)
    with pytest.raises(DpAdaptError, match="below the sampling rate"):
        plan(nodes, the_budget, sampling_rate=0.3)


def test_cancel_interrupts_a_calibration(nodes, monkeypatch):
    """ComfyUI's Cancel is honoured between PLD passes (a fresh target, not cached)."""
    import comfy.model_management

    from comfyui_dp_adapt.dp import accounting

    monkeypatch.setattr(accounting, "_cache", type(accounting._cache)())
    the_budget = budget(nodes, epsilon=0.77)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            plan(nodes, the_budget, sampling_rate=0.37)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_the_route_payload_is_the_collection_balance(nodes):
    from comfyui_dp_adapt.nodes.ledger_route import balance_payload

    name = f"route-{uuid.uuid4().hex[:8]}"
    payload = balance_payload({"name": name, "total_epsilon": "4", "total_delta": "1e-5"})
    assert payload["releases"] == 0 and "no release recorded yet" in payload["line"]
    with pytest.raises(DpAdaptError, match="ledger name"):
        balance_payload({"name": "../x", "total_epsilon": "4", "total_delta": "1e-5"})
    with pytest.raises(DpAdaptError, match="total_epsilon"):
        balance_payload({"name": name})
    with pytest.raises(DpAdaptError, match="plans"):
        balance_payload({"name": name, "total_epsilon": "4", "total_delta": "1e-5", "plans": "x"})


def test_the_route_states_what_the_ledger_allows_each_planned_release(nodes):
    from comfyui_dp_adapt.nodes.ledger_route import balance_payload

    name = f"route-{uuid.uuid4().hex[:8]}"
    the_budget = budget(nodes, ledger_name=name)
    record_one_release(the_budget)
    query = {"name": name, "total_epsilon": "4", "total_delta": "1e-5", "plans": "1,0.5"}
    payload = balance_payload(query)
    one, subsampled = payload["next"]
    assert one["sampling_rate"] == 1.0 and 1.0 < one["epsilon"] < 4.0
    assert subsampled["refused_kind"] and subsampled["epsilon"] == 0.0
    assert f"can use up to eps = {one['epsilon']:g} at q = 1" in payload["line"]
    assert "a release at q = 0.5, delta 1e-05 cannot join this collection" in payload["line"]
    assert "remaining" not in payload["line"] and "remaining_epsilon" not in payload
