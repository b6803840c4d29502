"""Planning figures for a privacy budget: noise against epsilon, and what the ledger allows next.

Everything here is computed from public values only: the declared size n_hat, the released
vector's dimension D, the sampling rate q, the (epsilon, delta) targets and the ledger's
record of the collection's releases (which releases happened is public, docs/privacy.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from .accounting import (
    Calibration,
    calibrate_dpsgd_noise_multiplier,
    calibrate_noise_multiplier,
    noise_comparison,
)
from .errors import InvalidParameterError
from .ledger import BudgetCheck, Ledger, TotalBudget
from .validation import check_delta, check_epsilon, check_positive_int, check_sampling_rate

DEFAULT_EPSILONS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0)
"""epsilon values of the planning curve: a log-spaced grid over the range people use."""

NEXT_RELEASE_DIGITS = 4
"""Significant digits of the largest next epsilon: it is shown exactly, rounded down."""

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
class PlannedRelease:
    """The next release as planned (public settings): its per-release ``delta``, Poisson
    ``sampling_rate`` q and, for DP-SGD, its number of ``steps`` T (None: one M1 release)."""

    delta: float
    sampling_rate: float = 1.0
    steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", check_delta(self.delta))
        object.__setattr__(self, "sampling_rate", check_sampling_rate(self.sampling_rate))
        if self.steps is not None:
            object.__setattr__(self, "steps", check_positive_int("steps", self.steps))

    def calibrate(self, epsilon: float, poll: Callable[[], None] | None = None) -> Calibration:
        """The noise such a release would be calibrated to at ``epsilon`` (as the nodes do)."""
        if self.steps is None:
            return calibrate_noise_multiplier(
                epsilon=epsilon, delta=self.delta, sampling_rate=self.sampling_rate, poll=poll
            )
        return calibrate_dpsgd_noise_multiplier(
            epsilon=epsilon,
            delta=self.delta,
            sampling_rate=self.sampling_rate,
            steps=self.steps,
            poll=poll,
        )


@dataclass(frozen=True)
class NextRelease:
    """What the ledger allows the planned release (``Ledger.check``, the collection's fully
    adaptive filter).

    ``epsilon``: the largest per-release epsilon, on a grid of NEXT_RELEASE_DIGITS
    significant digits, whose calibrated release the ledger admits (it was checked); 0.0
    when none down to SMALLEST_PLANNED_EPSILON is. At most the total epsilon. ``filter_kind``:
    the collection's filter (``GAUSSIAN_FILTER`` or ``RENYI_FILTER``), for an empty
    collection the one this release would pin. ``refused_kind``: the collection's filter
    refuses releases of this kind at any epsilon (a Gaussian history and q < 1).
    """

    planned: PlannedRelease
    epsilon: float
    filter_kind: str | None
    refused_kind: bool = False


@dataclass(frozen=True)
class LedgerBalance:
    """A collection's public balance: releases recorded, epsilon spent (PLD composition at the
    total's delta: the non-adaptive estimate, shown, never subtracted from the total), the
    total in force (the pinned one, tightened by the requested one) and what the ledger allows
    the planned next releases (``NextRelease``)."""

    collection: str
    releases: int
    spent: float
    total: TotalBudget
    next_releases: tuple[NextRelease, ...] = ()

    @property
    def next_release_epsilon(self) -> float | None:
        """The largest epsilon of the first planned release, None when none was planned."""
        return self.next_releases[0].epsilon if self.next_releases else None


def ledger_balance(
    ledger: Ledger,
    collection: str,
    *,
    requested_total: TotalBudget,
    planned: Sequence[PlannedRelease] = (),
    poll: Callable[[], None] | None = None,
) -> LedgerBalance:
    """The collection's balance and, for each ``planned`` release, what the ledger allows
    it (``next_release``)."""
    pinned = ledger.total(collection)
    total = pinned.tightened(requested_total) if pinned else requested_total
    releases = ledger.release_count(collection)
    spent = ledger.spent(collection, delta=total.delta) if releases else 0.0
    allowed = tuple(
        next_release(ledger, collection, total=total, planned=plan, poll=poll) for plan in planned
    )
    return LedgerBalance(collection, releases, spent, total, allowed)


def largest_next_epsilon(
    ledger: Ledger,
    collection: str,
    *,
    total: TotalBudget,
    delta: float,
    sampling_rate: float,
    poll: Callable[[], None] | None = None,
) -> float:
    """``next_release(...).epsilon`` for one M1 release at (``delta``, ``sampling_rate``)."""
    planned = PlannedRelease(delta=delta, sampling_rate=sampling_rate)
    return next_release(ledger, collection, total=total, planned=planned, poll=poll).epsilon


def next_release(
    ledger: Ledger,
    collection: str,
    *,
    total: TotalBudget,
    planned: PlannedRelease,
    poll: Callable[[], None] | None = None,
) -> NextRelease:
    """The largest per-release epsilon whose calibrated ``planned`` release the ledger admits.

    Every candidate is decided by the ledger's own check (``Ledger.check``: the collection's
    Gaussian-DP or Renyi filter), never by subtracting spent epsilon from the total (PLD
    composition allows more than a subtraction, and the adaptive filters less than PLD).
    Bisection over decimal epsilons of NEXT_RELEASE_DIGITS significant digits: the answer is
    a checked, admitted value, and the next grid value up (at most 0.1 % more) was refused,
    so the answer times 1.01 is refused too (calibration is monotone beyond its 0.2 % band).
    """
    check_epsilon(total.epsilon, name="total epsilon")
    if not isinstance(planned, PlannedRelease):
        raise InvalidParameterError(f"planned must be a PlannedRelease, got planned={planned!r}.")

    def check(epsilon: float) -> BudgetCheck | None:
        try:
            event = planned.calibrate(epsilon, poll).event
        except InvalidParameterError:  # a target calibration refuses is not allowed either
            return None
        return ledger.check(collection=collection, event=event, total=total)

    high = total.epsilon
    at_total = check(high)
    decision = at_total.decision if at_total is not None else None
    kind = decision.filter.kind if decision is not None else None
    if decision is not None and decision.mixed:
        return NextRelease(planned, 0.0, kind, refused_kind=True)
    if at_total is not None and at_total.ok:
        return NextRelease(planned, high, kind)
    low = _grid_floor(min(SMALLEST_PLANNED_EPSILON, high / 2))
    at_low = check(low)
    if at_low is None or not at_low.ok:
        return NextRelease(planned, 0.0, kind)
    # Invariant: low was admitted, high refused (both checked). The filter's own figures
    # (value / budget, which crosses 1 where the decision flips) guide the next candidate by
    # interpolation in log-log; each interpolated candidate is followed by its grid neighbour
    # on the far side, which ends the search as soon as the boundary is bracketed.
    slope = (_log_ratio(at_low), _log_ratio(at_total))
    probe_neighbour = moved_low = False
    while True:
        if probe_neighbour:
            middle = _grid_next(low) if moved_low else _grid_previous(high)
            middle = middle if low < middle < high else None
        else:
            middle = _grid_guess(low, high, *slope)
        if middle is None:
            return NextRelease(planned, low, kind)
        verdict = check(middle)
        moved_low = verdict is not None and verdict.ok
        figure = _log_ratio(verdict) if verdict is not None else math.inf
        if moved_low:
            low, slope = middle, (figure, slope[1])
        else:
            high, slope = middle, (slope[0], figure)
        probe_neighbour = not probe_neighbour


def _log_ratio(verdict: BudgetCheck) -> float:
    """log(value / budget) of the filter's decision (<= 0 where it admits); inf if unknown."""
    decision = verdict.decision
    if decision is None or not (0 < decision.value < math.inf and decision.budget > 0):
        return math.inf
    return math.log(decision.value / decision.budget)


def _grid_guess(low: float, high: float, at_low: float, at_high: float) -> float | None:
    """A grid value strictly inside (low, high): where log-ratio interpolates to 0 in log
    epsilon, kept away from the ends (else the geometric mean); None when there is none."""
    a, b = math.log(low), math.log(high)
    guess = (a + b) / 2
    if math.isfinite(at_low) and math.isfinite(at_high) and at_high > at_low:
        root = a + (b - a) * (-at_low) / (at_high - at_low)
        guess = min(max(root, a + (b - a) * 0.02), b - (b - a) * 0.02)
    middle = _grid_floor(math.exp(guess))
    if middle <= low:
        middle = _grid_next(low)
    return middle if middle < high else None


def _grid_step(value: float) -> Decimal:
    return Decimal(1).scaleb(math.floor(math.log10(value)) - NEXT_RELEASE_DIGITS + 1)


def _grid_next(value: float) -> float:
    """The grid value just above ``value`` (on the grid)."""
    return float(Decimal(repr(value)) + _grid_step(value))


def _grid_previous(value: float) -> float:
    """The grid value just below ``value`` (on the grid; one digit finer below a power of 10)."""
    return _grid_floor(float(Decimal(repr(value)) - _grid_step(value) / 10))


def _grid_floor(value: float) -> float:
    """``value`` rounded down to NEXT_RELEASE_DIGITS significant decimal digits."""
    exponent = math.floor(math.log10(value)) - NEXT_RELEASE_DIGITS + 1
    exact = Decimal(repr(value))  # the shortest decimal of the float: grid values stay put
    return float(exact.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_FLOOR))
