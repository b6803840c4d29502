"""Entry checks: every bad value is refused by name, never clamped."""

from __future__ import annotations

import pytest

from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.validation import (
    check_clip_norm,
    check_delta,
    check_epsilon,
    check_positive_int,
    check_sampling_rate,
    delta_warning,
)


@pytest.mark.parametrize(
    ("check", "value", "name"),
    [
        (check_epsilon, 0, "epsilon"),
        (check_epsilon, -0.5, "epsilon"),
        (check_epsilon, float("nan"), "epsilon"),
        (check_epsilon, float("inf"), "epsilon"),
        (check_epsilon, True, "epsilon"),
        (check_epsilon, "1", "epsilon"),
        (check_delta, 0, "delta"),
        (check_delta, 1, "delta"),
        (check_delta, 1.5, "delta"),
        (check_delta, float("nan"), "delta"),
        (check_sampling_rate, 0, "sampling_rate"),
        (check_sampling_rate, 1.0001, "sampling_rate"),
        (check_clip_norm, 0, "clip_norm"),
        (check_clip_norm, float("-inf"), "clip_norm"),
    ],
)
def test_bad_values_are_refused_with_name_and_value(check, value, name):
    with pytest.raises(InvalidParameterError) as error:
        check(value)
    assert name in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, None])
def test_positive_integers(value):
    with pytest.raises(InvalidParameterError, match="n must be a positive integer"):
        check_positive_int("n", value)


def test_good_values_pass_unchanged():
    assert check_epsilon(1) == 1.0 and check_delta(1e-9) == 1e-9
    assert check_sampling_rate(1) == 1.0 and check_clip_norm(0.25) == 0.25


def test_delta_warning_appears_exactly_when_delta_reaches_one_over_n():
    assert delta_warning(1e-5, 1000) is None
    assert "1/n" in delta_warning(1e-3, 1000)
    assert delta_warning(0.01, 1000) is not None
