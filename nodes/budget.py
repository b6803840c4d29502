"""The "Privacy Budget" node: one place to state (epsilon, delta), the total and the ledger."""

from __future__ import annotations

import logging

from . import comfy_compat
from .dependencies import require_runtime_packages

logger = logging.getLogger(__name__)

BUDGET_TYPE = "DP_BUDGET"
LEDGER_SUBDIRECTORY = ("dp_adapt", "ledgers")


def private_release_inputs() -> dict:
    """The inputs every releasing node takes, in this order: the private images with their
    public size and fingerprint (from DP Load Private Images) and the budget."""
    return {
        "images": ("IMAGE", {"tooltip": "The private images, from DP Load Private Images."}),
        "dataset_size": (
            "INT",
            {
                "default": 1,
                "min": 1,
                "max": 10_000_000,
                "tooltip": "Number of private images n (public), from DP Load Private Images.",
            },
        ),
        "fingerprint": (
            "STRING",
            {
                "default": "",
                "tooltip": "Content fingerprint of the image folder, from DP Load Private Images; "
                "identifies the dataset in the ledger.",
            },
        ),
        "budget": (BUDGET_TYPE, {"tooltip": "From the Privacy Budget node."}),
    }


def check_private_batch(images, dataset_size) -> None:
    """The private IMAGE batch and its declared n must agree, and n must exceed 1."""
    import torch

    from ..dp.errors import InvalidParameterError

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidParameterError(
            f"images must be a non-empty IMAGE batch (n, height, width, channels), got {shape}."
        )
    if images.shape[-1] < 3:
        raise InvalidParameterError(
            f"images must have at least 3 colour channels, got {images.shape[-1]}."
        )
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int):
        raise InvalidParameterError(
            f"dataset_size must be an integer, got dataset_size={dataset_size!r}."
        )
    if images.shape[0] != dataset_size:
        raise InvalidParameterError(
            f"dataset_size={dataset_size} but the image batch holds {images.shape[0]} images; "
            "connect both from the same DP Load Private Images node."
        )
    if dataset_size < 2:
        raise InvalidParameterError(
            "a DP release needs more than one private image: with n=1 the noise has to hide the "
            "only image and the result is pure noise. Add images to the folder."
        )


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
    """Ledgers live under ComfyUI's user directory (DP_SPEC section 7)."""
    return comfy_compat.user_directory().joinpath(*LEDGER_SUBDIRECTORY)


class PrivacyBudgetNode:
    """States the privacy budget that the DP nodes of a workflow calibrate to and spend."""

    CATEGORY = "DP Adapt"
    RETURN_TYPES = (BUDGET_TYPE, "STRING")
    RETURN_NAMES = ("budget", "report")
    OUTPUT_TOOLTIPS = (
        "Connect to the budget input of a DP node.",
        "Readable report: noise multiplier, expected noise, ledger balance and warnings.",
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
                        "max": 100.0,
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
                        "max": 100.0,
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
                "report_dataset_size": (
                    "INT",
                    {
                        "default": 100,
                        "min": 1,
                        "max": 10_000_000,
                        "tooltip": "Report only: number of private images, to show the expected "
                        "noise and the delta >= 1/n warning.",
                    },
                ),
                "report_dimension": (
                    "INT",
                    {
                        "default": 768,
                        "min": 1,
                        "max": 1_000_000,
                        "tooltip": "Report only: length of each released vector (e.g. 768 for one SD1.x "
                        "token, 768 x number of vectors for a multi-vector token).",
                    },
                ),
                "report_sampling_rate": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Report only: the sampling rate q you plan to use in the DP node.",
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
        report_dataset_size,
        report_dimension,
        report_sampling_rate,
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
        )
        report = budget_report(
            budget,
            dataset_size=report_dataset_size,
            dimension=report_dimension,
            sampling_rate=report_sampling_rate,
        )
        logger.info("Privacy Budget:\n%s", report)
        return {"ui": {"text": [report]}, "result": (budget, report)}


NODE_CLASS_MAPPINGS = {"DPAdaptPrivacyBudget": PrivacyBudgetNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptPrivacyBudget": "Privacy Budget"}
