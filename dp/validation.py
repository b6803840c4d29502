"""Checks at the entry of every privacy-relevant function: fail loudly, never clamp.

Each check returns the value as a plain Python ``float``/``int`` so that callers never carry
numpy or torch scalars (or bools, which are ints in Python) into the accounting.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import InvalidParameterError

MIN_DECLARED_SIZE = 2
# The declared n_hat sets the run time: every release does the work of at least n_hat
# images (padded, so that the run time reveals nothing about the real count up to n_hat;
# docs/privacy.md §7). The paper's collections hold 20-1000 images, a studio's 1e4-1e5.
# CLIP ViT-L/14 costs 156 GFLOP per image (measured 5.7 s per image on a 2-core CPU, about
# 1 ms on a data-centre GPU by its FLOPs), so 1e5 padded images are about a week on a CPU
# and a few minutes on a GPU; DP textual inversion trains each of them. A larger n_hat is
# refused rather than started (docs/privacy.md §7).
MAX_DECLARED_SIZE = 100_000
# The largest epsilon (per release or total) a budget may state: at epsilon = 100 an
# observer's odds about any one image may already change by a factor e^100 ~ 2.7e43, and
# calibration refuses targets that z >= 0.05 meets anyway (epsilon ~ 280 at delta 1e-5).
MAX_EPSILON = 100.0


def _real(name: str, value: object) -> float:
    # bool is an int subclass: True would silently become 1.0.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidParameterError(
            f"{name} must be a real number, got {name}={value!r} ({type(value).__name__})."
        )
    result = float(value)
    if not math.isfinite(result):
        raise InvalidParameterError(f"{name} must be finite, got {name}={value!r}.")
    return result


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """A privacy epsilon: finite and > 0."""
    value = _real(name, epsilon)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={epsilon!r}.")
    return value


def check_budget_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """An epsilon a privacy budget may state: finite, > 0 and at most MAX_EPSILON."""
    value = check_epsilon(epsilon, name=name)
    if value > MAX_EPSILON:
        raise InvalidParameterError(
            f"{name} must be at most {MAX_EPSILON:g}, got {name}={epsilon!r}: at epsilon "
            f"{MAX_EPSILON:g} an observer's odds about any one image may already change by a "
            f"factor e^{MAX_EPSILON:g} (about 2.7e43), so a larger epsilon promises nothing. "
            "Choose an epsilon between 0.1 and 10."
        )
    return value


def check_declared_dataset_size(n_hat: int, name: str = "declared_dataset_size") -> int:
    """The declared, public dataset size n_hat: an integer in [MIN_DECLARED_SIZE,
    MAX_DECLARED_SIZE] (the work of every release is padded to n_hat images)."""
    value = check_positive_int(name, n_hat)
    if value < MIN_DECLARED_SIZE:
        raise InvalidParameterError(
            f"{name} must be at least {MIN_DECLARED_SIZE}, got {name}={value}: with one image "
            "the noise has to hide the only image and the result is pure noise."
        )
    if value > MAX_DECLARED_SIZE:
        raise InvalidParameterError(
            f"{name} must be at most {MAX_DECLARED_SIZE:,} images, got {name}={value:,}: every "
            "release does the work of at least n_hat images (padded, so that its run time "
            f"reveals nothing about the real count), so n_hat sets the run time, and "
            f"{MAX_DECLARED_SIZE:,} images are already about a week of CLIP vision on a CPU "
            "(minutes on a GPU) and far longer for per-image textual inversion. Declare a round "
            "figure near your collection's real size."
        )
    return value


def check_delta(delta: float, name: str = "delta") -> float:
    """A privacy delta: 0 < delta < 1 (and, per docs/privacy.md §1, well below 1/n)."""
    value = _real(name, delta)
    if not 0 < value < 1:
        raise InvalidParameterError(
            f"{name} must be strictly between 0 and 1 (and well below 1/n), got {name}={delta!r}."
        )
    return value


def check_sampling_rate(q: float, name: str = "sampling_rate") -> float:
    """A Poisson sampling rate q in (0, 1]; q = 1 keeps every image."""
    value = _real(name, q)
    if not 0 < value <= 1:
        raise InvalidParameterError(f"{name} must be in (0, 1], got {name}={q!r}.")
    return value


def check_clip_norm(clip_norm: float, name: str = "clip_norm") -> float:
    """A norm bound C: finite and > 0."""
    value = _real(name, clip_norm)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={clip_norm!r}.")
    return value


def check_noise_multiplier(z: float, name: str = "noise_multiplier") -> float:
    """A Gaussian noise multiplier z (noise std / sensitivity): finite and > 0."""
    value = _real(name, z)
    if value <= 0:
        raise InvalidParameterError(f"{name} must be > 0, got {name}={z!r}.")
    return value


def check_positive_int(name: str, value: int) -> int:
    """An integer >= 1 (bools and floats such as 3.0 are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {name}={value!r}.")
    return int(value)


def delta_warning(delta: float, dataset_size: int) -> str | None:
    """A warning when delta >= 1/n (docs/privacy.md §1), else None.

    A mechanism that publishes one randomly chosen record outright is (0, 1/n)-DP, so a
    delta of 1/n or more permits a total breach of some image (Dwork & Roth 2014, sec. 2.3).
    """
    delta = check_delta(delta)
    n = check_positive_int("dataset_size", dataset_size)
    if delta >= 1.0 / n:
        return (
            f"delta={delta:g} is not below 1/n = {1.0 / n:.3g} (n={n}): at such a delta a "
            "mechanism may reveal a whole image. Choose delta well below 1/n (e.g. n^-1.5 or "
            "smaller)."
        )
    return None
