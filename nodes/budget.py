"""The "Privacy Budget" node: one place to state (epsilon, delta), the total and the ledger."""

from __future__ import annotations

import logging

from ..dp.validation import MAX_DECLARED_SIZE, MAX_EPSILON, MIN_DECLARED_SIZE
from . import comfy_compat
from .dependencies import require_runtime_packages

logger = logging.getLogger(__name__)

BUDGET_TYPE = "DP_BUDGET"
LEDGER_SUBDIRECTORY = ("dp_adapt", "ledgers")


def private_release_inputs() -> dict:
    """The inputs every releasing node takes: the private images (from DP Load Private
    Images; a socket of the pack's own type, so no core node can show or save them) and
    the budget (which also carries the declared, public dataset size n_hat)."""
    from ..dp.private_set import SOCKET_TYPE

    return {
        "private_images": (
            SOCKET_TYPE,
            {"tooltip": "The private images, from DP Load Private Images."},
        ),
        "budget": (BUDGET_TYPE, {"tooltip": "From the Privacy Budget node."}),
    }


SAMPLING_RATE_INPUT = (
    "FLOAT",
    {
        "default": 1.0,
        "min": 0.0,
        "max": 1.0,
        "step": 0.01,
        "tooltip": "Probability q that each image takes part (Poisson sampling). For one "
        "release q = 1 gives the least noise.",
    },
)


def ledger_directory():
    """Ledgers live under ComfyUI's user directory (docs/privacy.md §7)."""
    return comfy_compat.user_directory().joinpath(*LEDGER_SUBDIRECTORY)


class PrivacyBudgetNode:
    """States the privacy budget that the DP nodes of a workflow calibrate to and spend."""

    CATEGORY = "DP Adapt"
    RETURN_TYPES = (BUDGET_TYPE, "STRING")
    RETURN_NAMES = ("budget", "report")
    OUTPUT_TOOLTIPS = (
        "Connect to the budget input of a DP node.",
        "Readable report: the per-release target, the collection's total and warnings.",
    )
    FUNCTION = "make_budget"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Differential-privacy budget for one private dataset. Each run of a DP node is one "
        "release calibrated to (epsilon, delta) and recorded in the ledger; the ledger refuses a "
        "release that would take the dataset past its total budget."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ledger_name": (
                    "STRING",
                    {
                        "default": "my-private-dataset",
                        "tooltip": "Name of this dataset's budget ledger (a file in ComfyUI's user "
                        "folder). Use one name per private image collection.",
                    },
                ),
                "epsilon": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": MAX_EPSILON,
                        "step": 0.1,
                        "tooltip": "Privacy loss allowed for ONE release (one run of a DP node). "
                        "Smaller is more private and noisier; 1 is a common choice.",
                    },
                ),
                "delta": (
                    "FLOAT",
                    {
                        "default": 1e-5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 1e-7,
                        "round": False,
                        "tooltip": "Probability that the epsilon guarantee fails, per release. Keep it "
                        "well below 1/(number of images).",
                    },
                ),
                "total_epsilon": (
                    "FLOAT",
                    {
                        "default": 4.0,
                        "min": 0.0,
                        "max": MAX_EPSILON,
                        "step": 0.1,
                        "tooltip": "Total privacy loss allowed for this dataset over ALL releases "
                        "recorded in the ledger (composed exactly, not just added up).",
                    },
                ),
                "total_delta": (
                    "FLOAT",
                    {
                        "default": 1e-5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 1e-7,
                        "round": False,
                        "tooltip": "delta at which the total epsilon is measured.",
                    },
                ),
                "declared_dataset_size": (
                    "INT",
                    {
                        "default": 100,
                        "min": MIN_DECLARED_SIZE,
                        "max": MAX_DECLARED_SIZE,
                        "tooltip": "n_hat: the collection's size as you declare it publicly (a round "
                        "figure near the real count). The real count is private, so the pack never "
                        "reads it from the folder: the released average divides by q x n_hat, and "
                        "training is padded to n_hat images so its duration hides the real count "
                        f"(so n_hat sets the run time: at most {MAX_DECLARED_SIZE:,}).",
                    },
                ),
            }
        }

    def make_budget(
        self,
        ledger_name,
        epsilon,
        delta,
        total_epsilon,
        total_delta,
        declared_dataset_size,
    ):
        require_runtime_packages()
        from ..dp.budget import PrivacyBudget
        from ..dp.ledger import TotalBudget
        from ..dp.report import budget_report

        budget = PrivacyBudget(
            epsilon=epsilon,
            delta=delta,
            total=TotalBudget(epsilon=total_epsilon, delta=total_delta),
            ledger_name=ledger_name,
            ledger_directory=ledger_directory(),
            declared_dataset_size=declared_dataset_size,
        )
        report = budget_report(budget)
        logger.info("Privacy Budget:\n%s", report)
        return {"ui": {"text": [report]}, "result": (budget, report)}


NODE_CLASS_MAPPINGS = {"DPAdaptPrivacyBudget": PrivacyBudgetNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptPrivacyBudget": "Privacy Budget"}
