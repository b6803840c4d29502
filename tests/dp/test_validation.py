"""Entry checks: bad privacy parameters fail loudly with the name and value, never clamp."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comfyui_dp_adapt.dp import errors
from comfyui_dp_adapt.dp.validation import (
    check_clip_norm,
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
