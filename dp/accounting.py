"""Privacy accounting on dp_accounting (DP_SPEC sections 2.6 and 8).

Adjacency: add/remove one image. Accountant: privacy loss distributions (PLD), the tightest
of dp_accounting's accountants for these events (Koskela, Jaelkoe, Honkela 2020; Doroshenko,
Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect the dots").

PLD discretisation. dp_accounting builds *pessimistic* PLDs (``pessimistic_estimate=True``,
its default): the discretised distribution dominates the true one, so the epsilon it reports
is an upper bound on the true epsilon at any ``value_discretization_interval``; a coarser
interval only overstates epsilon (costing noise, never privacy). Measured on this project's
events the overstatement is at most about one interval, in absolute epsilon, while the cost
grows as the interval shrinks (seconds per event at 1e-4 for small noise multipliers). So
the interval is chosen relative to the answer: one pass at ``PLD_COARSE_INTERVAL`` gives
eps0, the next pass uses ``PLD_RELATIVE_INTERVAL * eps0`` (floor ``PLD_MIN_INTERVAL``), and
passes repeat while the interval would shrink by more than 2x. The reported epsilon is thus
an upper bound that exceeds the true one by about 0.1 % (at most ~0.2 %).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import dp_accounting as dpa
from dp_accounting import pld, rdp

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
PLD_MIN_INTERVAL = 1e-6
# Calibration stops once epsilon(z) lies in [(1 - CALIBRATION_BAND) * target, target].
CALIBRATION_BAND = 2e-3
# Calibrated noise multipliers must lie in this range. Z_MIN = 0.05 is one release at
# epsilon ~ 280 (delta 1e-5, q = 1), far beyond any meaningful guarantee; below it the PLD
# grid grows quickly. Z_MAX = 1e6 is epsilon ~ 5e-6.
Z_MIN, Z_MAX = 5e-2, 1e6


def release_event(*, noise_multiplier: float, sampling_rate: float) -> dpa.DpEvent:
    """The DpEvent of one M1 release (DP_SPEC 2.6).

    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, or ``GaussianDpEvent(z)`` when q = 1.
    """
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    gaussian = dpa.GaussianDpEvent(z)
    if q == 1:
        return gaussian
    return dpa.PoissonSampledDpEvent(sampling_probability=q, event=gaussian)


# --- epsilon ----------------------------------------------------------------------------


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


def _pld_pass(groups: list[tuple[dpa.DpEvent, int]], delta: float, interval: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=interval)
    for event, count in groups:
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(groups: list[tuple[dpa.DpEvent, int]], delta: float) -> float:
    if not groups:
        return 0.0
    accountant = pld.PLDAccountant()
    for event, _ in groups:
        if not isinstance(event, dpa.DpEvent):
            raise InvalidParameterError(
                f"expected a dp_accounting DpEvent, got {event!r} ({type(event).__name__})."
            )
        if not accountant.supports(event):
            raise InvalidParameterError(
                f"the PLD accountant (add/remove adjacency) cannot account for {event!r}; "
                "supported here: Gaussian, Poisson-sampled Gaussian and their compositions."
            )
    interval = PLD_COARSE_INTERVAL
    epsilon = _pld_pass(groups, delta, interval)
    # epsilon == 0 from a pessimistic PLD is exact (the true epsilon is 0 too).
    while math.isfinite(epsilon) and epsilon > 0:
        finer = max(PLD_MIN_INTERVAL, PLD_RELATIVE_INTERVAL * epsilon)
        if finer > interval / 2:
            break
        interval = finer
        epsilon = _pld_pass(groups, delta, interval)
    return epsilon


def epsilon_for(event: dpa.DpEvent, *, delta: float) -> float:
    """epsilon of ``event`` at ``delta`` from the PLD accountant (add/remove adjacency).

    An upper bound on the true epsilon, about 0.1 % (at most ~0.2 %) above it (module
    docstring).
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


# --- calibration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The noise multiplier for a target (epsilon, delta) at sampling rate q.

    ``epsilon_achieved`` = ``epsilon_for(event, delta=delta)``; it is never above
    ``epsilon_target`` and lies within CALIBRATION_BAND (0.2 %) of it (a warning is logged
    in the unexpected case that the search ends outside that band).
    """

    noise_multiplier: float
    epsilon_target: float
    epsilon_achieved: float
    delta: float
    sampling_rate: float
    event: dpa.DpEvent


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, sampling_rate: float
) -> Calibration:
    """The (near-)smallest z with epsilon(z) <= target, for one M1 release (DP_SPEC 2.6).

    epsilon(z) is ``epsilon_for(release_event(z, q), delta)``. The search keeps a bracket
    epsilon(lo) > target >= epsilon(hi) and returns ``hi``, a z whose epsilon was computed
    and found <= target (the re-check of DP_SPEC 2.6 is the loop invariant, and it is
    verified once more at the end). It stops when epsilon(hi) is within CALIBRATION_BAND
    (0.2 %) of the target. Results are cached per (epsilon, delta, q).
    """
    return _calibrate(
        check_epsilon(epsilon), check_delta(delta), check_sampling_rate(sampling_rate)
    )


def _initial_guess(epsilon: float, delta: float, q: float) -> float:
    """A starting z: exact Gaussian calibration (Balle & Wang 2018) of the base mechanism.

    For q < 1 the base (epsilon0, delta0) inverts amplification by Poisson subsampling,
    epsilon = log(1 + q (e^epsilon0 - 1)), delta = q delta0 (Li, Qardaji, Su 2012; Balle,
    Barthe, Gaboardi 2018, Thm 8). Only a guess: the bracket search below decides.
    """
    if q < 1:
        epsilon = math.log1p(math.expm1(epsilon) / q) if epsilon < 700 else epsilon - math.log(q)
        delta = min(delta / q, 0.5)
    return min(max(float(dpa.get_sigma_gaussian(epsilon, delta)), 2 * Z_MIN), Z_MAX / 2)


@functools.lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, q: float) -> Calibration:
    def eps_of(z: float) -> float:
        return epsilon_for(release_event(noise_multiplier=z, sampling_rate=q), delta=delta)

    def too_far(direction: str) -> InvalidParameterError:
        if direction == "loose":
            return InvalidParameterError(
                f"the target epsilon={epsilon!r} at delta={delta!r}, sampling_rate={q!r} is "
                f"met even with noise multiplier {Z_MIN:g}: it promises (next to) nothing. "
                "Choose a smaller epsilon (at most a few units) and a delta well below 1/n."
            )
        return InvalidParameterError(
            f"the target epsilon={epsilon!r} at delta={delta!r}, sampling_rate={q!r} needs a "
            f"noise multiplier above {Z_MAX:g}; choose a larger epsilon."
        )

    # 1. Bracket: eps_of(lo) > target >= eps_of(hi); epsilon decreases as z grows.
    z = _initial_guess(epsilon, delta, q)
    eps_z = eps_of(z)
    if eps_z <= epsilon:
        hi, eps_hi = z, eps_z
        while True:
            lo = hi / 1.5
            if lo < Z_MIN:
                raise too_far("loose")
            eps_lo = eps_of(lo)
            if eps_lo > epsilon:
                break
            hi, eps_hi = lo, eps_lo
    else:
        lo, eps_lo = z, eps_z
        while True:
            hi = lo * 1.5
            if hi > Z_MAX:
                raise too_far("tight")
            eps_hi = eps_of(hi)
            if eps_hi <= epsilon:
                break
            lo, eps_lo = hi, eps_hi

    # 2. Illinois false position on g(t) = log epsilon(e^t) - log target, t = log z (nearly
    # linear there), keeping g(log lo) > 0 >= g(log hi); bisection while a side is infinite.
    def g(eps: float) -> float:
        return math.log(eps) - math.log(epsilon) if eps > 0 else -math.inf

    g_lo, g_hi = g(eps_lo), g(eps_hi)
    last_replaced = 0  # +1: hi was replaced last, -1: lo
    for _ in range(100):
        if eps_hi >= (1 - CALIBRATION_BAND) * epsilon or hi / lo - 1 < 1e-12:
            break
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
    if not eps_hi >= (1 - CALIBRATION_BAND) * epsilon:
        logger.warning(
            "calibration for epsilon=%g, delta=%g, q=%g stopped at epsilon(z)=%g",
            epsilon,
            delta,
            q,
            eps_hi,
        )

    # 3. Re-check (DP_SPEC 2.6): never report a z whose epsilon exceeds the target.
    event = release_event(noise_multiplier=hi, sampling_rate=q)
    achieved = epsilon_for(event, delta=delta)
    while not achieved <= epsilon:  # only if the accountant were not deterministic
        hi *= 1.0 + CALIBRATION_BAND / 4
        event = release_event(noise_multiplier=hi, sampling_rate=q)
        achieved = epsilon_for(event, delta=delta)
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
    type with missing, extra or out-of-range fields.
    """
    return _event_from_dict(data, depth=0)


def _event_from_dict(data: object, depth: int) -> dpa.DpEvent:
    if depth > _MAX_DEPTH:
        raise InvalidParameterError(f"DpEvent nested deeper than {_MAX_DEPTH} levels.")
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
    if kind == "NoOp":
        return dpa.NoOpDpEvent()
    if kind == "Gaussian":
        z = _stored_real(data, "noise_multiplier", 0.0, math.inf)
        return dpa.GaussianDpEvent(noise_multiplier=z)
    if kind == "PoissonSampled":
        return dpa.PoissonSampledDpEvent(
            sampling_probability=_stored_real(data, "sampling_probability", 0.0, 1.0),
            event=_event_from_dict(data["event"], depth + 1),
        )
    if kind == "SampledWithoutReplacement":
        n = _stored_int(data, "source_dataset_size")
        m = _stored_int(data, "sample_size")
        if m > n:
            raise InvalidParameterError(
                f"sample_size must be <= source_dataset_size, got {m} > {n} in {data!r:.200}."
            )
        return dpa.SampledWithoutReplacementDpEvent(
            source_dataset_size=n,
            sample_size=m,
            event=_event_from_dict(data["event"], depth + 1),
        )
    if kind == "SelfComposed":
        return dpa.SelfComposedDpEvent(
            event=_event_from_dict(data["event"], depth + 1), count=_stored_int(data, "count")
        )
    events = data["events"]
    if not isinstance(events, list):
        raise InvalidParameterError(
            f"'events' of a Composed DpEvent must be a list, got {events!r:.200}."
        )
    return dpa.ComposedDpEvent(events=[_event_from_dict(e, depth + 1) for e in events])


def _stored_real(data: dict, key: str, low: float, high: float) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
        raise InvalidParameterError(
            f"DpEvent field {key} must be a number in [{low:g}, {high:g}], got {key}={value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"DpEvent field {key} must be finite, got {key}={value!r}.")
    return value


def _stored_int(data: dict, key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise InvalidParameterError(
            f"DpEvent field {key} must be a non-negative integer, got {key}={value!r}."
        )
    return int(value)


# --- the paper's calibration, for comparison only (DP_SPEC 2, "Paper mode") --------------


def classical_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon (Dwork & Roth 2014, Thm A.1).

    The theorem proves (epsilon, delta)-DP only for 0 < epsilon < 1.
    """
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


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
    upper bound, RDP being looser than PLD).
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
    0.6.0 by a test; DP_SPEC 2; google/differential-privacy issue #378).
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
    base_epsilon = math.log1p(math.expm1(epsilon) / ratio) if epsilon < 700 else epsilon
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
    accountant = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    rdp_eps = float(accountant.compose(event).get_epsilon(delta))
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
        rdp_epsilon=rdp_eps,
        event=event,
    )


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
    / epsilon): about 0.77 at epsilon 1, delta 1e-5 (DP_SPEC 2).
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
) -> NoiseComparison:
    """Our calibrated noise against the paper's for one release at (epsilon, delta)."""
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    c = check_clip_norm(clip_norm)
    n = check_positive_int("dataset_size", dataset_size)
    q = check_sampling_rate(sampling_rate)
    d = check_positive_int("dimension", dimension)
    z = calibrate_noise_multiplier(epsilon=epsilon, delta=delta, sampling_rate=q).noise_multiplier
    relative = z * math.sqrt(d) / (q * n)
    m = max(1, round(q * n))
    paper = paper_calibration(
        epsilon=epsilon, delta=delta, clip_norm=c, dataset_size=n, sample_size=m
    )
    paper_relative = paper.sigma * math.sqrt(d) / (m * c)
    z_full = calibrate_noise_multiplier(epsilon=epsilon, delta=delta, sampling_rate=1.0)
    same = z_full.noise_multiplier / classical_gaussian_sigma(
        epsilon=epsilon, delta=delta, sensitivity=1.0
    )
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
