"""Readable reports of the Privacy Budget and DP Privacy Planner nodes (public values only)."""

from __future__ import annotations

from collections.abc import Callable

from .accounting import noise_comparison
from .budget import PrivacyBudget
from .planner import LedgerBalance, ledger_balance
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


def balance_line(balance: LedgerBalance) -> str:
    """One line: what the collection has spent and has left, with a warning when nearly spent."""
    if balance.releases == 0:
        line = (
            f"ledger '{balance.collection}': no release recorded yet; total epsilon "
            f"{balance.total.epsilon:g} at delta {balance.total.delta:g} available"
        )
    else:
        line = (
            f"ledger '{balance.collection}': {balance.releases} release(s), epsilon spent "
            f"{balance.spent:.4g} of {balance.total.epsilon:g} (PLD composition at delta "
            f"{balance.total.delta:g}, the non-adaptive estimate), remaining "
            f"{balance.remaining:.4g}"
        )
    if balance.next_release_epsilon is not None:
        line += f"; the next release can use epsilon <= {balance.next_release_epsilon:.3g}"
    if balance.spent >= NEARLY_SPENT * balance.total.epsilon:
        line += "\nWARNING: this collection's budget is nearly spent."
    return line


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
        delta=budget.delta,
        sampling_rate=sampling_rate,
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
    if balance.next_release_epsilon is not None and budget.epsilon > balance.next_release_epsilon:
        warnings.append(
            f"a release at epsilon {budget.epsilon:g} would be refused by the ledger: at most "
            f"{balance.next_release_epsilon:.3g} is left for the next one."
        )
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines), balance
