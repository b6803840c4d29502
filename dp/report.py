"""Readable reports of the Privacy Budget and DP Privacy Planner nodes (public values only)."""

from __future__ import annotations

from collections.abc import Callable

from .accounting import noise_comparison
from .budget import PrivacyBudget
from .ledger import GAUSSIAN_FILTER, RENYI_FILTER, TotalBudget
from .planner import (
    SMALLEST_PLANNED_EPSILON,
    LedgerBalance,
    NextRelease,
    PlannedRelease,
    ledger_balance,
)
from .validation import check_positive_int, check_sampling_rate, delta_warning

NEARLY_SPENT = 0.8


def budget_report(budget: PrivacyBudget) -> str:
    """What the budget states: the per-release target, the collection's total and n_hat, with
    the delta warning. The ledger balance is not part of it: computed before the workflow's
    releases it would be stale after them, so the node shows the balance live instead (read
    from the ledger after every run, ``balance_line``)."""
    lines = [
        f"per release: epsilon {budget.epsilon:g}, delta {budget.delta:g} (add/remove one image)",
        f"collection '{budget.ledger_name}': total epsilon {budget.total.epsilon:g} at delta "
        f"{budget.total.delta:g}, declared size n_hat={budget.declared_dataset_size} (public)",
        "noise for a given release: see that node's report, or a DP Privacy Planner node",
    ]
    warning = delta_warning(budget.delta, budget.declared_dataset_size)
    if warning:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


FILTER_NAMES = {GAUSSIAN_FILTER: "Gaussian-DP filter", RENYI_FILTER: "Renyi filter"}


def planned_release_words(planned: PlannedRelease) -> str:
    """The planned release in words: its kind, q (and T) and per-release delta."""
    if planned.steps is not None:
        return (
            f"DP-SGD with T = {planned.steps} steps at q = {planned.sampling_rate:g}, delta "
            f"{planned.delta:g}"
        )
    return f"q = {planned.sampling_rate:g}, delta {planned.delta:g}"


def next_release_line(allowed: NextRelease, total: TotalBudget) -> str:
    """What the ledger allows the planned release, by the rule it decides with (its fully
    adaptive filter, ``next_release``); never the total minus what was spent."""
    plan = planned_release_words(allowed.planned)
    if allowed.refused_kind:
        return (
            f"a release at {plan} cannot join this collection: its first release had q = 1, "
            "so its releases compose by the Gaussian-DP filter, which admits q = 1 releases "
            "only; use q = 1"
        )
    rule = FILTER_NAMES.get(allowed.filter_kind, "filter")
    if allowed.epsilon == 0.0:
        return (
            f"no release at {plan} fits any more: the collection's {rule} refuses even "
            f"epsilon {SMALLEST_PLANNED_EPSILON:g}"
        )
    whole = " (the whole total)" if allowed.epsilon == total.epsilon else ""
    return f"the next release can use up to eps = {allowed.epsilon:g}{whole} at {plan} ({rule})"


def balance_line(balance: LedgerBalance) -> str:
    """What the collection has spent (the PLD estimate, not subtracted from anything) and, for
    each planned release, what the ledger allows it; a warning when nearly spent."""
    total = balance.total
    if balance.releases == 0:
        lines = [
            f"ledger '{balance.collection}': no release recorded yet; total epsilon "
            f"{total.epsilon:g} at delta {total.delta:g}"
        ]
    else:
        lines = [
            f"ledger '{balance.collection}': {balance.releases} release(s), epsilon "
            f"{balance.spent:.4g} of {total.epsilon:g} spent (PLD composition at delta "
            f"{total.delta:g}, the non-adaptive estimate)"
        ]
    lines += [next_release_line(allowed, total) for allowed in balance.next_releases]
    if balance.releases == 0 and any(
        a.filter_kind == GAUSSIAN_FILTER and a.planned.sampling_rate == 1
        for a in balance.next_releases
    ):
        lines.append(
            "note: a first release at q = 1 pins the Gaussian-DP filter; this collection's "
            "later releases must then use q = 1 too"
        )
    if balance.spent >= NEARLY_SPENT * total.epsilon or any(
        a.epsilon == 0.0 and not a.refused_kind for a in balance.next_releases
    ):
        lines.append("WARNING: this collection's budget is nearly spent.")
    return "\n".join(lines)


def planner_report(
    budget: PrivacyBudget,
    *,
    dimension: int,
    sampling_rate: float,
    poll: Callable[[], None] | None = None,
) -> tuple[str, LedgerBalance]:
    """Calibrated noise, expected noise relative to the signal (exact vs the paper's
    calibration) at the declared n_hat, and the collection's ledger balance with the largest
    epsilon a next release could use."""
    dataset_size = budget.declared_dataset_size
    check_positive_int("dimension", dimension)
    check_sampling_rate(sampling_rate)
    comparison = noise_comparison(
        epsilon=budget.epsilon,
        delta=budget.delta,
        clip_norm=1.0,
        dataset_size=dataset_size,
        sampling_rate=sampling_rate,
        dimension=dimension,
        poll=poll,
    )
    balance = ledger_balance(
        budget.ledger(),
        budget.ledger_name,
        requested_total=budget.total,
        planned=(PlannedRelease(delta=budget.delta, sampling_rate=sampling_rate),),
        poll=poll,
    )
    lines = [
        f"per release: epsilon {budget.epsilon:g}, delta {budget.delta:g} (add/remove one image)",
        f"calibrated noise multiplier z = {comparison.noise_multiplier:.4g} at q={sampling_rate:g}",
        f"expected noise / signal bound for n_hat={dataset_size}, D={dimension}, q={sampling_rate:g}: "
        f"{comparison.relative_noise:.3g}",
        f"same figure under the paper's calibration (classical bound, replace-one): "
        f"{comparison.paper_relative_noise:.3g}  -> exact accounting needs "
        f"{comparison.ratio:.2f}x the paper's noise",
        balance_line(balance),
    ]
    warnings = []
    if comparison.relative_noise > 1:
        warnings.append(
            "the noise is larger than the signal: use more images, a larger epsilon, fewer "
            "vectors (smaller D), or q = 1."
        )
    warning = delta_warning(budget.delta, dataset_size)
    if warning:
        warnings.append(warning)
    allowed = balance.next_releases[0]
    if budget.epsilon > allowed.epsilon:
        warnings.append(
            f"a release at epsilon {budget.epsilon:g} and q = {sampling_rate:g} would be refused "
            f"by the ledger: {next_release_line(allowed, balance.total)}."
        )
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines), balance
