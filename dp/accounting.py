"""Privacy accounting on dp_accounting (docs/privacy.md §2.6).

Adjacency: add/remove one image. Accountant: privacy loss distributions (PLD), the tightest
of dp_accounting's accountants for these events (Koskela, Jaelkoe, Honkela 2020; Doroshenko,
Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect the dots").

PLD discretisation. dp_accounting builds *pessimistic* PLDs (``pessimistic_estimate=True``,
its default): the discretised distribution dominates the true one, so the epsilon it reports
is an upper bound on the true epsilon at any ``value_discretization_interval``; a coarser
interval only overstates epsilon (costing noise, never privacy). Measured on this project's
events the overstatement is at most about one interval, in absolute epsilon, while the cost
is linear in the number of grid points (dp_accounting builds each point in Python, and reads
epsilon off the grid in a Python loop), so the interval is chosen relative to the answer:
- one release (a Gaussian, or a Poisson-subsampled Gaussian): the exact epsilon is computed
  first from the closed-form hockey-stick divergence (see ``_exact_epsilon``), and ONE PLD
  pass is made at ``PLD_RELATIVE_INTERVAL * epsilon``;
- a composition: one pass at ``PLD_COARSE_INTERVAL`` gives eps0, the next pass uses
  ``PLD_RELATIVE_INTERVAL * eps0``, and passes repeat (at most ``PLD_MAX_PASSES``) while
  the interval would shrink by more than 2x.
Either way the interval never drops below what keeps the grid within ``PLD_MAX_BINS``
points to build and ``PLD_MAX_COMPOSED_BINS`` after composition, so every call takes
bounded time (well under a second per pass on two cores). The reported epsilon is thus an
upper bound that exceeds the true one by about 0.1 % (at most ~0.2 %) for every useful
target. Only where epsilon is tiny next to the range of the privacy loss (a delta close to
its largest meaningful value) does the grid bound bind; the result is still an upper bound,
just a looser one. Events with (next to) no noise are reported with epsilon = inf (see
PLD_MIN_NOISE_MULTIPLIER).

Calibration (``calibrate_noise_multiplier``) answers or refuses within
CALIBRATION_TIME_LIMIT_S: the exact divergence of the release (closed form) gives the
smallest possible noise z* in milliseconds, so targets needing z > Z_MAX are refused at
once and the PLD search starts next to its answer (typically 3-6 passes).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import dp_accounting as dpa
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.pld import privacy_loss_mechanism

from .errors import InvalidParameterError, LedgerFormatError
from .validation import (
    check_clip_norm,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive_int,
    check_sampling_rate,
)

logger = logging.getLogger(__name__)

PLD_COARSE_INTERVAL = 5e-2
PLD_RELATIVE_INTERVAL = 1e-3
# A guard against denormal grids only: the grid budgets below bound the cost.
PLD_MIN_INTERVAL = 1e-12
# Grid budgets. Building one point of a Gaussian PLD costs ~3 us here, one point of a
# Poisson-subsampled Gaussian ~10 us per direction (add and remove are both built), so
# PLD_MAX_BINS (in Gaussian-point units) is ~0.3 s of construction; composition works on
# numpy arrays (FFT) and reading epsilon off the result is a Python loop over its points.
PLD_MAX_BINS = 100_000
PLD_MAX_COMPOSED_BINS = 1_000_000
_SUBSAMPLED_BIN_COST = 6  # ~ 2 directions x 3 times the Gaussian cost per point
PLD_MAX_PASSES = 4
# Below this noise multiplier (after folding k Gaussian compositions into z / sqrt(k)) the
# privacy loss reaches ~1/(2 z^2) > 5e5 and the PLD loses floating-point meaning; likewise
# when the grid budgets would need an interval above PLD_MAX_INTERVAL (a composition whose
# privacy loss ranges over more than ~1e7; dp_accounting also overflows exp(interval)
# beyond ~700). Such an event gives no privacy at any useful delta, and its epsilon is
# reported as infinite (a valid, if uninformative, upper bound).
PLD_MIN_NOISE_MULTIPLIER = 1e-3
PLD_MAX_INTERVAL = 10.0
# Calibration stops once epsilon(z) lies in [(1 - CALIBRATION_BAND) * target, target], or
# once the bracket on z is narrower than CALIBRATION_Z_TOLERANCE (relative), which only
# happens for targets the PLD grid cannot resolve (an epsilon near 0 at a large delta).
CALIBRATION_BAND = 2e-3
CALIBRATION_Z_TOLERANCE = 5e-4
# A calibration that has not finished after this many seconds is refused (it never runs on).
CALIBRATION_TIME_LIMIT_S = 10.0
CALIBRATION_MAX_PASSES = 40
# dp_accounting's PLD computes divergences in double precision: below delta ~ 1e-15 its
# epsilon is infinite for every noise multiplier, so calibration refuses such a delta.
CALIBRATION_MIN_DELTA = 1e-14
# Calibrated noise multipliers must lie in this range. Z_MIN = 0.05 is one release at
# epsilon ~ 280 (delta 1e-5, q = 1), far beyond any meaningful guarantee; below it the PLD
# grid grows quickly. Z_MAX = 1e6 is epsilon ~ 5e-6.
Z_MIN, Z_MAX = 5e-2, 1e6


def release_event(*, noise_multiplier: float, sampling_rate: float) -> dpa.DpEvent:
    """The DpEvent of one M1 release (docs/privacy.md §2.6).

    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, or ``GaussianDpEvent(z)`` when q = 1.
    """
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    gaussian = dpa.GaussianDpEvent(z)
    if q == 1:
        return gaussian
    return dpa.PoissonSampledDpEvent(sampling_probability=q, event=gaussian)


# --- exact hockey-stick divergence of one release -----------------------------------------

# dp_accounting truncates the Gaussian noise where its log tail mass is -50 (its default
# ``log_mass_truncation_bound``); the PLD's losses then lie within t/z + 1/(2 z^2) of
# log(1 - q) (see ``_Leaf.loss_span``), with t the matching normal quantile.
_TAIL_QUANTILE = 9.745474864965935  # -Phi^{-1}(0.5 * exp(-50))


def _remove_delta(noise_multiplier: float, q: float, epsilon: float) -> float:
    """The exact epsilon-hockey-stick divergence of the Poisson-subsampled Gaussian, remove.

    delta(eps) = P[X <= x_eps] - e^eps Q[X <= x_eps] in closed form (normal CDFs), with
    P = (1 - q) N(0, z^2) + q N(-1, z^2), Q = N(0, z^2) (dp_accounting's
    GaussianPrivacyLoss, REMOVE adjacency; Balle & Wang 2018, Thm 8, for q = 1). For every
    eps >= 0 it is at least the add direction's divergence (as dp_accounting's
    GaussianPrivacyLoss.from_privacy_guarantee notes), so it is the divergence of the
    mechanism; calibration relies only on it being a LOWER bound on that divergence.
    """
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(
        noise_multiplier,
        sampling_prob=q,
        adjacency_type=privacy_loss_mechanism.AdjacencyType.REMOVE,
    )
    return float(loss.get_delta_for_epsilon(epsilon))


def bisect_log(too_small: Callable[[float], bool], lo: float, hi: float, rel: float) -> float:
    """The smallest x in [lo, hi] (to relative precision ``rel``) with too_small(x) False.

    ``too_small`` must be monotone (True below some point, False above) and False at hi;
    returns an x with too_small(x) False.
    """
    while hi / lo - 1 > rel:
        mid = math.sqrt(lo * hi)
        if too_small(mid):
            lo = mid
        else:
            hi = mid
    return hi


def _exact_epsilon(noise_multiplier: float, q: float, delta: float) -> float:
    """epsilon of one release at ``delta`` from the closed form, to ~0.1 % (a grid guide).

    q = 1: the analytic Gaussian mechanism (Balle & Wang 2018, Thm 8). q < 1: the remove
    divergence of ``_remove_delta``, inverted by bisection; it lies below the q = 1 value
    (amplification by subsampling never hurts).
    """
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf there is the right limit
        upper = float(dpa.get_epsilon_gaussian(noise_multiplier, delta))
    if q == 1 or upper <= 0:
        return max(upper, 0.0)
    if _remove_delta(noise_multiplier, q, 0.0) <= delta:
        return 0.0
    for _ in range(64):  # only rounding in get_epsilon_gaussian can make upper too small
        if not _remove_delta(noise_multiplier, q, upper) > delta:
            break
        upper *= 2
    lower = upper * 1e-12
    if _remove_delta(noise_multiplier, q, lower) <= delta:
        return lower
    return bisect_log(
        lambda eps: _remove_delta(noise_multiplier, q, eps) > delta, lower, upper, 1e-3
    )


# --- epsilon ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    """A Gaussian (q = 1) or Poisson-subsampled Gaussian, composed ``count`` times.

    ``count`` Gaussians with multiplier z are one Gaussian with z / sqrt(count) (dp_accounting
    composes them so too), so Gaussian leaves always have count 1.
    """

    noise_multiplier: float
    q: float
    count: int

    def loss_span(self) -> float:
        """Width of the privacy-loss range of one copy in dp_accounting's PLD (both sides).

        The remove loss log(1 - q + q exp((-1/2 - x)/z^2)) is decreasing in x and x runs
        over [-t z - 1, t z] (``_TAIL_QUANTILE``), so it spans
        log(1 - q + q e^a) - log(1 - q + q e^-a) with a = t/z + 1/(2 z^2); the add loss
        spans the same width.
        """
        z, q = self.noise_multiplier, self.q
        a = _TAIL_QUANTILE / z + 0.5 / (z * z)
        if q == 1:
            return 2 * a
        log_rest = math.log1p(-q)
        high = max(log_rest, math.log(q) + a) + math.log1p(
            math.exp(-abs(log_rest - math.log(q) - a))
        )
        return high - math.log1p(q * math.expm1(-a))

    def build_cost(self) -> float:
        return self.loss_span() * (1 if self.q == 1 else _SUBSAMPLED_BIN_COST)

    def event(self) -> dpa.DpEvent:
        """The event dp_accounting composes ``count`` times for this leaf.

        dp_accounting fails on a subnormal sampling probability; it is raised to
        _MIN_SAMPLING_PROBABILITY, which can only overstate epsilon (a smaller q is a
        further subsampling, which never costs privacy; Balle, Barthe, Gaboardi 2018).
        """
        gaussian = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.q == 1:
            return gaussian
        return dpa.PoissonSampledDpEvent(sampling_probability=self.accounted_q, event=gaussian)

    @property
    def accounted_q(self) -> float:
        return max(self.q, _MIN_SAMPLING_PROBABILITY)


_MIN_SAMPLING_PROBABILITY = 1e-300


class _NonPrivate(Exception):
    """An event without noise (z = 0): epsilon is infinite."""


def _leaves(event: object, count: int, out: list[_Leaf]) -> None:
    """Flatten ``event`` composed ``count`` times into leaves, as dp_accounting composes it."""
    if isinstance(event, dpa.NoOpDpEvent):
        return
    if isinstance(event, dpa.GaussianDpEvent):
        z = float(event.noise_multiplier)
        if z == 0:
            raise _NonPrivate
        out.append(_Leaf(z / math.sqrt(count), 1.0, 1))
        return
    if isinstance(event, dpa.PoissonSampledDpEvent) and isinstance(
        event.event, dpa.GaussianDpEvent
    ):
        q, z = float(event.sampling_probability), float(event.event.noise_multiplier)
        if q == 0:
            return
        if z == 0:
            raise _NonPrivate
        if q == 1:  # keeps every image: the plain Gaussian
            out.append(_Leaf(z / math.sqrt(count), 1.0, 1))
            return
        # Chunks of at most _MAX_COUNT: dp_accounting self-composes a small (sparse) PLD
        # by computing size**count exactly, which takes seconds beyond count ~ 1e6.
        while count > 0:
            out.append(_Leaf(z, q, min(count, _MAX_COUNT)))
            count -= _MAX_COUNT
        return
    if isinstance(event, dpa.SelfComposedDpEvent) and event.count >= 1:
        _leaves(event.event, count * int(event.count), out)
        return
    if isinstance(event, dpa.ComposedDpEvent):
        for inner in event.events:
            _leaves(inner, count, out)
        return
    if not isinstance(event, dpa.DpEvent):
        raise InvalidParameterError(
            f"expected a dp_accounting DpEvent, got {event!r:.200} ({type(event).__name__})."
        )
    raise InvalidParameterError(
        f"the PLD accountant (add/remove adjacency) cannot account for {event!r:.200}; "
        "supported here: Gaussian, Poisson-sampled Gaussian and their compositions."
    )


def _grouped(events: Sequence[dpa.DpEvent]) -> list[tuple[dpa.DpEvent, int]]:
    """Equal events merged with a count, in a fixed order.

    Composition is commutative, and ``compose(event, count)`` lets dp_accounting use
    self-composition (exact for Gaussians, one FFT power otherwise) instead of k
    convolutions. Sorting by repr makes the result independent of the input order, so the
    same multiset of events always gives bit-identical epsilons (the ledger relies on it).
    """
    groups: list[list] = []
    for event in events:
        for group in groups:
            if group[0] == event:
                group[1] += 1
                break
        else:
            groups.append([event, 1])
    groups.sort(key=lambda group: repr(group[0]))
    return [(event, count) for event, count in groups]


def _pld_pass(leaves: list[_Leaf], delta: float, interval: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=interval)
    for leaf in leaves:
        accountant.compose(leaf.event(), leaf.count)
    return float(accountant.get_epsilon(delta))


def _grid_floor(leaves: list[_Leaf]) -> float:
    """The smallest interval that keeps the PLD grids within the budgets (module docstring).

    Composing supports adds their widths, so ``count`` copies of a leaf span at most
    ``count`` times its width; with several leaves, each of the (len(leaves) - 1) FFT
    compositions works on an array up to the final size.
    """
    build = sum(leaf.build_cost() for leaf in leaves) / PLD_MAX_BINS
    composed_width = sum(leaf.count * leaf.loss_span() for leaf in leaves)
    composed = composed_width * max(1, len(leaves) - 1) / PLD_MAX_COMPOSED_BINS
    return max(build, composed, PLD_MIN_INTERVAL)


def _pld_epsilon(
    groups: list[tuple[dpa.DpEvent, int]],
    delta: float,
    poll: Callable[[], None] | None = None,
) -> float:
    leaves: list[_Leaf] = []
    try:
        for event, count in groups:
            _leaves(event, count, leaves)
    except _NonPrivate:
        return math.inf
    if not leaves:
        return 0.0
    if min(leaf.noise_multiplier for leaf in leaves) < PLD_MIN_NOISE_MULTIPLIER:
        return math.inf
    floor = _grid_floor(leaves)
    if floor > PLD_MAX_INTERVAL:
        return math.inf
    if len(leaves) == 1 and leaves[0].count == 1:
        leaf = leaves[0]
        guide = _exact_epsilon(leaf.noise_multiplier, leaf.accounted_q, delta)
        if poll is not None:
            poll()
        interval = min(max(floor, PLD_RELATIVE_INTERVAL * guide), PLD_MAX_INTERVAL)
        return _pld_pass(leaves, delta, interval)
    interval = max(floor, PLD_COARSE_INTERVAL)
    if poll is not None:
        poll()
    epsilon = _pld_pass(leaves, delta, interval)
    # epsilon == 0 from a pessimistic PLD is exact (the true epsilon is 0 too).
    for _ in range(PLD_MAX_PASSES - 1):
        if not (math.isfinite(epsilon) and epsilon > 0):
            break
        finer = min(max(floor, PLD_RELATIVE_INTERVAL * epsilon), PLD_MAX_INTERVAL)
        if finer > interval / 2:
            break
        interval = finer
        if poll is not None:
            poll()
        epsilon = _pld_pass(leaves, delta, interval)
    return epsilon


def epsilon_for(event: dpa.DpEvent, *, delta: float) -> float:
    """epsilon of ``event`` at ``delta`` from the PLD accountant (add/remove adjacency).

    An upper bound on the true epsilon, about 0.1 % (at most ~0.2 %) above it for useful
    targets (module docstring); ``math.inf`` for an event without noise. Bounded time for
    any event ``event_from_dict`` accepts.
    """
    return _pld_epsilon([(event, 1)], check_delta(delta))


def compose_epsilon(events: Iterable[dpa.DpEvent], *, delta: float) -> float:
    """epsilon of the composition of ``events`` at ``delta`` (PLD); 0.0 for no events.

    PLD composition is the tight composition of the privacy loss distributions (Koskela et
    al. 2020), much smaller than the sum of the separate epsilons.
    """
    delta = check_delta(delta)
    return _pld_epsilon(_grouped(list(events)), delta)


def epsilon_rdp(event: dpa.DpEvent, *, delta: float) -> float:
    """epsilon from the RDP accountant (add/remove), for cross-checks; never below PLD's.

    RDP's conversion to (epsilon, delta) (Balle et al. 2020, Thm 21 / Canonne, Kamath,
    Steinke 2020) is looser than the PLD, so this is an independent, larger upper bound.
    """
    accountant = rdp.RdpAccountant()
    if not accountant.supports(event):
        raise InvalidParameterError(f"the RDP accountant cannot account for {event!r}.")
    return float(accountant.compose(event).get_epsilon(check_delta(delta)))


# --- fully adaptive filters (docs/privacy.md §7) ------------------------------------------

# Calibration and the ledger's filters decide "at most the target" in double precision.
# dp_accounting evaluates the divergences with a relative rounding error of order 1e-14
# (measured: the PLD accepted a z whose exact delta at (epsilon, delta) = (10, 1e-3), q = 1,
# exceeds 1e-3 by a relative 2.3e-14, checked at 40 digits), so every such decision is taken
# at delta * (1 - SAFETY_MARGIN) instead of delta. 1e-9 is five orders of magnitude above
# that rounding and costs a relative ~1e-10 of noise, far below anything measurable.
SAFETY_MARGIN = 1e-9


def safe_delta(delta: float) -> float:
    """``delta`` less the SAFETY_MARGIN: the delta that "never above the target" checks use."""
    return delta * (1.0 - SAFETY_MARGIN)


def gaussian_precision(event: dpa.DpEvent) -> float | None:
    """sum_i 1/z_i^2 over the Gaussian mechanisms of ``event`` when none is subsampled, else None.

    A composition of Gaussian mechanisms (sensitivity 1, noise multipliers z_i) is exactly a
    Gaussian mechanism with 1/z^2 = sum_i 1/z_i^2, i.e. mu-GDP with mu^2 = sum_i 1/z_i^2
    (Dong, Roth & Su 2022, Cor. 3.3). A Poisson-sampled event with q = 1 keeps every image
    and counts as Gaussian (so does DP-SGD with q = 1); q = 0 releases nothing about the
    images and adds 0. Any other subsampling makes the event non-Gaussian (None). An event
    without noise has precision ``math.inf``.
    """
    leaves: list[_Leaf] = []
    try:
        _leaves(event, 1, leaves)
    except _NonPrivate:
        return math.inf
    if any(leaf.q != 1 for leaf in leaves):
        return None
    return math.fsum(1.0 / leaf.noise_multiplier**2 for leaf in leaves)


def gdp_admits(precision: float, *, epsilon: float, delta: float) -> bool:
    """Whether mu-GDP with mu^2 = ``precision`` is (epsilon, delta)-DP, exactly.

    mu-GDP is the Gaussian mechanism with noise multiplier 1/mu (Dong, Roth & Su 2022,
    Cor. 2.13), whose exact delta at epsilon is the analytic Gaussian one (Balle & Wang 2018,
    Thm 8). Compared with delta * (1 - SAFETY_MARGIN / 2): a release calibrated at
    ``safe_delta(delta)`` (the full margin) is always admitted, and an admitted one is below
    delta also after rounding.
    """
    if precision == 0:
        return True
    if not math.isfinite(precision):
        return False
    z = 1.0 / math.sqrt(precision)
    return _remove_delta(z, 1.0, epsilon) <= delta * (1.0 - SAFETY_MARGIN / 2)


def gdp_mu_limit(*, epsilon: float, delta: float) -> float:
    """The largest mu (to ~1e-12) with mu-GDP within (epsilon, delta): for messages only."""
    with np.errstate(divide="ignore"):
        return 1.0 / float(dpa.get_sigma_gaussian(epsilon, delta * (1.0 - SAFETY_MARGIN / 2)))


RDP_FILTER_ORDERS: tuple[int, ...] = tuple(
    int(order)
    for order in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    if float(order).is_integer() and order >= 2
)
"""Orders the Renyi filter may pin: the integer orders among dp_accounting's defaults. At an
integer order the RDP of a Poisson-subsampled Gaussian is a finite binomial sum (Mironov,
Talwar & Zhang 2019, Sec. 3.3), exact up to rounding; fractional orders use a truncated
series."""


def rdp_budget(order: int, *, epsilon: float, delta: float) -> float:
    """B(alpha): the largest RDP at ``order`` that converts to (epsilon, delta)-DP.

    dp_accounting's RdpAccountant converts RDP r at order a > 1 to
    epsilon = r + log(1 - 1/a) - log(delta * a) / (a - 1) (Canonne, Kamath & Steinke 2020,
    Prop. 12; Balle et al. 2020, Thm 21; its ``compute_epsilon``), so
    B = epsilon - log(1 - 1/a) + log(delta * a) / (a - 1), at ``safe_delta(delta)``. It may be
    <= 0 (no RDP fits at that order).
    """
    a = float(order)
    return epsilon - math.log1p(-1.0 / a) + math.log(safe_delta(delta) * a) / (a - 1.0)


def event_rdp(event: dpa.DpEvent, orders: Sequence[int]) -> tuple[float, ...]:
    """The RDP of ``event`` at each of ``orders`` (add/remove), from dp_accounting's accountant.

    RdpAccountant keeps the composed RDP per order in ``_rdp`` (dp-accounting 0.6.0, pinned;
    tests/dp/test_accounting.py checks it against a/(2 z^2) for a Gaussian).
    """
    accountant = rdp.RdpAccountant(orders=[float(order) for order in orders])
    if not accountant.supports(event):
        raise InvalidParameterError(f"the RDP accountant cannot account for {event!r:.200}.")
    accountant.compose(event)
    values = getattr(accountant, "_rdp", None)
    if values is None or len(values) != len(orders):
        raise InvalidParameterError(
            "dp_accounting's RdpAccountant no longer exposes its per-order RDP (_rdp); this "
            "pack needs dp-accounting==0.6.0."
        )
    return tuple(float(value) for value in values)


def filter_order(first_event: dpa.DpEvent, *, epsilon: float, delta: float) -> int:
    """alpha*: the order a Renyi filter is pinned to, from the history's first event alone.

    The order among RDP_FILTER_ORDERS minimising RDP_first(alpha) / B(alpha) over the orders
    with B(alpha) > 0 (the first release then takes the smallest share of the filter's
    budget); the order with the largest B when none is positive (every later release is then
    refused, which is sound). A function of the public first event and total only, so it is
    fixed before any output of the history exists. One order, not several: a filter checked
    at several orders at once must keep every one of them within its budget.
    """
    values = event_rdp(first_event, RDP_FILTER_ORDERS)
    budgets = [rdp_budget(a, epsilon=epsilon, delta=delta) for a in RDP_FILTER_ORDERS]
    best, best_ratio = None, math.inf
    for order, value, budget in zip(RDP_FILTER_ORDERS, values, budgets, strict=True):
        if budget > 0 and (best is None or value / budget < best_ratio):
            best, best_ratio = order, value / budget
    if best is None:
        best = RDP_FILTER_ORDERS[max(range(len(budgets)), key=budgets.__getitem__)]
    return best


# --- calibration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The noise multiplier for a target (epsilon, delta) at sampling rate q.

    ``epsilon_achieved`` = ``epsilon_for(event, delta=delta)``; it is never above
    ``epsilon_target`` and lies within CALIBRATION_BAND (0.2 %) of it, unless z is the exact
    minimum z* (then no smaller z can do) or the target is one the PLD grid cannot resolve
    (an epsilon near 0 at a large delta; a warning is logged and z is within
    CALIBRATION_Z_TOLERANCE of the smallest z the accountant accepts).
    """

    noise_multiplier: float
    epsilon_target: float
    epsilon_achieved: float
    delta: float
    sampling_rate: float
    event: dpa.DpEvent


_CACHE_SIZE = 256
_cache: OrderedDict[tuple, Calibration] = OrderedDict()
_cache_lock = threading.Lock()


def calibrate_noise_multiplier(
    *,
    epsilon: float,
    delta: float,
    sampling_rate: float,
    poll: Callable[[], None] | None = None,
) -> Calibration:
    """The (near-)smallest z with epsilon(z) <= target, for one M1 release (docs/privacy.md §2.6).

    epsilon(z) is ``epsilon_for(release_event(z, q), delta)``. The exact hockey-stick
    divergence first gives z* (``_exact_noise``), below which no z can meet the target.
    Meaningless targets are refused with the reason before any PLD work (delta >= q, a
    delta below what the PLD resolves, a target that needs z > Z_MAX), or after one PLD
    pass at Z_MIN (a target met even there promises nothing). The search then keeps a bracket
    epsilon(lo) > target >= epsilon(hi), starting at z*, and returns ``hi``, a z whose
    epsilon was computed and found <= target (the re-check of docs/privacy.md §2.6 is the loop
    invariant, and it is verified once more at the end). It stops when epsilon(hi) is within
    CALIBRATION_BAND (0.2 %) of the target.

    ``poll``, if given, is called before every PLD pass (each well under a second); an
    exception it raises (e.g. a user's cancel) propagates. A calibration still running after
    CALIBRATION_TIME_LIMIT_S seconds is refused with InvalidParameterError. Successful
    results are cached per (epsilon, delta, q); refusals and interruptions are not.
    """
    key = (check_epsilon(epsilon), check_delta(delta), check_sampling_rate(sampling_rate))
    if poll is not None and not callable(poll):
        raise InvalidParameterError(f"poll must be callable or None, got poll={poll!r}.")
    return _cached(key, lambda: _calibrate(*key, poll=poll))


def _cached(key: tuple, compute: Callable[[], Calibration]) -> Calibration:
    """``compute()``, cached under ``key`` (LRU, _CACHE_SIZE entries); failures are not cached."""
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    result = compute()
    with _cache_lock:
        _cache[key] = result
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def _initial_guess(epsilon: float, delta: float, q: float) -> float:
    """An upper bound on z*: exact Gaussian calibration (Balle & Wang 2018) with no sampling.

    An (epsilon, delta)-DP Gaussian stays (epsilon, delta)-DP after Poisson subsampling
    (amplification never hurts; Balle, Barthe, Gaboardi 2018, Thm 8), so the q = 1 noise
    always suffices; for q = 1 it is z* itself.
    """
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at huge z is the right limit
        return float(dpa.get_sigma_gaussian(epsilon, delta))


def _exact_noise(epsilon: float, delta: float, q: float) -> float:
    """z* = the smallest z whose exact (epsilon, delta) divergence is <= delta, to ~1e-9.

    No z < z* meets the target under any correct accountant (the pessimistic PLD included),
    so z* starts the PLD search. Returns ``math.inf`` when z* > Z_MAX and a value <= Z_MIN
    when z* <= Z_MIN. Closed-form divergences only: milliseconds.
    """
    upper = _initial_guess(epsilon, delta, q)
    if q == 1 or upper <= Z_MIN:
        return upper if upper <= Z_MAX else math.inf
    if upper > Z_MAX:
        if _remove_delta(Z_MAX, q, epsilon) > delta:
            return math.inf
        upper = Z_MAX
    if _remove_delta(Z_MIN, q, epsilon) <= delta:
        return Z_MIN
    return bisect_log(lambda z: _remove_delta(z, q, epsilon) > delta, Z_MIN, upper, 1e-9)


def _check_calibration_delta(delta: float, q: float) -> None:
    """Refuse a delta that no noise multiplier can make meaningful, saying why."""
    if q < 1 and delta >= q:
        raise InvalidParameterError(
            f"delta must be below the sampling rate, got delta={delta!r} >= "
            f"sampling_rate={q!r}: with Poisson sampling each image is left out with "
            "probability 1 - q, so every noise multiplier (even none) satisfies "
            "(epsilon, delta)-DP for delta >= q, and the target promises nothing. Choose "
            "delta well below q and below 1/n."
        )

    if delta < CALIBRATION_MIN_DELTA:
        raise InvalidParameterError(
            f"delta={delta!r} is below {CALIBRATION_MIN_DELTA:g}, the smallest delta "
            "dp_accounting's PLD accountant resolves in double precision (below it every "
            f"noise multiplier gets epsilon = inf). Choose delta >= {CALIBRATION_MIN_DELTA:g}; "
            "that is still far below 1/n for any dataset."
        )


def _calibrate(
    epsilon: float, delta: float, q: float, *, poll: Callable[[], None] | None
) -> Calibration:
    started = time.monotonic()
    _check_calibration_delta(delta, q)
    z_star = _exact_noise(epsilon, safe_delta(delta), q)
    return _search_noise(
        epsilon,
        delta,
        q,
        make_event=lambda z: release_event(noise_multiplier=z, sampling_rate=q),
        z_star=z_star,
        guess=z_star,
        target=f"epsilon={epsilon!r}, delta={delta!r}, sampling_rate={q!r}",
        started=started,
        poll=poll,
    )


_SEARCH_ADVICE = (
    "the PLD accountant cannot resolve this target in time (an epsilon tiny next to delta "
    "needs a very fine grid). Choose a larger epsilon (e.g. 0.1 to 10) and a delta well below "
    "q and below 1/n."
)


def _search_noise(
    epsilon: float,
    delta: float,
    q: float,
    *,
    make_event: Callable[[float], dpa.DpEvent],
    z_star: float,
    guess: float,
    target: str,
    started: float,
    poll: Callable[[], None] | None,
    poll_inside_passes: bool = False,
    advice: str = _SEARCH_ADVICE,
) -> Calibration:
    """The (near-)smallest z with epsilon_for(make_event(z)) <= epsilon (see the callers).

    The search meets the target at ``safe_delta(delta)`` (SAFETY_MARGIN), so that the exact
    divergence stays at most delta also after rounding (docs/privacy.md §2.6); the epsilon
    reported is the one at ``delta`` itself, checked <= epsilon too. ``z_star`` must be a
    lower bound on every z that meets the target at ``safe_delta(delta)`` under a correct
    accountant (no z below it can do), ``guess`` any starting point (the search is fastest
    when it is close to the answer). With ``poll_inside_passes`` the time limit and ``poll``
    are also checked between the PLD passes of one epsilon (for compositions, whose
    epsilon takes several passes). ``advice`` ends a refusal for time or passes: what to
    change.
    """
    passes = 0
    search_delta = safe_delta(delta)

    def check_time() -> None:
        if time.monotonic() - started > CALIBRATION_TIME_LIMIT_S:
            raise InvalidParameterError(
                f"could not calibrate within {CALIBRATION_TIME_LIMIT_S:g} s for {target}; {advice}"
            )

    def between_passes() -> None:
        check_time()
        if poll is not None:
            poll()

    def eps_of(z: float) -> float:
        nonlocal passes
        check_time()
        if passes >= CALIBRATION_MAX_PASSES:
            raise InvalidParameterError(
                f"could not calibrate in {CALIBRATION_MAX_PASSES} accountant passes for "
                f"{target}; {advice}"
            )
        passes += 1
        if poll is not None:
            poll()
        if poll_inside_passes:
            return _pld_epsilon([(make_event(z), 1)], search_delta, between_passes)
        return epsilon_for(make_event(z), delta=search_delta)

    def too_tight(z_star: float) -> InvalidParameterError:
        needs = f" (about {z_star:.3g})" if math.isfinite(z_star) else ""
        return InvalidParameterError(
            f"the target {target} needs a noise multiplier above Z_MAX = {Z_MAX:g}{needs}: "
            f"the noise on the sum would exceed {Z_MAX:g} times the signal bound C, drowning "
            "any signal. Choose a larger epsilon or delta."
        )

    # 1. The exact bound: no z below z* meets the target, so the search starts at or above it.
    if z_star > Z_MAX:
        raise too_tight(z_star)
    floor = max(z_star, Z_MIN)
    start = min(max(guess, floor), Z_MAX)
    eps_start = eps_of(start)

    # 2. Bracket: eps_of(lo) > target >= eps_of(hi); epsilon decreases as z grows.
    step = 2e-3
    if eps_start <= epsilon:
        hi, eps_hi = start, eps_start
        while True:
            if hi <= floor:
                if z_star <= Z_MIN:
                    raise InvalidParameterError(
                        f"the target {target} is met even with noise multiplier {Z_MIN:g}: it "
                        "promises (next to) nothing. Choose a smaller epsilon (at most a few "
                        "units) and a delta well below 1/n."
                    )
                lo, eps_lo = hi * (1 - 1e-9), math.inf  # below z*: above the target (step 1)
                break
            lo = max(hi / (1 + step), floor)
            eps_lo = eps_of(lo)
            if eps_lo > epsilon:
                break
            hi, eps_hi = lo, eps_lo
            step *= 5
    else:
        lo, eps_lo = start, eps_start
        while True:
            hi = min(lo * (1 + step), Z_MAX)
            eps_hi = eps_of(hi)
            if eps_hi <= epsilon:
                break
            if hi >= Z_MAX:
                raise too_tight(math.inf)
            lo, eps_lo = hi, eps_hi
            step *= 5

    # 3. Illinois false position on g(t) = log epsilon(e^t) - log target, t = log z (nearly
    # linear there), keeping g(log lo) > 0 >= g(log hi); bisection while a side is infinite.
    def g(eps: float) -> float:
        return (
            math.log(eps) - math.log(epsilon)
            if 0 < eps < math.inf
            else math.copysign(math.inf, eps - epsilon)
        )

    def done() -> bool:
        return eps_hi >= (1 - CALIBRATION_BAND) * epsilon or hi / lo - 1 < CALIBRATION_Z_TOLERANCE

    g_lo, g_hi = g(eps_lo), g(eps_hi)
    last_replaced = 0  # +1: hi was replaced last, -1: lo
    while not done():
        a, b = math.log(lo), math.log(hi)
        if math.isfinite(g_lo) and math.isfinite(g_hi):
            t = b - g_hi * (b - a) / (g_hi - g_lo)
            t = min(max(t, a + 1e-3 * (b - a)), b - 1e-3 * (b - a))
        else:
            t = 0.5 * (a + b)
        mid = math.exp(t)
        eps_mid = eps_of(mid)
        if eps_mid <= epsilon:
            hi, eps_hi, g_hi = mid, eps_mid, g(eps_mid)
            if last_replaced == 1:
                g_lo /= 2  # Illinois: halve the retained end's value to avoid stalling
            last_replaced = 1
        else:
            lo, eps_lo, g_lo = mid, eps_mid, g(eps_mid)
            if last_replaced == -1:
                g_hi /= 2
            last_replaced = -1
    if not (eps_hi >= (1 - CALIBRATION_BAND) * epsilon or hi == z_star):
        # z* itself is provably the smallest z; otherwise the PLD grid could not resolve
        # the band (an epsilon near 0 next to a large delta) and z is within
        # CALIBRATION_Z_TOLERANCE of the smallest z the accountant accepts.
        logger.warning(
            "calibration for %s stopped at epsilon(z)=%g",
            target,
            eps_hi,
        )

    # 4. Re-check (docs/privacy.md §2.6): never report a z whose epsilon exceeds the target.
    # eps_hi <= epsilon at safe_delta(delta); the epsilon reported is the one at delta (what
    # the ledger recomputes), never above the target either.
    def epsilon_at_delta(event: dpa.DpEvent) -> float:
        if poll_inside_passes:  # a composition: bounded and cancellable between its passes
            return _pld_epsilon([(event, 1)], delta, between_passes)
        return epsilon_for(event, delta=delta)

    event = make_event(hi)
    if poll is not None:
        poll()
    achieved = epsilon_at_delta(event)
    while not (achieved <= epsilon and eps_hi <= epsilon):  # a grid that is not monotone
        hi *= 1.0 + CALIBRATION_BAND / 4
        event = make_event(hi)
        eps_hi = eps_of(hi)
        achieved = epsilon_at_delta(event)
    return Calibration(
        noise_multiplier=hi,
        epsilon_target=epsilon,
        epsilon_achieved=achieved,
        delta=delta,
        sampling_rate=q,
        event=event,
    )


# --- DpEvent <-> JSON ---------------------------------------------------------------------

_MAX_DEPTH = 32
# Limits on a stored event, so that its epsilon takes bounded time (``epsilon_for``): this
# pack stores one release per event; a ledger written by hand or tampered with may not.
_MAX_NODES = 100
# At most this many repetitions of one event (see ``_leaves``).
_MAX_COUNT = 10**5


def event_to_dict(event: dpa.DpEvent) -> dict:
    """A JSON-able description of ``event``, read back by ``event_from_dict``.

    Supported: NoOp, Gaussian, PoissonSampled, SampledWithoutReplacement, SelfComposed and
    Composed (nested freely).
    """
    if isinstance(event, dpa.NoOpDpEvent):
        return {"type": "NoOp"}
    if isinstance(event, dpa.GaussianDpEvent):
        return {"type": "Gaussian", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dpa.PoissonSampledDpEvent):
        return {
            "type": "PoissonSampled",
            "sampling_probability": float(event.sampling_probability),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dpa.SampledWithoutReplacementDpEvent):
        return {
            "type": "SampledWithoutReplacement",
            "source_dataset_size": int(event.source_dataset_size),
            "sample_size": int(event.sample_size),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dpa.SelfComposedDpEvent):
        return {
            "type": "SelfComposed",
            "count": int(event.count),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dpa.ComposedDpEvent):
        return {"type": "Composed", "events": [event_to_dict(e) for e in event.events]}
    raise InvalidParameterError(
        f"cannot store a DpEvent of type {type(event).__name__} ({event!r}); storable types: "
        f"{', '.join(_FIELDS)}."
    )


_FIELDS: dict[str, set[str]] = {
    "NoOp": set(),
    "Gaussian": {"noise_multiplier"},
    "PoissonSampled": {"sampling_probability", "event"},
    "SampledWithoutReplacement": {"source_dataset_size", "sample_size", "event"},
    "SelfComposed": {"count", "event"},
    "Composed": {"events"},
}


def event_from_dict(data: dict) -> dpa.DpEvent:
    """The DpEvent described by ``data`` (as written by ``event_to_dict``).

    Raises LedgerFormatError for an unknown event type and InvalidParameterError for a known
    type with missing, extra or out-of-range fields: a Gaussian noise multiplier must lie in
    (0, Z_MAX] (0 would be no privacy at all, a larger value was never calibrated here), a
    count in [1, 10^5] (also multiplied along nested compositions), and an event may have
    at most 100 parts, so that its epsilon can be computed in bounded time.
    """
    return _event_from_dict(data, depth=0, multiplicity=1, nodes=[0])


def _event_from_dict(data: object, depth: int, multiplicity: int, nodes: list[int]) -> dpa.DpEvent:
    if depth > _MAX_DEPTH:
        raise InvalidParameterError(f"DpEvent nested deeper than {_MAX_DEPTH} levels.")
    nodes[0] += 1
    if nodes[0] > _MAX_NODES:
        raise InvalidParameterError(f"a stored DpEvent may have at most {_MAX_NODES} parts.")
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise InvalidParameterError(
            f"a stored DpEvent must be a dict with a string 'type', got {data!r:.200}."
        )
    kind = data["type"]
    if kind not in _FIELDS:
        raise LedgerFormatError(
            f"unknown DpEvent type {kind!r}; known types: {', '.join(_FIELDS)}. It may come "
            "from a newer version of comfyui-dp-adapt."
        )
    fields = set(data) - {"type"}
    if fields != _FIELDS[kind]:
        raise InvalidParameterError(
            f"DpEvent of type {kind!r} must have the fields {sorted(_FIELDS[kind])}, got "
            f"{sorted(fields)} in {data!r:.200}."
        )

    def inner(key: str = "event", times: int = 1) -> dpa.DpEvent:
        return _event_from_dict(data[key], depth + 1, multiplicity * times, nodes)

    if kind == "NoOp":
        return dpa.NoOpDpEvent()
    if kind == "Gaussian":
        z = _stored_real(data, "noise_multiplier", 0.0, Z_MAX, low_open=True)
        return dpa.GaussianDpEvent(noise_multiplier=z)
    if kind == "PoissonSampled":
        return dpa.PoissonSampledDpEvent(
            sampling_probability=_stored_real(data, "sampling_probability", 0.0, 1.0),
            event=inner(),
        )
    if kind == "SampledWithoutReplacement":
        n = _stored_int(data, "source_dataset_size")
        m = _stored_int(data, "sample_size")
        if m > n:
            raise InvalidParameterError(
                f"sample_size must be <= source_dataset_size, got {m} > {n} in {data!r:.200}."
            )
        return dpa.SampledWithoutReplacementDpEvent(
            source_dataset_size=n, sample_size=m, event=inner()
        )
    if kind == "SelfComposed":
        count = _stored_int(data, "count", low=1, high=_MAX_COUNT)
        if multiplicity * count > _MAX_COUNT:
            raise InvalidParameterError(
                f"nested SelfComposed DpEvents repeat an event {multiplicity * count} times; "
                f"at most {_MAX_COUNT} are allowed."
            )
        return dpa.SelfComposedDpEvent(event=inner(times=count), count=count)
    events = data["events"]
    if not isinstance(events, list):
        raise InvalidParameterError(
            f"'events' of a Composed DpEvent must be a list, got {events!r:.200}."
        )
    return dpa.ComposedDpEvent(
        events=[_event_from_dict(e, depth + 1, multiplicity, nodes) for e in events]
    )


def _stored_real(data: dict, key: str, low: float, high: float, *, low_open: bool = False) -> float:
    value = data[key]
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, Real)
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not in_range:
        allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidParameterError(
            f"DpEvent field {key} must be a number in {allowed}, got {key}={value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"DpEvent field {key} must be finite, got {key}={value!r}.")
    return value


def _stored_int(data: dict, key: str, low: int = 0, high: int | None = None) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise InvalidParameterError(
            f"DpEvent field {key} must be an integer >= {low}, got {key}={value!r}."
        )
    if high is not None and value > high:
        raise InvalidParameterError(
            f"DpEvent field {key} must be at most {high} (and >= {low}), got {key}={value!r}."
        )
    return int(value)


# --- the paper's calibration, for comparison only (docs/privacy.md §2, the paper's calibration) --------------


def classical_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon (Dwork & Roth 2014, Thm A.1).

    The theorem proves (epsilon, delta)-DP only for 0 < epsilon < 1. Raises
    InvalidParameterError when sigma would overflow a float (epsilon near 1e-300).
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    sensitivity = check_clip_norm(sensitivity, "sensitivity")
    sigma = sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if not math.isfinite(sigma):
        raise InvalidParameterError(
            f"the classical Gaussian bound overflows for epsilon={epsilon!r}, delta={delta!r}, "
            f"sensitivity={sensitivity!r}: sigma = sensitivity sqrt(2 ln(1.25/delta)) / epsilon "
            "exceeds the largest float. Choose a larger epsilon."
        )
    return sigma


@dataclass(frozen=True)
class PaperCalibration:
    """The paper's noise for a target (epsilon, delta), recomputed for comparison only.

    Replace-one adjacency, a fixed-size sample of m of n images, the sum of the m bounded
    contributions (sensitivity 2C), classical Gaussian bound. Never used for a release.

    ``base_epsilon``/``base_delta``: what the classical bound is applied to after inverting
    the amplification by sampling (see ``paper_calibration``). ``sigma``: noise std on the
    sum. ``classical_valid``: False when base_epsilon >= 1, outside Thm A.1 of Dwork & Roth,
    where the bound proves nothing. ``rdp_epsilon``: the epsilon this sigma really gives at
    the target delta under replace-one with sampling without replacement, from dp_accounting's
    RdpAccountant(REPLACE_ONE) on ``event`` (the only accountant there for this pair; an
    upper bound, RDP being looser than PLD; for a noise multiplier above Z_MAX it is
    evaluated at Z_MAX, still an upper bound, see ``_paper_rdp_epsilon``).
    """

    epsilon: float
    delta: float
    clip_norm: float
    dataset_size: int
    sample_size: int
    sensitivity: float
    base_epsilon: float
    base_delta: float
    sigma: float
    noise_multiplier: float
    classical_valid: bool
    rdp_epsilon: float
    event: dpa.DpEvent


def paper_calibration(
    *, epsilon: float, delta: float, clip_norm: float, dataset_size: int, sample_size: int
) -> PaperCalibration:
    """The paper's calibration (classical bound, replace-one, sample m of n), for comparison.

    Sampling (our choice, stated because the paper's text leaves the step implicit): for
    m < n the target (epsilon, delta) is split with amplification by subsampling without
    replacement under replace-one adjacency, Balle, Barthe, Gaboardi 2018 ("Privacy
    amplification by subsampling: tight analyses via couplings and divergences"), Thm 10:
    an (eps0, delta0)-DP mechanism on a uniform sample of m of n is
    (log(1 + (m/n)(e^eps0 - 1)), (m/n) delta0)-DP. Inverting, eps0 = log(1 + (n/m)(e^eps - 1))
    and delta0 = (n/m) delta; then sigma = 2C sqrt(2 ln(1.25/delta0)) / eps0. For m = n
    this is the plain classical bound at (epsilon, delta).

    ``rdp_epsilon`` passes the noise multiplier sigma / (2C) explicitly: dp_accounting's
    RdpAccountant(REPLACE_ONE) reads GaussianDpEvent(z) as noise z times the whole
    replace-one sensitivity, here 2C, whereas its PLDAccountant(REPLACE_ONE) reads it as z
    times the per-record bound C and doubles the shift itself (checked on dp-accounting
    0.6.0 by a test; docs/privacy.md §2; google/differential-privacy issue #378).
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    c = check_clip_norm(clip_norm)
    n = check_positive_int("dataset_size", dataset_size)
    m = check_positive_int("sample_size", sample_size)
    if m > n:
        raise InvalidParameterError(
            f"sample_size must be <= dataset_size, got sample_size={m}, dataset_size={n}."
        )
    ratio = m / n
    if epsilon < 30:
        base_epsilon = math.log1p(math.expm1(epsilon) / ratio)
    else:  # the same, without overflowing e^epsilon
        base_epsilon = epsilon - math.log(ratio) + math.log1p((ratio - 1) * math.exp(-epsilon))
    base_delta = delta / ratio
    if not base_delta < 1:
        raise InvalidParameterError(
            f"the paper's calibration needs delta * n / m < 1, got delta={delta!r}, "
            f"dataset_size={n}, sample_size={m}."
        )
    sensitivity = 2.0 * c  # replace-one: one contribution of norm <= C swapped for another
    sigma = classical_gaussian_sigma(
        epsilon=base_epsilon, delta=base_delta, sensitivity=sensitivity
    )
    gaussian = dpa.GaussianDpEvent(sigma / sensitivity)
    event = gaussian if m == n else dpa.SampledWithoutReplacementDpEvent(n, m, gaussian)
    return PaperCalibration(
        epsilon=epsilon,
        delta=delta,
        clip_norm=c,
        dataset_size=n,
        sample_size=m,
        sensitivity=sensitivity,
        base_epsilon=base_epsilon,
        base_delta=base_delta,
        sigma=sigma,
        noise_multiplier=sigma / sensitivity,
        classical_valid=base_epsilon < 1.0,
        rdp_epsilon=_paper_rdp_epsilon(sigma / sensitivity, n, m, delta),
        event=event,
    )


def _paper_rdp_epsilon(z: float, n: int, m: int, delta: float) -> float:
    """RdpAccountant(REPLACE_ONE) epsilon of ``z`` on a sample of m of n, at ``delta``.

    dp_accounting's RDP for sampling without replacement (Wang, Balle, Kasiviswanathan 2019)
    fails with a math domain error above z ~ 1e9, and its Gaussian RDP overflows near
    z ~ 1e155, so z is capped at Z_MAX: more noise never costs privacy, so the epsilon at
    the cap is still an upper bound (and below ~1e-5 there). Where the RDP overflows for a
    tiny z the mechanism promises nothing and the bound is infinite.
    """
    z_eval = min(z, Z_MAX)
    gaussian = dpa.GaussianDpEvent(z_eval)
    event = gaussian if m == n else dpa.SampledWithoutReplacementDpEvent(n, m, gaussian)
    accountant = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    try:
        return float(accountant.compose(event).get_epsilon(delta))
    except (OverflowError, ValueError, ZeroDivisionError) as error:
        if z_eval < 1:
            return math.inf
        raise InvalidParameterError(
            f"dp_accounting's RDP accountant failed on the paper's noise multiplier "
            f"z={z!r} (sample {m} of {n}, delta={delta!r}): {error}."
        ) from error


@dataclass(frozen=True)
class NoiseComparison:
    """Expected noise on the released mean relative to the signal bound C, two ways.

    ``relative_noise`` = z sqrt(D) / (q n): this pack (exact PLD, add/remove, Poisson q;
    the noise N(0, (zC)^2 I_D) on the sum has expected norm ~ zC sqrt(D), divided by q n).
    ``paper_relative_noise`` = sigma sqrt(D) / (m C) with m = max(1, round(q n)): the
    paper's calibration (``paper``) for the same target. ``ratio`` = relative_noise /
    paper_relative_noise (the adjacencies differ: add/remove vs replace-one).
    ``same_adjacency_ratio``: exact over classical noise for one Gaussian release with no
    sampling under the SAME adjacency (sensitivity cancels), z(q=1) / (sqrt(2 ln(1.25/delta))
    / epsilon): about 0.77 at epsilon 1, delta 1e-5 (docs/privacy.md §2).
    """

    epsilon: float
    delta: float
    clip_norm: float
    dataset_size: int
    sampling_rate: float
    dimension: int
    noise_multiplier: float
    relative_noise: float
    expected_sample_size: int
    paper: PaperCalibration
    paper_relative_noise: float
    ratio: float
    same_adjacency_ratio: float


def noise_comparison(
    *,
    epsilon: float,
    delta: float,
    clip_norm: float,
    dataset_size: int,
    sampling_rate: float,
    dimension: int,
    poll: Callable[[], None] | None = None,
) -> NoiseComparison:
    """Our calibrated noise against the paper's for one release at (epsilon, delta).

    Raises InvalidParameterError where our calibration refuses the target (see
    ``calibrate_noise_multiplier``, which receives ``poll``) or the paper's cannot be
    applied (delta * n / m >= 1). If only the q = 1 calibration behind
    ``same_adjacency_ratio`` is refused (its z would leave [Z_MIN, Z_MAX]), that ratio uses
    the exact analytic Gaussian noise instead (Balle & Wang 2018, Thm 8), which the PLD
    calibration matches to 0.5 %.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    c = check_clip_norm(clip_norm)
    n = check_positive_int("dataset_size", dataset_size)
    q = check_sampling_rate(sampling_rate)
    d = check_positive_int("dimension", dimension)
    z = calibrate_noise_multiplier(
        epsilon=epsilon, delta=delta, sampling_rate=q, poll=poll
    ).noise_multiplier
    relative = z * math.sqrt(d) / (q * n)
    m = max(1, round(q * n))
    paper = paper_calibration(
        epsilon=epsilon, delta=delta, clip_norm=c, dataset_size=n, sample_size=m
    )
    paper_relative = paper.sigma * math.sqrt(d) / (m * c)
    try:
        z_full = calibrate_noise_multiplier(
            epsilon=epsilon, delta=delta, sampling_rate=1.0, poll=poll
        ).noise_multiplier
    except InvalidParameterError:
        z_full = _initial_guess(epsilon, delta, 1.0)
    same = z_full / classical_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=1.0)
    return NoiseComparison(
        epsilon=epsilon,
        delta=delta,
        clip_norm=c,
        dataset_size=n,
        sampling_rate=q,
        dimension=d,
        noise_multiplier=z,
        relative_noise=relative,
        expected_sample_size=m,
        paper=paper,
        paper_relative_noise=paper_relative,
        ratio=relative / paper_relative,
        same_adjacency_ratio=same,
    )


# --- DP-SGD textual inversion (docs/privacy.md §4) ---------------------------------------

DPSGD_MAX_STEPS = _MAX_COUNT
"""The most DP-SGD steps accounted (and stored in a ledger, see ``event_from_dict``)."""


def _check_steps(steps: int) -> int:
    if (
        isinstance(steps, bool)
        or not isinstance(steps, Integral)
        or not 1 <= steps <= DPSGD_MAX_STEPS
    ):
        raise InvalidParameterError(
            f"steps must be an integer from 1 to {DPSGD_MAX_STEPS}, got steps={steps!r}."
        )
    return int(steps)


def dpsgd_event(*, noise_multiplier: float, sampling_rate: float, steps: int) -> dpa.DpEvent:
    """The DpEvent of a DP-SGD run (Abadi et al. 2016): T Poisson-subsampled Gaussian steps.

    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)``, with the plain
    ``GaussianDpEvent(z)`` inside when q = 1. Each step releases a sum of per-example
    gradients clipped to norm C (add/remove sensitivity C) plus N(0, (z C)^2 I).
    """
    steps = _check_steps(steps)
    return dpa.SelfComposedDpEvent(
        event=release_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate),
        count=steps,
    )


def _dpsgd_guess(epsilon: float, delta: float, q: float, steps: int) -> float:
    """A starting point for the DP-SGD search: the central-limit approximation.

    T Poisson-subsampled Gaussian steps are close to mu-GDP with mu = q sqrt(T (e^{1/z^2} - 1))
    (Bu, Dong, Long, Su 2020, "Deep learning with Gaussian differential privacy"), and mu-GDP
    is (epsilon, delta)-DP exactly when a Gaussian with noise multiplier 1/mu is (Dong, Roth,
    Su 2022, Cor. 2.13). Only a guess (the approximation can err either way); the search
    checks every z with the PLD accountant.
    """
    z_gauss = _initial_guess(epsilon, delta, 1.0)
    no_amplification = math.sqrt(steps) * z_gauss  # T Gaussians = one with z / sqrt(T)
    try:
        mu = 1.0 / z_gauss
        guess = 1.0 / math.sqrt(math.log1p((mu / q) ** 2 / steps))
    except (ArithmeticError, ValueError):
        return no_amplification
    if not math.isfinite(guess) or guess <= 0:
        return no_amplification
    return min(guess, no_amplification)


def calibrate_dpsgd_noise_multiplier(
    *,
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    poll: Callable[[], None] | None = None,
) -> Calibration:
    """The (near-)smallest z with epsilon(dpsgd_event(z, q, T)) <= target (docs/privacy.md §4).

    The same search, limits and refusals as ``calibrate_noise_multiplier`` (delta >= q,
    a delta below what the PLD resolves, z outside [Z_MIN, Z_MAX], CALIBRATION_TIME_LIMIT_S),
    on the T-fold composition; ``event`` of the result is the composed event. The lower
    bound on z: for q = 1, T Gaussians are one Gaussian with z / sqrt(T), so
    z* = sqrt(T) times the exact one-release noise (Balle & Wang 2018, Thm 8); for q < 1,
    the one-step z* (composing more steps never lowers epsilon). The search starts from the
    central-limit guess (``_dpsgd_guess``). ``poll`` is called before every PLD pass, also
    between the passes of one epsilon. Results are cached per (epsilon, delta, q, T).
    """
    key = (
        check_epsilon(epsilon),
        check_delta(delta),
        check_sampling_rate(sampling_rate),
        _check_steps(steps),
    )
    if poll is not None and not callable(poll):
        raise InvalidParameterError(f"poll must be callable or None, got poll={poll!r}.")
    return _cached(("dpsgd", *key), lambda: _calibrate_dpsgd(*key, poll=poll))


def _calibrate_dpsgd(
    epsilon: float, delta: float, q: float, steps: int, *, poll: Callable[[], None] | None
) -> Calibration:
    started = time.monotonic()
    _check_calibration_delta(delta, q)
    if q == 1:
        z_star = math.sqrt(steps) * _exact_noise(epsilon, safe_delta(delta), 1.0)
        guess = z_star
    else:
        z_star = _exact_noise(epsilon, safe_delta(delta), q)
        guess = _dpsgd_guess(epsilon, delta, q, steps) if math.isfinite(z_star) else z_star
    return _search_noise(
        epsilon,
        delta,
        q,
        make_event=lambda z: dpsgd_event(noise_multiplier=z, sampling_rate=q, steps=steps),
        z_star=z_star,
        guess=guess,
        target=f"epsilon={epsilon!r}, delta={delta!r}, sampling_rate={q!r}, steps={steps!r}",
        started=started,
        poll=poll,
        poll_inside_passes=True,
        advice=_dpsgd_advice(q, steps),
    )


def _dpsgd_advice(q: float, steps: int) -> str:
    """What to change when a DP-SGD calibration cannot answer in bounded time."""
    if q == 1:
        return _SEARCH_ADVICE
    return (
        f"every accountant pass composes {steps} Poisson-subsampled steps (q = {q:g}), whose "
        "privacy loss distribution takes long to build and compose on this machine. Use fewer "
        "steps (a pass costs about in proportion), or sampling rate q = 1 (steps without "
        "subsampling compose in closed form and calibrate at once), or a larger epsilon "
        "(e.g. 0.1 to 10) with a delta well below q and below 1/n."
    )
