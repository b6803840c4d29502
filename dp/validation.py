"""Checks at the entry of every privacy-relevant function: fail loudly, never clamp."""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import InvalidParameterError


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidParameterError(f"{name} must be a number, got {name}={value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {name}={value!r}.")
    return value


def check_epsilon(epsilon, name: str = "epsilon") -> float:
    value = _real(name, epsilon)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={epsilon!r}.")
    return value


def check_delta(delta, name: str = "delta") -> float:
    value = _real(name, delta)
    if not 0 < value < 1:
        raise InvalidParameterError(
            f"{name} must be strictly between 0 and 1 (and well below 1/n), got {name}={delta!r}."
        )
    return value


def check_sampling_rate(q, name: str = "sampling_rate") -> float:
    value = _real(name, q)
    if not 0 < value <= 1:
        raise InvalidParameterError(f"{name} must be in (0, 1], got {name}={q!r}.")
    return value


def check_clip_norm(clip_norm, name: str = "clip_norm") -> float:
    value = _real(name, clip_norm)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={clip_norm!r}.")
    return value


def check_noise_multiplier(z, name: str = "noise_multiplier") -> float:
    value = _real(name, z)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={z!r}.")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {name}={value!r}.")
    return int(value)


def delta_warning(delta: float, dataset_size: int) -> str | None:
    """A warning when delta >= 1/n: such a delta allows releasing one image outright."""
    if delta >= 1.0 / dataset_size:
        return (
            f"delta={delta:g} is not below 1/n = {1.0 / dataset_size:.3g} (n={dataset_size}); "
            "a mechanism could then reveal a whole image with probability delta. Choose delta "
            "well below 1/n (e.g. 1/n^1.5)."
        )
    return None
