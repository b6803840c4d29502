"""Planning figures for a privacy budget: noise against epsilon, and what the ledger allows next.

Everything here is computed from public values only: the declared size n_hat, the released
vector's dimension D, the sampling rate q, the (epsilon, delta) targets and the ledger's
record of the collection's releases (which releases happened is public, docs/privacy.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .accounting import bisect_log, calibrate_noise_multiplier, noise_comparison
from .errors import InvalidParameterError
from .ledger import Ledger, TotalBudget
from .validation import check_delta, check_epsilon, check_positive_int, check_sampling_rate

DEFAULT_EPSILONS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0)
"""epsilon values of the planning curve: a log-spaced grid over the range people use."""

NEXT_RELEASE_TOLERANCE = 0.01
"""Relative precision of the largest next epsilon (it errs on the small side)."""

SMALLEST_PLANNED_EPSILON = 0.01


@dataclass(frozen=True)
class CurvePoint:
    """Expected noise / signal bound at one epsilon: this pack's exact calibration, and the
    paper's (None where the paper's calibration cannot be applied, delta * n / m >= 1)."""

    epsilon: float
    relative_noise: float
    paper_relative_noise: float | None


def noise_curve(
    *,
    delta: float,
    dataset_size: int,
    dimension: int,
    sampling_rate: float,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    poll: Callable[[], None] | None = None,
) -> list[CurvePoint]:
    """z sqrt(D) / (q n_hat) against epsilon, next to the paper's sigma sqrt(D) / (m C)
    (``noise_comparison``; docs/privacy.md §2). Targets our calibration refuses (e.g. a
    needed z beyond its range) are left out of the curve."""
    check_positive_int("dataset_size", dataset_size)
    check_positive_int("dimension", dimension)
    check_sampling_rate(sampling_rate)
    points = []
    for epsilon in epsilons:
        try:
            comparison = noise_comparison(
                epsilon=epsilon,
                delta=delta,
                clip_norm=1.0,
                dataset_size=dataset_size,
                sampling_rate=sampling_rate,
                dimension=dimension,
                poll=poll,
            )
        except InvalidParameterError:
            try:
                z = calibrate_noise_multiplier(
                    epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, poll=poll
                ).noise_multiplier
            except InvalidParameterError:
                continue
            relative = z * math.sqrt(dimension) / (sampling_rate * dataset_size)
            points.append(CurvePoint(epsilon, relative, None))
            continue
        points.append(
            CurvePoint(epsilon, comparison.relative_noise, comparison.paper_relative_noise)
        )
    return points


@dataclass(frozen=True)
class LedgerBalance:
    """A collection's public balance: releases recorded, epsilon spent (PLD composition at the
    total's delta), the total in force (the pinned one, tightened by the requested one) and the
    largest per-release epsilon one more release at (delta, q) could be calibrated to."""

    collection: str
    releases: int
    spent: float
    total: TotalBudget
    next_release_epsilon: float | None

    @property
    def remaining(self) -> float:
        return max(0.0, self.total.epsilon - self.spent)


def ledger_balance(
    ledger: Ledger,
    collection: str,
    *,
    requested_total: TotalBudget,
    delta: float | None = None,
    sampling_rate: float | None = None,
    poll: Callable[[], None] | None = None,
) -> LedgerBalance:
    """The collection's balance; with ``delta`` and ``sampling_rate``, also the largest epsilon
    a next release could use (``largest_next_epsilon``)."""
    pinned = ledger.total(collection)
    total = pinned.tightened(requested_total) if pinned else requested_total
    releases = ledger.release_count(collection)
    spent = ledger.spent(collection, delta=total.delta) if releases else 0.0
    next_epsilon = None
    if delta is not None and sampling_rate is not None:
        next_epsilon = largest_next_epsilon(
            ledger, collection, total=total, delta=delta, sampling_rate=sampling_rate, poll=poll
        )
    return LedgerBalance(collection, releases, spent, total, next_epsilon)


def largest_next_epsilon(
    ledger: Ledger,
    collection: str,
    *,
    total: TotalBudget,
    delta: float,
    sampling_rate: float,
    poll: Callable[[], None] | None = None,
) -> float:
    """The largest per-release epsilon (at ``delta``, Poisson rate ``sampling_rate``) whose
    calibrated Gaussian release the ledger would still accept for ``collection``; 0.0 if
    none down to SMALLEST_PLANNED_EPSILON fits. Bisection in log-epsilon on the ledger's own
    check (its fully adaptive filter, ``Ledger.check``), so it is the figure the
    next release meets. At most the total epsilon: a single release larger than the total is
    refused by the budget itself."""
    delta = check_delta(delta)
    q = check_sampling_rate(sampling_rate)
    check_epsilon(total.epsilon, name="total epsilon")

    def fits(epsilon: float) -> bool:
        try:
            event = calibrate_noise_multiplier(
                epsilon=epsilon, delta=delta, sampling_rate=q, poll=poll
            ).event
        except InvalidParameterError:
            return False
        return ledger.check(collection=collection, event=event, total=total).ok

    high = total.epsilon
    if fits(high):
        return high
    low = min(SMALLEST_PLANNED_EPSILON, high / 2)
    if not fits(low):
        return 0.0
    # bisect_log returns x with fits(x) False and x / (1 + rel) <= the last epsilon that
    # fitted, so x / (1 + rel) fits too (smaller epsilons need more noise and spend less).
    boundary = bisect_log(fits, low, high, NEXT_RELEASE_TOLERANCE)
    return boundary / (1 + NEXT_RELEASE_TOLERANCE)
