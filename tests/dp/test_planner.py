"""Planning figures: the noise curve and the largest epsilon the ledger allows next."""

from __future__ import annotations

import itertools
import math

import pytest

from comfyui_dp_adapt.dp.accounting import calibrate_noise_multiplier
from comfyui_dp_adapt.dp.ledger import Ledger, TotalBudget
from comfyui_dp_adapt.dp.planner import (
    DEFAULT_EPSILONS,
    largest_next_epsilon,
    ledger_balance,
    noise_curve,
)

DELTA = 1e-5
TOTAL = TotalBudget(epsilon=3.0, delta=DELTA)


def record(ledger: Ledger, collection: str, epsilon: float, key: str) -> None:
    event = calibrate_noise_multiplier(epsilon=epsilon, delta=DELTA, sampling_rate=1.0).event
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
    assert (balance.releases, balance.spent, balance.remaining) == (0, 0.0, TOTAL.epsilon)


def test_the_largest_next_epsilon_is_what_the_ledger_accepts_and_a_little_more_is_refused(
    tmp_path,
):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 2.0, "a")
    allowed = largest_next_epsilon(ledger, "c", total=TOTAL, delta=DELTA, sampling_rate=1.0)
    assert 0 < allowed < TOTAL.epsilon
    # PLD composition is tighter than adding epsilons: more than 3 - 2 is left.
    assert allowed > TOTAL.epsilon - 2.0

    def accepted(epsilon):
        event = calibrate_noise_multiplier(epsilon=epsilon, delta=DELTA, sampling_rate=1.0).event
        return ledger.check(collection="c", event=event, total=TOTAL).ok

    assert accepted(allowed)
    assert not accepted(allowed * 1.05)
    balance = ledger_balance(ledger, "c", requested_total=TOTAL, delta=DELTA, sampling_rate=1.0)
    assert balance.releases == 1 and balance.next_release_epsilon == pytest.approx(allowed)
    assert balance.spent == pytest.approx(ledger.spent("c", delta=DELTA))


def test_a_spent_collection_allows_nothing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 3.0, "a")
    assert largest_next_epsilon(ledger, "c", total=TOTAL, delta=DELTA, sampling_rate=1.0) == 0.0


def test_the_pinned_total_wins_over_a_larger_requested_one(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    record(ledger, "c", 1.0, "a")
    balance = ledger_balance(ledger, "c", requested_total=TotalBudget(10.0, DELTA))
    assert balance.total == TOTAL
