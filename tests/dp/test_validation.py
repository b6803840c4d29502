"""Entry checks: bad privacy parameters fail loudly with the name and value, never clamp."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comfyui_dp_adapt.dp import errors
from comfyui_dp_adapt.dp.validation import (
    MAX_DECLARED_SIZE,
    MAX_EPSILON,
    MIN_DECLARED_SIZE,
    check_budget_epsilon,
    check_clip_norm,
    check_declared_dataset_size,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
    delta_warning,
)

NOT_NUMBERS = [True, False, "1", None, [1.0], 1 + 0j]
NON_FINITE = [math.nan, math.inf, -math.inf, np.float64("nan")]


def test_error_classes_form_one_hierarchy_of_value_errors():
    for cls in (
        errors.InvalidParameterError,
        errors.BudgetExceededError,
        errors.LedgerError,
        errors.LedgerFormatError,
        errors.LedgerCorruptError,
    ):
        assert issubclass(cls, errors.DpAdaptError)
        assert issubclass(cls, ValueError)
    assert issubclass(errors.LedgerFormatError, errors.LedgerError)
    assert issubclass(errors.LedgerCorruptError, errors.LedgerError)


@pytest.mark.parametrize(
    ("check", "name", "good", "bad"),
    [
        (check_epsilon, "epsilon", [1e-6, 1, 8.0, np.float32(2.5)], [0, -1.0, -1e-300]),
        (check_delta, "delta", [1e-12, 1e-5, 0.5], [0, 1, 1.5, -1e-5]),
        (check_sampling_rate, "sampling_rate", [1e-9, 0.05, 1, 1.0], [0, -0.1, 1.0000001, 2]),
        (check_clip_norm, "clip_norm", [1e-9, 1, 100.0], [0, -1.0]),
        (check_noise_multiplier, "noise_multiplier", [1e-3, 1, 40.0], [0, -2.0]),
    ],
)
def test_real_checks_accept_allowed_values_and_name_the_rejected_ones(check, name, good, bad):
    for value in good:
        result = check(value)
        assert type(result) is float
        assert result == float(value)
    for value in [*bad, *NON_FINITE, *NOT_NUMBERS]:
        with pytest.raises(errors.InvalidParameterError) as info:
            check(value)
        message = str(info.value)
        assert name in message
        assert repr(value) in message or str(float(value)) in message


def test_positive_int_refuses_bools_floats_and_non_positive_values():
    assert check_positive_int("dataset_size", 3) == 3
    assert check_positive_int("dataset_size", np.int64(7)) == 7
    for value in [0, -1, 2.0, True, "3", None, math.nan]:
        with pytest.raises(errors.InvalidParameterError, match="dataset_size"):
            check_positive_int("dataset_size", value)


def test_delta_warning_fires_exactly_when_delta_is_not_below_one_over_n():
    assert delta_warning(1e-5, 1000) is None
    assert delta_warning(0.999e-3, 1000) is None
    message = delta_warning(1e-3, 1000)
    assert message is not None and "1/n" in message and "n=1000" in message
    assert delta_warning(0.5, 3) is not None


def test_delta_warning_validates_its_inputs():
    with pytest.raises(errors.InvalidParameterError, match="dataset_size"):
        delta_warning(1e-5, 0)
    with pytest.raises(errors.InvalidParameterError, match="delta"):
        delta_warning(math.nan, 10)


# --- what a privacy budget may state -------------------------------------------------------


@pytest.mark.parametrize("n_hat", [MAX_DECLARED_SIZE + 1, 10**7, 10**18])
def test_a_declared_size_above_the_ceiling_is_refused_saying_it_sets_the_run_time(n_hat):
    """The auditor's case: n_hat = 10^7 ran for minutes (the work is padded to n_hat)."""
    with pytest.raises(errors.InvalidParameterError) as error:
        check_declared_dataset_size(n_hat)
    message = str(error.value)
    assert f"at most {MAX_DECLARED_SIZE:,} images" in message and f"{n_hat:,}" in message
    assert "run time" in message and "padded" in message


def test_the_declared_size_range_is_kept_and_its_ends_accepted():
    assert check_declared_dataset_size(MIN_DECLARED_SIZE) == MIN_DECLARED_SIZE
    assert check_declared_dataset_size(MAX_DECLARED_SIZE) == MAX_DECLARED_SIZE
    assert 1000 <= MAX_DECLARED_SIZE, "the paper's collections (20-1000 images) fit"
    for bad in (1, 0, -5, 2.0, True, "100"):
        with pytest.raises(errors.InvalidParameterError, match="declared_dataset_size"):
            check_declared_dataset_size(bad)


@pytest.mark.parametrize("epsilon", [MAX_EPSILON * (1 + 1e-12), 1e3, 1e300])
def test_a_budget_epsilon_above_the_ceiling_is_refused_with_the_reason(epsilon):
    with pytest.raises(errors.InvalidParameterError) as error:
        check_budget_epsilon(epsilon, name="total epsilon")
    message = str(error.value)
    assert f"total epsilon must be at most {MAX_EPSILON:g}" in message
    assert f"total epsilon={epsilon!r}" in message and "promises nothing" in message
    assert check_budget_epsilon(MAX_EPSILON) == MAX_EPSILON
    with pytest.raises(errors.InvalidParameterError, match="finite"):
        check_budget_epsilon(math.inf)
