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
)


@pytest.fixture(scope="module")
def node(comfy):
    from comfyui_dp_adapt.nodes.budget import PrivacyBudgetNode

    return PrivacyBudgetNode()


def run(node, **overrides):
    kwargs = {"ledger_name": f"budget-{uuid.uuid4().hex[:8]}", **DEFAULTS, **overrides}
    with torch.inference_mode():
        return node.make_budget(**kwargs)


def test_outputs_a_budget_and_a_report_of_what_it_states(node):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget

    out = run(node)
    budget, report = out["result"]
    assert isinstance(budget, PrivacyBudget)
    assert out["ui"]["text"] == [report]
    assert "epsilon 1, delta 1e-05" in report and "total epsilon 4" in report
    assert budget.ledger_path.name == "ledger.json"
    ledger = budget.ledger()
    assert budget.ledger_name not in ledger.collections(), "stating a budget records nothing"


def test_the_budget_node_has_no_widget_that_exists_only_for_a_report(node):
    """Every input of the node is part of the budget it outputs (issue: report_* widgets)."""
    from comfyui_dp_adapt.nodes.budget import PrivacyBudgetNode

    inputs = set(PrivacyBudgetNode.INPUT_TYPES()["required"])
    budget, _ = run(node)["result"]
    stated = {"ledger_name", "epsilon", "delta", "declared_dataset_size"}
    assert inputs == stated | {"total_epsilon", "total_delta"}
    assert all(hasattr(budget, name) for name in stated)


def test_report_warns_when_delta_is_not_below_one_over_n(node):
    _, report = run(node, delta=0.02, total_delta=0.02, declared_dataset_size=100)["result"]
    assert "WARNING" in report and "1/n" in report
    _, quiet = run(node)["result"]
    assert "1/n" not in quiet


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
        ({"ledger_name": "../escape"}, "ledger name"),
        ({"declared_dataset_size": 1}, "declared_dataset_size"),
    ],
)
def test_bad_inputs_are_refused_clearly(node, overrides, message):
    with pytest.raises(DpAdaptError, match=message):
        run(node, **overrides)


def test_the_widgets_ranges_are_the_budgets_own_limits(node):
    from comfyui_dp_adapt.dp.validation import MAX_DECLARED_SIZE, MAX_EPSILON, MIN_DECLARED_SIZE
    from comfyui_dp_adapt.nodes.budget import PrivacyBudgetNode

    widgets = PrivacyBudgetNode.INPUT_TYPES()["required"]
    size = widgets["declared_dataset_size"][1]
    assert (size["min"], size["max"]) == (MIN_DECLARED_SIZE, MAX_DECLARED_SIZE)
    assert f"{MAX_DECLARED_SIZE:,}" in size["tooltip"]
    assert widgets["epsilon"][1]["max"] == widgets["total_epsilon"][1]["max"] == MAX_EPSILON
    budget, _ = run(node, declared_dataset_size=MAX_DECLARED_SIZE)["result"]
    assert budget.declared_dataset_size == MAX_DECLARED_SIZE


def test_a_huge_declared_size_is_refused_at_the_node_saying_why(node):
    """The auditor's case: declared_dataset_size = 10^7 ran for minutes before anyone
    stopped it (every release is padded to n_hat images)."""
    from comfyui_dp_adapt.dp.validation import MAX_DECLARED_SIZE

    with pytest.raises(DpAdaptError) as error:
        run(node, declared_dataset_size=10**7)
    message = str(error.value)
    assert f"at most {MAX_DECLARED_SIZE:,} images" in message and "10,000,000" in message
    assert "run time" in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epsilon": 1e300}, "epsilon=1e+300"),
        ({"epsilon": 1e300, "total_epsilon": 1e300}, "epsilon=1e+300"),
        ({"total_epsilon": 1e300}, "total epsilon=1e+300"),
    ],
)
def test_a_huge_epsilon_is_refused_at_the_node_with_the_reason(node, overrides, named):
    """``--set DPAdaptPrivacyBudget.epsilon=1e300`` reaches the node when the widget range
    is not enforced (an API prompt): the message names the value and the ceiling, and does
    not advise raising the total."""
    with pytest.raises(DpAdaptError) as error:
        run(node, **overrides)
    message = str(error.value)
    assert named in message and "at most 100" in message and "promises nothing" in message
    assert "raise the total" not in message
