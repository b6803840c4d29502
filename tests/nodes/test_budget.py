"""The Privacy Budget node in a real (in-process) ComfyUI."""

from __future__ import annotations

import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.errors import DpAdaptError

DEFAULTS = dict(
    epsilon=1.0,
    delta=1e-5,
    total_epsilon=4.0,
    total_delta=1e-5,
    declared_dataset_size=100,
    report_dimension=768,
    report_sampling_rate=1.0,
)


@pytest.fixture(scope="module")
def node(comfy):
    from comfyui_dp_adapt.nodes.budget import PrivacyBudgetNode

    return PrivacyBudgetNode()


def run(node, **overrides):
    kwargs = {"ledger_name": f"budget-{uuid.uuid4().hex[:8]}", **DEFAULTS, **overrides}
    with torch.inference_mode():
        return node.make_budget(**kwargs)


def test_outputs_a_budget_and_a_report_with_the_calibrated_noise(node):
    from comfyui_dp_adapt.dp.accounting import calibrate_noise_multiplier
    from comfyui_dp_adapt.dp.budget import PrivacyBudget

    out = run(node)
    budget, report = out["result"]
    assert isinstance(budget, PrivacyBudget)
    assert out["ui"]["text"] == [report]
    z = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, sampling_rate=1.0).noise_multiplier
    assert f"{z:.4g}" in report
    assert "paper" in report and "no release recorded yet" in report
    assert budget.ledger_path.name == "ledger.json"
    ledger = budget.ledger()
    assert budget.ledger_name not in ledger.collections(), "planning a budget records nothing"


def test_report_warns_when_delta_is_not_below_one_over_n(node):
    _, report = run(node, delta=0.02, total_delta=0.02, declared_dataset_size=100)["result"]
    assert "WARNING" in report and "1/n" in report
    _, quiet = run(node)["result"]
    assert "1/n" not in quiet


def test_report_shows_spending_and_warns_when_nearly_spent(node):
    from comfyui_dp_adapt.dp.accounting import calibrate_noise_multiplier

    name = f"spent-{uuid.uuid4().hex[:8]}"
    budget, _ = run(node, ledger_name=name, total_epsilon=1.1)["result"]
    event = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, sampling_rate=1.0).event
    budget.ledger().commit(
        collection=name,
        total=budget.total,
        event=event,
        image_keys=["hmac-sha256:x"],
        request_key=f"request-{uuid.uuid4().hex}",
        label="test",
        release=lambda included: {"value": 1},
    )
    _, report = run(node, ledger_name=name, total_epsilon=1.1)["result"]
    assert f"ledger '{name}': epsilon spent" in report and "nearly spent" in report


def test_the_report_states_the_declared_size_as_public(node):
    budget, report = run(node, declared_dataset_size=250)["result"]
    assert budget.declared_dataset_size == 250 and "n_hat=250" in report


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"total_epsilon": 0.5}, "larger than the dataset's total"),
        ({"report_sampling_rate": 0.0}, "sampling_rate"),
        ({"ledger_name": "../escape"}, "ledger name"),
        ({"declared_dataset_size": 1}, "declared_dataset_size"),
        (
            {"delta": 0.5, "total_delta": 0.5, "report_sampling_rate": 0.3},
            "below the sampling rate",
        ),
    ],
)
def test_bad_inputs_are_refused_clearly(node, overrides, message):
    with pytest.raises(DpAdaptError, match=message):
        run(node, **overrides)


def test_cancel_interrupts_a_calibration(node, monkeypatch):
    """ComfyUI's Cancel is honoured between PLD passes (a fresh target, not cached)."""
    import comfy.model_management

    from comfyui_dp_adapt.dp import accounting

    monkeypatch.setattr(accounting, "_cache", type(accounting._cache)())
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(node, epsilon=0.77, report_sampling_rate=0.37)
    finally:
        comfy.model_management.interrupt_current_processing(False)
