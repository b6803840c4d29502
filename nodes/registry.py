"""Collects the pack's node classes into ComfyUI's two registration mappings."""

from __future__ import annotations

import logging

from . import comfy_compat
from .dependencies import install_hint, missing_packages

logger = logging.getLogger(__name__)


def _node_modules():
    from . import (
        budget,
        clip_aggregate,
        demo_model,
        guidance_sampler,
        planner,
        private_images,
        style_prompt,
        textual_inversion,
        token_preview,
    )

    return [
        private_images,
        budget,
        planner,
        textual_inversion,
        style_prompt,
        token_preview,
        clip_aggregate,
        guidance_sampler,
        demo_model,
    ]


def build_mappings() -> tuple[dict, dict]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` for every node of the pack.

    The nodes register even when a runtime package is missing, so the workflow still opens;
    running such a node raises the install hint (see ``dependencies.py``).
    """
    missing = missing_packages()
    if missing:
        logger.error(install_hint(missing))
    classes: dict = {}
    names: dict = {}
    for module in _node_modules():
        classes.update(module.NODE_CLASS_MAPPINGS)
        names.update(module.NODE_DISPLAY_NAME_MAPPINGS)
    from .tiny_loaders import NODE_CLASS_MAPPINGS as TINY
    from .tiny_loaders import NODE_DISPLAY_NAME_MAPPINGS as TINY_NAMES
    from .tiny_loaders import TINY_MODELS_FLAG

    if comfy_compat.environment_flag(TINY_MODELS_FLAG):
        classes.update(TINY)
        names.update(TINY_NAMES)
    return classes, names
