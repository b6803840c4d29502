"""Inputs a shipped workflow expects to find in ComfyUI's folders, made up for the tests."""

from __future__ import annotations

from pathlib import Path


def prepare_inputs(workflow: dict, server) -> None:
    """Create whatever the workflow's loaders read from ComfyUI's input folder."""
    for node in workflow["nodes"]:
        preparer = PREPARERS.get(node["type"])
        if preparer is not None:
            preparer(node, server)


def _private_image_folder(node: dict, server) -> None:
    from comfyui_dp_adapt.demo.synthetic_images import write_synthetic_style_set

    if node["widgets_values"][0].startswith("demo:"):
        # The demo's built-in 100 pictures (tests/nodes/test_private_images.py) take minutes
        # on the tiny models; six test pictures exercise the same graph.
        node["widgets_values"][0] = "dp_demo_stand_in"
    folder = Path(server.input_dir) / node["widgets_values"][0]
    if not folder.is_dir():
        folder.mkdir(parents=True)
        write_synthetic_style_set(folder, count=6, size=64)


PREPARERS = {"DPAdaptLoadPrivateImages": _private_image_folder}


# Shipped workflows carry settings for real models; on the tiny in-code models the same
# graph runs with small images and few steps so the whole execution takes seconds.
TINY_MODEL_OVERRIDES = {
    ("DPAdaptLoadPrivateImages", "resolution"): 64,
    # The test folder holds 6 images; a declared n_hat of 8 pads the work to 8.
    ("DPAdaptPrivacyBudget", "declared_dataset_size"): 8,
    ("DPAdaptTextualInversionTrain", "steps"): 3,
    ("EmptyLatentImage", "width"): 64,
    ("EmptyLatentImage", "height"): 64,
    ("EmptyLatentImage", "batch_size"): 1,
    ("KSampler", "steps"): 3,
    ("DPAdaptUniversalGuidanceSampler", "steps"): 3,
    ("DPAdaptStyleTokenPreview", "width"): 64,
    ("DPAdaptStyleTokenPreview", "height"): 64,
    ("DPAdaptStyleTokenPreview", "steps"): 3,
}
