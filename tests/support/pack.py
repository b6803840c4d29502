"""What the pack is expected to register, read from its own modules (not hard-coded)."""

from __future__ import annotations

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = PACK_ROOT / "workflows"


def expected_node_types(include_testing: bool = False) -> set[str]:
    from comfyui_dp_adapt.nodes import registry, tiny_loaders

    types: set[str] = set()
    for module in registry._node_modules():
        types |= set(module.NODE_CLASS_MAPPINGS)
    if include_testing:
        types |= set(tiny_loaders.NODE_CLASS_MAPPINGS)
    return types


def shipped_workflows() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))
