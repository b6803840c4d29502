"""Accounting: calibration never above target, PLD vs exact Gaussian vs RDP, event storage."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest

from comfyui_dp_adapt.dp.accounting import (
    calibrate_noise_multiplier,
    classical_gaussian_sigma,
    compose_epsilon,
    epsilon_for,
    epsilon_rdp,
    event_from_dict,
    event_to_dict,
    noise_comparison,
    paper_calibration,
    release_event,
)
from comfyui_dp_adapt.dp.errors import InvalidParameterError, LedgerFormatError

GRID = [
    (eps, delta, q) for eps in (0.1, 1.0, 8.0) for delta in (1e-5, 1e-7) for q in (1.0, 0.5, 0.05)
]


@pytest.mark.parametrize(("epsilon", "delta", "q"), GRID)
def test_calibration_is_never_above_target_and_within_one_percent(epsilon, delta, q):
    cal = calibrate_noise_multiplier(epsilon=epsilon, delta=delta, sampling_rate=q)
    recomputed = epsilon_for(
        release_event(noise_multiplier=cal.noise_multiplier, sampling_rate=q), delta=delta
    )
    assert recomputed == pytest.approx(cal.epsilon_achieved)
    assert recomputed <= epsilon
    assert recomputed >= 0.99 * epsilon


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [0.5, 4.0])
@pytest.mark.parametrize("q", [0.2, 0.01])
def test_calibration_holds_on_a_wider_grid(epsilon, q):
    cal = calibrate_noise_multiplier(epsilon=epsilon, delta=1e-6, sampling_rate=q)
    assert 0.99 * epsilon <= cal.epsilon_achieved <= epsilon


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0])
def test_pld_agrees_with_the_exact_gaussian_mechanism_without_sampling(epsilon):
    # Analytic Gaussian mechanism (Balle & Wang 2018): the exact sigma for (epsilon, delta).
    exact_sigma = dpa.get_sigma_gaussian(epsilon, 1e-5)
    pld_eps = epsilon_for(dpa.GaussianDpEvent(exact_sigma), delta=1e-5)
    assert pld_eps == pytest.approx(epsilon, rel=1e-3)
    cal = calibrate_noise_multiplier(epsilon=epsilon, delta=1e-5, sampling_rate=1.0)
    assert cal.noise_multiplier == pytest.approx(exact_sigma, rel=0.01)
    assert cal.noise_multiplier >= exact_sigma * (1 - 1e-3), "never less noise than exact"


@pytest.mark.parametrize(("z", "q"), [(1.0, 0.1), (2.0, 0.5), (4.0, 1.0), (0.8, 0.02)])
def test_pld_is_never_looser_than_rdp(z, q):
    event = release_event(noise_multiplier=z, sampling_rate=q)
    assert epsilon_for(event, delta=1e-5) <= epsilon_rdp(event, delta=1e-5) + 1e-9


def test_composition_is_tighter_than_adding_epsilons_and_grows():
    event = release_event(noise_multiplier=3.0, sampling_rate=1.0)
    one = epsilon_for(event, delta=1e-5)
    four = compose_epsilon([event] * 4, delta=1e-5)
    assert one < four < 4 * one
    assert compose_epsilon([], delta=1e-5) == 0.0


def test_release_event_matches_the_spec():
    assert release_event(noise_multiplier=2.0, sampling_rate=1.0) == dpa.GaussianDpEvent(2.0)
    assert release_event(noise_multiplier=2.0, sampling_rate=0.3) == dpa.PoissonSampledDpEvent(
        0.3, dpa.GaussianDpEvent(2.0)
    )


@pytest.mark.parametrize(
    "event",
    [
        dpa.NoOpDpEvent(),
        dpa.GaussianDpEvent(1.5),
        dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0)),
        dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(2.0)),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 500),
        dpa.ComposedDpEvent(
            [dpa.GaussianDpEvent(1.0), dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0), 3)]
        ),
    ],
)
def test_events_round_trip_through_json(event):
    assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event


@pytest.mark.parametrize("data", [{"type": "Laplace", "parameter": 1}, {"type": "Gaussian"}, {}])
def test_unknown_or_malformed_events_are_refused(data):
    with pytest.raises(LedgerFormatError):
        event_from_dict(data)


def test_exact_calibration_needs_about_077_of_the_classical_noise_under_replace_one():
    comparison = noise_comparison(
        epsilon=1.0, delta=1e-5, clip_norm=1.0, dataset_size=1000, sampling_rate=1.0, dimension=768
    )
    exact_replace_one = 2.0 * dpa.get_sigma_gaussian(1.0, 1e-5)
    classical = classical_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=2.0)
    assert comparison.same_adjacency_ratio == pytest.approx(exact_replace_one / classical, rel=0.01)
    assert 0.74 < comparison.same_adjacency_ratio < 0.80
    assert comparison.ratio < 1, "exact add/remove accounting needs less noise than the paper's"
    expected = comparison.noise_multiplier * math.sqrt(768) / 1000
    assert comparison.relative_noise == pytest.approx(expected)


def test_paper_calibration_reports_its_validity_and_true_epsilon():
    small = paper_calibration(
        epsilon=0.5, delta=1e-5, clip_norm=1.0, dataset_size=100, sample_size=100
    )
    assert small.classical_valid
    assert small.exact_epsilon <= 0.5, "inside its range the classical bound is valid (and loose)"
    big = paper_calibration(
        epsilon=2.0, delta=1e-5, clip_norm=1.0, dataset_size=100, sample_size=100
    )
    assert not big.classical_valid
    sampled = paper_calibration(
        epsilon=1.0, delta=1e-5, clip_norm=1.0, dataset_size=100, sample_size=10
    )
    assert (
        sampled.sigma
        < paper_calibration(
            epsilon=1.0, delta=1e-5, clip_norm=1.0, dataset_size=100, sample_size=100
        ).sigma
        * 10
    ), "amplification by sampling lowers the per-sample noise"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0, "delta": 1e-5, "sampling_rate": 1.0},
        {"epsilon": -1.0, "delta": 1e-5, "sampling_rate": 1.0},
        {"epsilon": float("nan"), "delta": 1e-5, "sampling_rate": 1.0},
        {"epsilon": 1.0, "delta": 0.0, "sampling_rate": 1.0},
        {"epsilon": 1.0, "delta": 1.0, "sampling_rate": 1.0},
        {"epsilon": 1.0, "delta": 1e-5, "sampling_rate": 0.0},
        {"epsilon": 1.0, "delta": 1e-5, "sampling_rate": 1.5},
    ],
)
def test_bad_targets_are_refused_naming_the_parameter(kwargs):
    with pytest.raises(InvalidParameterError) as error:
        calibrate_noise_multiplier(**kwargs)
    message = str(error.value)
    assert any(name in message for name in ("epsilon", "delta", "sampling_rate"))
