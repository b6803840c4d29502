"""The Privacy Budget node's report: what a release at this budget would cost and give."""

from __future__ import annotations

from collections.abc import Callable

from .accounting import calibrate_noise_multiplier, noise_comparison
from .budget import PrivacyBudget
from .validation import check_positive_int, check_sampling_rate, delta_warning

NEARLY_SPENT = 0.8


def budget_report(
    budget: PrivacyBudget,
    *,
    dimension: int,
    sampling_rate: float,
    poll: Callable[[], None] | None = None,
) -> str:
    """Calibrated noise, expected noise relative to the signal (exact vs the paper's
    calibration) at the declared n_hat, the collection's ledger balance, and warnings.
    Public values only."""
    dataset_size = budget.declared_dataset_size
    check_positive_int("dimension", dimension)
    check_sampling_rate(sampling_rate)
    calibration = calibrate_noise_multiplier(
        epsilon=budget.epsilon, delta=budget.delta, sampling_rate=sampling_rate, poll=poll
    )
    comparison = noise_comparison(
        epsilon=budget.epsilon,
        delta=budget.delta,
        clip_norm=1.0,
        dataset_size=dataset_size,
        sampling_rate=sampling_rate,
        dimension=dimension,
        poll=poll,
    )
    lines = [
        f"per release: epsilon {budget.epsilon:g}, delta {budget.delta:g} (add/remove one image)",
        f"calibrated noise multiplier z = {calibration.noise_multiplier:.4g} "
        f"(achieved epsilon {calibration.epsilon_achieved:.4g} <= target)",
        f"expected noise / signal bound for n_hat={dataset_size}, D={dimension}, q={sampling_rate:g}: "
        f"{comparison.relative_noise:.3g}",
        f"same figure under the paper's calibration (classical bound, replace-one): "
        f"{comparison.paper_relative_noise:.3g}  -> exact accounting needs "
        f"{comparison.relative_noise / comparison.paper_relative_noise:.2f}x the paper's noise",
        f"dataset total: epsilon {budget.total.epsilon:g} at delta {budget.total.delta:g}",
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
    ledger = budget.ledger()
    if budget.ledger_name not in ledger.collections():
        lines.append(f"ledger '{budget.ledger_name}': no release recorded yet")
    else:
        spent = ledger.spent(budget.ledger_name, delta=budget.total.delta)
        lines.append(
            f"ledger '{budget.ledger_name}': epsilon spent {spent:.4g}, remaining "
            f"{max(0.0, budget.total.epsilon - spent):.4g}"
        )
        if spent >= NEARLY_SPENT * budget.total.epsilon:
            warnings.append(f"the budget of ledger '{budget.ledger_name}' is nearly spent.")
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)
