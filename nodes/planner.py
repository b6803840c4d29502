"""The "DP Privacy Planner" node: the noise a budget buys, as a figure, before spending it."""

from __future__ import annotations

import logging

from . import comfy_compat
from .budget import BUDGET_TYPE, SAMPLING_RATE_INPUT
from .dependencies import require_runtime_packages

logger = logging.getLogger(__name__)

SD1_TOKEN_WIDTH = 768


class PrivacyPlannerNode:
    """Plots expected noise against epsilon for a budget, the released vector's size and q."""

    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "report")
    OUTPUT_TOOLTIPS = (
        "Expected noise / signal against epsilon (this pack's exact calibration and the "
        "paper's), with the chosen epsilon and what the ledger allows next marked.",
        "The same figures as text, with the collection's ledger balance.",
    )
    FUNCTION = "plan"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Plan before spending: how much noise a release at this budget adds to a vector of the "
        "given size, for the declared number of images, and how much of the collection's "
        "budget is left. Reads no image and spends nothing."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "budget": (BUDGET_TYPE, {"tooltip": "From the Privacy Budget node."}),
                "dimension": (
                    "INT",
                    {
                        "default": SD1_TOKEN_WIDTH,
                        "min": 1,
                        "max": 1_000_000,
                        "tooltip": "Length D of the released vector: 768 per vector of an SD1.x "
                        "token (768 x vectors for a multi-vector token), the CLIP vision "
                        "embedding's width for DP Aggregate CLIP Embeddings.",
                    },
                ),
                "sampling_rate": SAMPLING_RATE_INPUT,
            }
        }

    @classmethod
    def IS_CHANGED(cls, budget, dimension, sampling_rate):
        # The figure shows the ledger's balance, which other workflows' releases change
        # (public values: the planner reads no image), so it is redrawn on every queue.
        return float("nan")

    def plan(self, budget, dimension, sampling_rate):
        require_runtime_packages()
        import torch

        from ..dp.planner import noise_curve
        from ..dp.report import planner_report
        from .planner_plot import privacy_utility_plot

        poll = comfy_compat.raise_if_cancelled
        report, balance = planner_report(
            budget, dimension=dimension, sampling_rate=sampling_rate, poll=poll
        )
        points = noise_curve(
            delta=budget.delta,
            dataset_size=budget.declared_dataset_size,
            dimension=dimension,
            sampling_rate=sampling_rate,
            poll=poll,
        )
        picture = privacy_utility_plot(
            points,
            epsilon=budget.epsilon,
            balance=balance,
            dataset_size=budget.declared_dataset_size,
            dimension=dimension,
            sampling_rate=sampling_rate,
            delta=budget.delta,
        )
        logger.info("DP Privacy Planner:\n%s", report)
        plot = torch.from_numpy(picture).unsqueeze(0)
        return {"ui": {"text": [report]}, "result": (plot, report)}


NODE_CLASS_MAPPINGS = {"DPAdaptPrivacyPlanner": PrivacyPlannerNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptPrivacyPlanner": "DP Privacy Planner"}
