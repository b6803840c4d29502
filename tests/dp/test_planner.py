"""Planning figures: the noise curve and the largest epsilon the ledger allows next."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from comfyui_dp_adapt.dp.accounting import calibrate_noise_multiplier
from comfyui_dp_adapt.dp.ledger import GAUSSIAN_FILTER, RENYI_FILTER, Ledger, TotalBudget
from comfyui_dp_adapt.dp.planner import (
    DEFAULT_EPSILONS,
    PlannedRelease,
    largest_next_epsilon,
    ledger_balance,
    noise_curve,
)
from comfyui_dp_adapt.dp.report import balance_line

DELTA = 1e-5
TOTAL = TotalBudget(epsilon=3.0, delta=DELTA)


def record(
    ledger: Ledger, collection: str, epsilon: float, key: str, *, sampling_rate: float = 1.0
) -> None:
    event = calibrate_noise_multiplier(
        epsilon=epsilon, delta=DELTA, sampling_rate=sampling_rate
    ).event
    ledger.commit(
        collection=collection,
        total=TOTAL,
        event=event,
        image_keys=[f"hmac-sha256:{key}"],
        request_key=f"request-{key}",
        label="test",
        release=lambda included: {"value": 1},
    )


def test_the_curve_is_the_calibrated_relative_noise_and_falls_with_epsilon():
    points = noise_curve(delta=DELTA, dataset_size=100, dimension=768, sampling_rate=1.0)
    assert [p.epsilon for p in points] == list(DEFAULT_EPSILONS)
    for point in points:
        z = calibrate_noise_multiplier(
            epsilon=point.epsilon, delta=DELTA, sampling_rate=1.0
        ).noise_multiplier
        assert point.relative_noise == pytest.approx(z * math.sqrt(768) / 100)
        assert point.paper_relative_noise is not None
    noise = [p.relative_noise for p in points]
    assert all(a > b for a, b in itertools.pairwise(noise))


def test_the_curve_scales_with_the_square_root_of_the_dimension_and_one_over_n():
    small = noise_curve(delta=DELTA, dataset_size=100, dimension=768, sampling_rate=1.0)
    large = noise_curve(delta=DELTA, dataset_size=400, dimension=4 * 768, sampling_rate=1.0)
    for a, b in zip(small, large, strict=True):
        assert b.relative_noise == pytest.approx(a.relative_noise * 2 / 4)


def test_an_empty_collection_allows_its_whole_total(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    assert largest_next_epsilon(
        ledger, "fresh", total=TOTAL, delta=DELTA, sampling_rate=1.0
    ) == pytest.approx(TOTAL.epsilon)
    balance = ledger_balance(ledger, "fresh", requested_total=TOTAL)
    assert (balance.releases, balance.spent, balance.next_releases) == (0, 0.0, ())


def accepted(ledger: Ledger, planned: PlannedRelease, epsilon: float, total=TOTAL) -> bool:
    """What the ledger decides on a release calibrated to ``epsilon`` (as the nodes do)."""
    return ledger.check(collection="c", event=planned.calibrate(epsilon).event, total=total).ok


def shown_epsilon(line: str) -> float:
    """The X of "the next release can use up to eps = X" as the report prints it."""
    match = re.search(r"can use up to eps = ([0-9.e+-]+)", line)
    assert match, line
    return float(match.group(1))


GAUSSIAN_HISTORY = 1.0  # a first release at q = 1 pins the Gaussian-DP filter
RENYI_HISTORY = 0.5  # a first release at q < 1 pins the Renyi filter


@pytest.mark.parametrize(
    ("first_q", "planned"),
    [
        (GAUSSIAN_HISTORY, PlannedRelease(delta=DELTA, sampling_rate=1.0)),
        (RENYI_HISTORY, PlannedRelease(delta=DELTA, sampling_rate=1.0)),
        (RENYI_HISTORY, PlannedRelease(delta=DELTA, sampling_rate=0.3)),
        pytest.param(
            RENYI_HISTORY,
            PlannedRelease(delta=DELTA, sampling_rate=0.3, steps=20),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["gaussian-q1", "renyi-q1", "renyi-q0.3", "renyi-dpsgd-q0.3"],
)
def test_the_shown_next_epsilon_is_accepted_and_one_percent_more_is_refused(
    tmp_path, first_q, planned
):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 1.5, "a", sampling_rate=first_q)
    balance = ledger_balance(ledger, "c", requested_total=TOTAL, planned=(planned,))
    (allowed,) = balance.next_releases
    kind = GAUSSIAN_FILTER if first_q == 1 else RENYI_FILTER
    assert allowed.filter_kind == kind and not allowed.refused_kind
    line = balance_line(balance)
    shown = shown_epsilon(line)
    assert shown == allowed.epsilon and 0 < shown < TOTAL.epsilon
    assert f"q = {planned.sampling_rate:g}" in line
    assert accepted(ledger, planned, shown)
    assert not accepted(ledger, planned, shown * 1.01)
    assert "remaining" not in line


@pytest.mark.slow
def test_the_next_epsilon_depends_on_q_and_on_the_number_of_dpsgd_steps(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 1.5, "a", sampling_rate=RENYI_HISTORY)
    plans = (
        PlannedRelease(delta=DELTA, sampling_rate=1.0),
        PlannedRelease(delta=DELTA, sampling_rate=0.3),
        PlannedRelease(delta=DELTA, sampling_rate=0.3, steps=20),
    )
    one, subsampled, dpsgd = ledger_balance(
        ledger, "c", requested_total=TOTAL, planned=plans
    ).next_releases
    assert len({one.epsilon, subsampled.epsilon, dpsgd.epsilon}) == 3


def test_a_gaussian_history_refuses_a_subsampled_release_in_words(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 1.0, "a", sampling_rate=GAUSSIAN_HISTORY)
    planned = PlannedRelease(delta=DELTA, sampling_rate=0.5)
    balance = ledger_balance(ledger, "c", requested_total=TOTAL, planned=(planned,))
    (allowed,) = balance.next_releases
    assert allowed.refused_kind and allowed.epsilon == 0.0
    line = balance_line(balance)
    assert "cannot join this collection" in line and "q = 0.5" in line
    assert "can use up to" not in line and "nearly spent" not in line
    assert not accepted(ledger, planned, 0.05)


def test_the_balance_line_states_the_pld_spend_without_subtracting_it(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 2.0, "a")
    planned = PlannedRelease(delta=DELTA, sampling_rate=1.0)
    balance = ledger_balance(ledger, "c", requested_total=TOTAL, planned=(planned,))
    line = balance_line(balance)
    spent = ledger.spent("c", delta=DELTA)
    assert f"epsilon {spent:.4g} of {TOTAL.epsilon:g} spent" in line
    # Composition allows more than the subtraction the old line showed.
    assert shown_epsilon(line) > TOTAL.epsilon - spent
    assert "remaining" not in line


def test_a_spent_collection_allows_nothing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 3.0, "a")
    assert largest_next_epsilon(ledger, "c", total=TOTAL, delta=DELTA, sampling_rate=1.0) == 0.0


def test_the_pinned_total_wins_over_a_larger_requested_one(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 1.0, "a")
    balance = ledger_balance(ledger, "c", requested_total=TotalBudget(10.0, DELTA))
    assert balance.total == TOTAL
