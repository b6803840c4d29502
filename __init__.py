"""comfyui-dp-adapt: differentially private style adaptation nodes for ComfyUI.

ComfyUI imports this folder as a package (under whatever name it was cloned as) and reads
the two mappings below. Registration never raises: a failure is logged with its cause and
the pack registers no nodes, so ComfyUI itself keeps starting.
"""

import logging

try:
    from .nodes.registry import build_mappings

    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build_mappings()
except Exception:
    logging.getLogger(__name__).exception("comfyui-dp-adapt failed to register its nodes")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

try:
    from .nodes.ledger_route import register_ledger_route

    # The Privacy Budget node's live ledger balance (nodes/ledger_route.py), when served.
    register_ledger_route()
except Exception:
    logging.getLogger(__name__).exception("comfyui-dp-adapt could not add its ledger route")

# The small web extension that draws each DP node's report on the node (web/dp_report.js).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
