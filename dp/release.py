"""One DP release from start to end: plan, report, commit (ledger record + noise), reuse.

Shared by every node that releases something derived from private images, so that the
order of docs/privacy.md §2 and §7 holds everywhere:
1. ``plan_release`` calibrates the noise for the budget's (epsilon, delta) and sampling
   rate, looks the request up in the ledger (identical settings on identical images reuse
   the recorded release and spend nothing) and refuses at once if the collection cannot
   afford a new release (before any work);
2. the caller computes one vector per private image (ALL images, constant work: sampling
   happens afterwards, so the work never depends on which images are sampled), and builds
   its report and checks its output file with ``release_report`` (before the record: nothing
   after the record may fail for a reason that could have been checked before it);
3. ``execute_release`` commits under the ledger's lock: it re-checks the budget, learns
   which images still have budget (the others contribute 0, silently), Poisson-samples,
   runs mechanism M1 and stores the public result with the record, in one step.

The released estimate is public; everything else computed here (which images were sampled
or excluded, how many there are) stays inside and is never returned.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .accounting import Calibration, calibrate_noise_multiplier, noise_comparison
from .budget import PrivacyBudget
from .errors import BudgetExceededError, InvalidParameterError, LedgerCorruptError
from .ledger import BudgetCheck, RecordedRelease, TotalBudget
from .mechanism import BoundMode, poisson_sample, release_noisy_aggregate
from .report import NEARLY_SPENT
from .validation import check_sampling_rate, delta_warning


@dataclass(frozen=True)
class ReleasePlan:
    """Everything public about a release before it happens.

    ``reused``: the recorded release with identical settings on identical images, if any;
    the caller then skips all work and publishes it again (``reused_estimate``).
    ``before``: the collection's budget check for a new release (None when reused).
    ``key_check``: the check value of the fingerprint key the image keys were made under
    (``dp.fingerprint.key_check_value``), passed on to the ledger commit.
    """

    budget: PrivacyBudget
    sampling_rate: float
    calibration: Calibration
    request_key: str
    reused: RecordedRelease | None
    before: BudgetCheck | None
    warnings: tuple[str, ...]
    key_check: str | None = None

    @property
    def noise_multiplier(self) -> float:
        return self.calibration.noise_multiplier

    @property
    def declared_dataset_size(self) -> int:
        return self.budget.declared_dataset_size


@dataclass(frozen=True)
class ReleaseOutcome:
    """A finished (or reused) release: the public estimate (D,) float64 and its record."""

    estimate: torch.Tensor
    release_id: str
    reused: bool


def request_key(*, image_keys: Sequence[str], settings: Mapping[str, object]) -> str:
    """What makes two requests "the same release": the multiset of image keys (keyed
    hashes, see ``dp/private_set.py``) and every public setting, hashed with SHA-256."""
    try:
        canonical = json.dumps(
            {"images": sorted(image_keys), "settings": dict(settings)},
            sort_keys=True,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as error:
        raise InvalidParameterError(
            f"release settings must be plain JSON values ({error})."
        ) from error
    return "request-sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def plan_release(
    budget: PrivacyBudget,
    *,
    image_keys: Sequence[str],
    sampling_rate: float,
    settings: Mapping[str, object],
    poll: Callable[[], None] | None = None,
    calibrate: Callable[..., Calibration] = calibrate_noise_multiplier,
    key_check: str | None = None,
) -> ReleasePlan:
    """Calibrate, look for an identical recorded release, check the collection's budget.

    ``calibrate(epsilon=, delta=, sampling_rate=, poll=)`` gives the noise multiplier and
    DpEvent of the release (one M1 release by default; DP-SGD passes its own). Raises
    BudgetExceededError (a public decision: it depends on the collection's recorded
    releases only, never on the images) if a new release cannot be afforded, and
    LedgerError if the ledger's images were recorded under another fingerprint key than
    ``key_check`` (``Ledger.check_key``) or a new release could not be recorded
    (``Ledger.check_writable``): all before any training or embedding starts.
    """
    if not isinstance(budget, PrivacyBudget):
        raise InvalidParameterError(
            f"budget must come from the Privacy Budget node, got {type(budget).__name__}."
        )
    q = check_sampling_rate(sampling_rate)
    ledger = budget.ledger()
    ledger.check_key(key_check)
    key = request_key(
        image_keys=image_keys,
        settings={
            **settings,
            "epsilon": budget.epsilon,
            "delta": budget.delta,
            "total": [budget.total.epsilon, budget.total.delta],
            "collection": budget.ledger_name,
            "declared_dataset_size": budget.declared_dataset_size,
            "sampling_rate": q,
        },
    )
    reused = ledger.find_release(key)
    if reused is None:
        ledger.check_writable()  # before calibration, training or embedding: nothing wasted
    calibration = calibrate(epsilon=budget.epsilon, delta=budget.delta, sampling_rate=q, poll=poll)
    before = None
    if reused is None:
        before = ledger.check(
            collection=budget.ledger_name, event=calibration.event, total=budget.total
        )
        if not before.ok:
            raise BudgetExceededError(_refusal(budget, before))
    warning = delta_warning(budget.delta, budget.declared_dataset_size)
    return ReleasePlan(
        budget=budget,
        sampling_rate=q,
        calibration=calibration,
        request_key=key,
        reused=reused,
        before=before,
        warnings=(warning,) if warning else (),
        key_check=key_check,
    )


@dataclass(frozen=True)
class ReleaseReport:
    """A release's report, built before its record; the release id it names is only known
    after the commit, so ``published_report`` completes it. Public values only.

    ``details``: the lines under the headline (noise, settings, warnings); ``spent_after``:
    the collection's PLD estimate after the release (for a reused release, when it was
    published again), None when unknown; ``reused_id``: the recorded release the plan reuses.
    """

    collection: str
    epsilon: float
    delta: float
    total: TotalBudget
    spent_after: float | None
    reused_id: str | None
    details: tuple[str, ...]

    def published(self, outcome: ReleaseOutcome) -> tuple[str, dict]:
        """``published_report(self, outcome)``: the text and the node's ui output."""
        return published_report(self, outcome)


def release_report(
    plan: ReleasePlan,
    *,
    dimension: int,
    clip_norm: float,
    mode: BoundMode,
    extra_lines: Sequence[str] = (),
    noise_lines: Sequence[str] | None = None,
    poll: Callable[[], None] | None = None,
) -> ReleaseReport:
    """The release's report, built BEFORE the record (docs/privacy.md §7). Public values only:
    the budget, z, C, q, the declared n_hat, D and the collection's ledger balance.

    ``noise_lines`` replace the expected-noise line of one M1 release (DP-SGD states its
    per-step noise instead). Its wording stays true when ComfyUI shows it again from its
    cache: past tense, tied to the release id (``published_report``)."""
    budget = plan.budget
    cal = plan.calibration
    n_hat = plan.declared_dataset_size
    if noise_lines is None:
        comparison = noise_comparison(
            epsilon=budget.epsilon,
            delta=budget.delta,
            clip_norm=clip_norm,
            dataset_size=n_hat,
            sampling_rate=plan.sampling_rate,
            dimension=dimension,
            poll=poll,
        )
        noise_lines = (
            f"expected noise / signal bound: {comparison.relative_noise:.3g} "
            f"(paper's calibration: {comparison.paper_relative_noise:.3g})",
        )
    total = budget.total
    if plan.reused is not None:
        # Reading the ledger here is before any record (a reuse records nothing).
        spent_after = budget.ledger().spent(budget.ledger_name, delta=total.delta)
    else:
        spent_after = plan.before.total_after
    lines = [
        f"guarantee: ({cal.epsilon_achieved:.4g}, {cal.delta:.3g})-DP (target epsilon "
        f"{cal.epsilon_target:g}), add/remove one image",
        f"noise multiplier z = {cal.noise_multiplier:.4g}; noise std on the sum = "
        f"{cal.noise_multiplier * clip_norm:.4g} (C = {clip_norm:g})",
        f"sampling rate q = {plan.sampling_rate:g}; declared dataset size n_hat = {n_hat} "
        f"(public, never read from the images); dimension D = {dimension}; bound mode: "
        f"{mode.value}",
        *noise_lines,
        *extra_lines,
    ]
    if plan.reused is None and spent_after >= NEARLY_SPENT * total.epsilon:
        lines.append("WARNING: this collection's budget was nearly spent after this release.")
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return ReleaseReport(
        collection=budget.ledger_name,
        epsilon=cal.epsilon_achieved,
        delta=cal.delta,
        total=total,
        spent_after=spent_after,
        reused_id=plan.reused.release_id if plan.reused is not None else None,
        details=tuple(lines),
    )


def published_report(report: ReleaseReport, outcome: ReleaseOutcome) -> tuple[str, dict]:
    """The report's text and the node's ui output (``text`` and the structured ``dp_card``
    the canvas draws) once the release id is known. Pure formatting: it cannot fail.

    A release the commit itself found recorded (an identical request recorded between the
    plan and the commit) is reported as reused, with no collection figure."""
    rid = outcome.release_id[:12]
    total = report.total
    reused = outcome.reused
    spent = report.spent_after if (not reused or report.reused_id is not None) else None
    at = (
        f"; collection '{report.collection}' stood at eps {spent:.4g} of {total.epsilon:g}"
        if spent is not None
        else ""
    )
    if reused:
        headline = (
            f"Published again: release {rid} (recorded earlier, (eps = {report.epsilon:.4g}, "
            f"delta = {report.delta:.3g})); nothing spent"
            + (f"{at} then (PLD estimate)" if at else "")
        )
        ledger_line = f"release {rid} (recorded earlier) published again; nothing spent"
    else:
        headline = (
            f"Private: (eps = {report.epsilon:.4g}, delta = {report.delta:.3g}) for release "
            f"{rid}{at} after it (PLD estimate)"
        )
        ledger_line = (
            f"release {rid} spent eps {report.epsilon:.4g} (its own guarantee, at delta "
            f"{report.delta:.3g}); the collection '{report.collection}' stood at eps "
            f"{spent:.4g} of {total.epsilon:g} after it (at delta {total.delta:g}; PLD "
            "composition, the non-adaptive estimate: the ledger decides by its fully adaptive "
            "filter)"
        )
    text = "\n".join([headline, ledger_line, *report.details])
    card = {
        "headline": headline,
        "epsilon": report.epsilon,
        "delta": report.delta,
        "spent": spent,
        "total": total.epsilon,
        "total_delta": total.delta,
        "collection": report.collection,
        "release": rid,
        "reused": reused,
    }
    return text, {"text": [text], "dp_card": [card]}


def execute_release(
    plan: ReleasePlan,
    vectors: torch.Tensor,
    *,
    image_keys: Sequence[str],
    centre: torch.Tensor,
    clip_norm: float,
    mode: BoundMode,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    label: str = "",
) -> ReleaseOutcome:
    """Mechanism M1 on one vector per image, recorded and released in one ledger commit.

    ``vectors``: (n, D), row i computed from image i alone, ``image_keys[i]`` its key; all
    n images, sampled or not. Under the ledger's lock: the collection's budget is checked
    again; images whose own budget is spent are excluded (Feldman & Zrnic 2021, individual
    privacy filter: an excluded image contributes 0 and is not charged); the images are
    Poisson-sampled at q from OS entropy; M1 bounds, sums, adds N(0, (zC)^2) and divides
    by q n_hat; the estimate is stored with the record. A request recorded before is not
    released again (its stored estimate is returned).
    """
    if vectors.dim() != 2 or vectors.shape[0] != len(image_keys):
        raise InvalidParameterError("vectors must be (n, D) with one row per private image key.")

    def release(included: tuple[bool, ...]) -> torch.Tensor:
        kept = poisson_sample(len(image_keys), sampling_rate=plan.sampling_rate)
        rows = [i for i in kept.indices if included[i]]
        return release_noisy_aggregate(
            vectors[rows],
            centre=centre,
            clip_norm=clip_norm,
            noise_multiplier=plan.noise_multiplier,
            sampling_rate=plan.sampling_rate,
            dataset_size=plan.declared_dataset_size,
            mode=mode,
            postprocess=postprocess,
        ).estimate

    return commit_release(
        plan, image_keys=image_keys, release=release, dimension=int(vectors.shape[1]), label=label
    )


def commit_release(
    plan: ReleasePlan,
    *,
    image_keys: Sequence[str],
    release: Callable[[tuple[bool, ...]], torch.Tensor],
    dimension: int,
    label: str = "",
) -> ReleaseOutcome:
    """Run ``release(included)`` inside the ledger's commit and store its (D,) result.

    ``included[i]`` says whether image i still has budget (excluded images must contribute
    nothing). The ledger refuses the commit if ``plan.key_check`` differs from the key check
    its image entries were recorded under. Everything random and private happens inside
    ``release``, under the lock, so nothing exists outside before the record is durable; if
    it raises (Cancel), nothing is recorded or spent.
    """
    budget = plan.budget
    commit = budget.ledger().commit(
        collection=budget.ledger_name,
        total=budget.total,
        event=plan.calibration.event,
        image_keys=list(image_keys),
        request_key=plan.request_key,
        label=label,
        release=lambda included: encode_estimate(release(included)),
        key_check=plan.key_check,
    )
    estimate = _recorded_estimate(commit.result, commit.release_id, dimension)
    return ReleaseOutcome(estimate=estimate, release_id=commit.release_id, reused=commit.reused)


def reused_estimate(plan: ReleasePlan, *, dimension: int) -> ReleaseOutcome:
    """The recorded estimate of a reused release (``plan.reused``), checked for its shape."""
    if plan.reused is None:
        raise InvalidParameterError("this plan has no recorded release to reuse.")
    release_id = plan.reused.release_id
    estimate = _recorded_estimate(plan.reused.result, release_id, dimension)
    return ReleaseOutcome(estimate=estimate, release_id=release_id, reused=True)


def _recorded_estimate(result: Mapping[str, object], release_id: str, dimension: int):
    estimate = decode_estimate(result)
    if estimate.shape != (dimension,):
        raise LedgerCorruptError(
            f"the recorded release {release_id[:12]} holds an estimate of another dimension "
            f"than {dimension}."
        )
    return estimate


def encode_estimate(estimate: torch.Tensor) -> dict:
    """A (D,) estimate as a JSON object for the ledger: little-endian float64, base64."""
    values = estimate.detach().to("cpu", torch.float64).numpy().astype("<f8")
    return {"estimate_f64_b64": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_estimate(result: Mapping[str, object]) -> torch.Tensor:
    try:
        raw = base64.b64decode(str(result["estimate_f64_b64"]), validate=True)
        values = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    except (KeyError, ValueError, TypeError) as error:
        raise LedgerCorruptError(
            f"a recorded release's estimate cannot be read ({type(error).__name__})."
        ) from error
    if values.size == 0 or not np.isfinite(values).all():
        raise LedgerCorruptError("a recorded release's estimate is empty or not finite.")
    return torch.from_numpy(values.copy())


def _refusal(budget: PrivacyBudget, check: BudgetCheck) -> str:
    advice = (
        ""
        if check.decision is not None and check.decision.mixed
        else " Lower epsilon, or start a new collection (images it shares with this one keep "
        "their own spending)."
    )
    return (
        f"privacy budget refused for ledger '{budget.ledger_name}': {check.reason()}. "
        f"Non-adaptive estimate (PLD composition): spent epsilon {check.spent:.4g}, this "
        f"release {check.requested:.4g}, together {check.total_after:.4g}, of total budget "
        f"{budget.total.epsilon:g} (delta {budget.total.delta:g}). Nothing was trained or "
        f"released.{advice}"
    )
