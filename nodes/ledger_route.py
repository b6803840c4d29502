"""A read-only server route for the Privacy Budget node's live ledger balance.

GET /dp_adapt/ledger_balance?name=NAME&total_epsilon=E&total_delta=D answers with the
collection's public balance (releases recorded, epsilon spent and remaining; ``dp/report.py``
``balance_line``). The web extension (web/dp_report.js) asks for it whenever a prompt
finishes and whenever the node's ledger fields change, so the figure on the node is never
older than the last release. Nothing about images is served: per-image records and image
keys stay in the ledger file (docs/privacy.md §7).
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)

ROUTE = "/dp_adapt/ledger_balance"
MARKER = "_comfyui_dp_adapt_ledger_route"


def balance_payload(query) -> dict:
    """The JSON answer for one query (a mapping of strings); raises DpAdaptError on bad input."""
    from ..dp.errors import InvalidParameterError
    from ..dp.ledger import Ledger, TotalBudget, default_ledger_path
    from ..dp.planner import ledger_balance
    from ..dp.report import balance_line
    from .budget import ledger_directory

    try:
        total = TotalBudget(float(query["total_epsilon"]), float(query["total_delta"]))
        name = query["name"]
    except (KeyError, ValueError) as error:
        raise InvalidParameterError(
            f"{ROUTE} needs name, total_epsilon and total_delta ({error!r})."
        ) from error
    balance = ledger_balance(
        Ledger(default_ledger_path(ledger_directory())), name, requested_total=total
    )
    return {
        "collection": balance.collection,
        "releases": balance.releases,
        "spent_epsilon": balance.spent,
        "remaining_epsilon": balance.remaining,
        "total_epsilon": balance.total.epsilon,
        "total_delta": balance.total.delta,
        "line": balance_line(balance),
    }


def register_ledger_route() -> bool:
    """Add the route to ComfyUI's server when one is running (not in headless use)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    # Once per server, even if ComfyUI imports the pack twice (two folders of it in
    # custom_nodes): aiohttp refuses a second route on the same path and the server would
    # not start.
    if getattr(instance, MARKER, False):
        return False
    setattr(instance, MARKER, True)
    from aiohttp import web

    from ..dp.errors import DpAdaptError

    @instance.routes.get(ROUTE)
    async def ledger_balance_route(request):
        try:
            payload = await asyncio.to_thread(balance_payload, dict(request.rel_url.query))
        except DpAdaptError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(payload)

    return True
