"""A canary audit through the node path (not only mechanism M1): the DP Aggregate CLIP
Embeddings node, with its ledger, padding, key handling and post-processing, run many times
on a collection with and without one canary image.

An attacker who sees one release scores it by its cosine with the canary's CLIP direction
and guesses "canary present" above a threshold. For any (epsilon, delta)-DP release,
TPR <= e^epsilon FPR + delta (Kairouz, Oh, Viswanath 2015), so
epsilon >= log((TPR - delta) / FPR); with Clopper-Pearson bounds on TPR and FPR this gives a
lower bound on the true epsilon that holds with high probability (Jagielski, Ullman, Oprea
2020, "Auditing differentially private machine learning"). It must stay below the claim;
a negative control with the noise switched off shows the audit can see a leak.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow

EPSILON, DELTA = 1.0, 1e-5
TRIALS = 300
CONTROL_TRIALS = 100
THRESHOLDS = 9
CONFIDENCE = 0.05


def _clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    from scipy.stats import beta

    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    )
    return low, high


def empirical_epsilon_lower_bound(with_canary: list[float], without: list[float]) -> float:
    """Largest epsilon lower bound over a few thresholds, from both inequalities
    TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, each rate replaced by its
    one-sided Clopper-Pearson bound (a union bound over the 4 bounds per threshold)."""
    pooled = sorted(with_canary + without)
    alpha = CONFIDENCE / (4 * THRESHOLDS)
    best = 0.0
    for k in range(1, THRESHOLDS + 1):
        threshold = pooled[len(pooled) * k // (THRESHOLDS + 1)]
        tp = sum(s > threshold for s in with_canary)
        fp = sum(s > threshold for s in without)
        tpr_low, _ = _clopper_pearson(tp, len(with_canary), alpha)
        _, fpr_high = _clopper_pearson(fp, len(without), alpha)
        for numerator, denominator in (
            (tpr_low - DELTA, fpr_high),  # TPR <= e^eps FPR + delta
            (1 - fpr_high - DELTA, 1 - tpr_low),  # TNR <= e^eps FNR + delta
        ):
            if numerator > 0 and denominator > 0:
                best = max(best, math.log(numerator / denominator))
            elif numerator > 0:
                best = math.inf
    return best


@pytest.fixture(scope="module")
def audit(comfy, tmp_path_factory):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes.clip_aggregate import DPAggregateCLIPEmbeddingsNode
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    root = tmp_path_factory.mktemp("audit")
    clip_vision = tiny_models.build_tiny_clip_vision()
    base = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    canary = torch.zeros(1, 64, 64, 3)
    canary[:, ::8, :, 0] = 1.0  # red stripes: far from the noise images
    with torch.inference_mode():
        direction = torch.nn.functional.normalize(
            comfy_compat.clip_vision_encode(clip_vision, canary).float(), dim=1
        )[0]
    node = DPAggregateCLIPEmbeddingsNode()
    counter = iter(range(10**9))

    def score(present: bool) -> float:
        images = torch.cat([base, canary]) if present else base
        keys = tuple(f"hmac-sha256:audit-{i}" for i in range(images.shape[0]))
        budget = PrivacyBudget(
            epsilon=EPSILON,
            delta=DELTA,
            total=TotalBudget(epsilon=EPSILON, delta=DELTA),
            ledger_name="audit",
            ledger_directory=root / str(next(counter)),  # a fresh ledger per release
            declared_dataset_size=8,
        )
        with torch.inference_mode():
            target = node.aggregate(clip_vision, private_image_set(images, keys), budget, 1.0, 8)[
                "result"
            ][0]
        return float(target.embedding @ direction)

    return score


def test_empirical_epsilon_through_the_node_stays_below_the_claim(audit):
    with_canary = [audit(True) for _ in range(TRIALS)]
    without = [audit(False) for _ in range(TRIALS)]
    bound = empirical_epsilon_lower_bound(with_canary, without)
    assert bound <= EPSILON, f"empirical epsilon lower bound {bound:.3f} > claimed {EPSILON}"


def test_negative_control_without_noise_is_caught_by_the_same_audit(audit, monkeypatch):
    """Same node path, noise multiplier forced to ~0: the audit must report a leak."""
    from comfyui_dp_adapt.dp import release

    original = release.release_noisy_aggregate

    def noiseless(*args, **kwargs):
        return original(*args, **{**kwargs, "noise_multiplier": 1e-9})

    monkeypatch.setattr(release, "release_noisy_aggregate", noiseless)
    with_canary = [audit(True) for _ in range(CONTROL_TRIALS)]
    without = [audit(False) for _ in range(CONTROL_TRIALS)]
    assert empirical_epsilon_lower_bound(with_canary, without) > EPSILON
