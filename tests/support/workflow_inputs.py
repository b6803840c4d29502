"""Inputs a shipped workflow expects to find in ComfyUI's folders, made up for the tests."""

from __future__ import annotations


def prepare_inputs(workflow: dict, server) -> None:
    """Create whatever the workflow's loaders read (nothing yet for budget-only workflows)."""
    for node in workflow["nodes"]:
        preparer = PREPARERS.get(node["type"])
        if preparer is not None:
            preparer(node, server)


PREPARERS: dict = {}
