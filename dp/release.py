"""One DP release from start to end: plan (calibrate + budget check), record, noise, report.

Shared by every node that releases something derived from private images, so that the
order of DP_SPEC sections 2 and 7 holds everywhere:
1. ``plan_release`` calibrates the noise for the budget's (epsilon, delta) and the sampling
   rate, and refuses at once if the ledger cannot afford the release (before any work);
2. the caller computes per-image vectors of the Poisson-sampled images;
3. ``execute_release`` bounds them, records the release in the ledger (under its lock,
   re-checking the budget), and only then draws the noise (mechanism M1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .accounting import Calibration, calibrate_noise_multiplier, noise_comparison
from .budget import PrivacyBudget
from .errors import BudgetExceededError, InvalidParameterError
from .ledger import BudgetCheck
from .mechanism import AggregateRelease, BoundMode, release_noisy_aggregate
from .validation import check_positive_int, check_sampling_rate, delta_warning


@dataclass(frozen=True)
class ReleasePlan:
    """Everything public about a release before it happens."""

    budget: PrivacyBudget
    fingerprint: str
    dataset_size: int
    sampling_rate: float
    calibration: Calibration
    before: BudgetCheck
    warnings: tuple[str, ...]

    @property
    def noise_multiplier(self) -> float:
        return self.calibration.noise_multiplier


def plan_release(
    budget: PrivacyBudget, *, fingerprint: str, dataset_size: int, sampling_rate: float
) -> ReleasePlan:
    """Calibrate and check the ledger; raises BudgetExceededError if it cannot be afforded."""
    if not isinstance(budget, PrivacyBudget):
        raise InvalidParameterError(
            f"budget must come from the Privacy Budget node, got {type(budget).__name__}."
        )
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise InvalidParameterError(
            "fingerprint is empty: connect it from DP Load Private Images, it identifies the "
            "dataset in the budget ledger."
        )
    check_positive_int("dataset_size", dataset_size)
    check_sampling_rate(sampling_rate)
    calibration = calibrate_noise_multiplier(
        epsilon=budget.epsilon, delta=budget.delta, sampling_rate=sampling_rate
    )
    check = budget.ledger().check(
        budget.ledger_name, fingerprint, calibration.event, total=budget.total
    )
    if not check.ok:
        raise BudgetExceededError(_refusal(budget, check))
    warning = delta_warning(budget.delta, dataset_size)
    return ReleasePlan(
        budget=budget,
        fingerprint=fingerprint,
        dataset_size=dataset_size,
        sampling_rate=sampling_rate,
        calibration=calibration,
        before=check,
        warnings=(warning,) if warning else (),
    )


def execute_release(
    plan: ReleasePlan,
    vectors: torch.Tensor,
    *,
    centre: torch.Tensor,
    clip_norm: float,
    mode: BoundMode,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    label: str = "",
) -> AggregateRelease:
    """Mechanism M1 on the kept images' ``vectors`` (m, D), ledger record first."""
    budget = plan.budget
    ledger = budget.ledger()

    def record(event) -> None:
        ledger.record(budget.ledger_name, plan.fingerprint, event, total=budget.total, label=label)

    return release_noisy_aggregate(
        vectors,
        centre=centre,
        clip_norm=clip_norm,
        noise_multiplier=plan.noise_multiplier,
        sampling_rate=plan.sampling_rate,
        dataset_size=plan.dataset_size,
        mode=mode,
        before_noise=record,
        postprocess=postprocess,
    )


def release_report(
    plan: ReleasePlan, release: AggregateRelease, *, extra_lines: Sequence[str] = ()
) -> str:
    """Readable summary of a finished release: guarantee, noise, ledger balance, warnings."""
    budget = plan.budget
    cal = plan.calibration
    comparison = noise_comparison(
        epsilon=budget.epsilon,
        delta=budget.delta,
        clip_norm=release.clip_norm,
        dataset_size=release.dataset_size,
        sampling_rate=release.sampling_rate,
        dimension=release.dimension,
    )
    ledger = budget.ledger()
    spent = ledger.spent(budget.ledger_name, plan.fingerprint, delta=budget.total.delta)
    lines = [
        f"guarantee: ({cal.epsilon_achieved:.4g}, {cal.delta:.3g})-DP for this release "
        f"(target epsilon {cal.epsilon_target:g}), add/remove one image",
        f"noise multiplier z = {release.noise_multiplier:.4g}; noise std on the sum = "
        f"{release.noise_multiplier * release.clip_norm:.4g} (C = {release.clip_norm:g})",
        f"sampling rate q = {release.sampling_rate:g}; declared dataset size n = {release.dataset_size}; "
        f"dimension D = {release.dimension}; bound mode: {release.mode.value}",
        f"expected noise / signal bound: {comparison.relative_noise:.3g} "
        f"(paper's calibration: {comparison.paper_relative_noise:.3g})",
        f"ledger '{budget.ledger_name}': epsilon spent {spent:.4g} of {budget.total.epsilon:g} "
        f"(at delta {budget.total.delta:g}), remaining {max(0.0, budget.total.epsilon - spent):.4g}",
        *extra_lines,
        *(f"WARNING: {w}" for w in plan.warnings),
    ]
    if spent >= 0.8 * budget.total.epsilon:
        lines.append("WARNING: this dataset's budget is nearly spent.")
    return "\n".join(lines)


def _refusal(budget: PrivacyBudget, check: BudgetCheck) -> str:
    return (
        f"privacy budget exhausted for ledger '{budget.ledger_name}': spent epsilon "
        f"{check.spent:.4g}, this release costs {check.requested:.4g}, together "
        f"{check.total_after:.4g} > total budget {budget.total.epsilon:g} (delta "
        f"{budget.total.delta:g}). Nothing was trained or released. Lower epsilon, or use a "
        "new dataset."
    )
