"""A read-only server route for the Privacy Budget node's live ledger balance.

GET /dp_adapt/ledger_balance?name=NAME&total_epsilon=E&total_delta=D[&delta=d][&plans=P]
answers with the collection's public balance: releases recorded, the PLD estimate of what
was spent and, for each planned release, the largest epsilon the ledger's own filter admits
(``dp/planner.py`` ``next_release``; ``dp/report.py`` ``balance_line``). ``plans`` lists the
planned releases as ``q`` (one release at sampling rate q) or ``q:T`` (DP-SGD, T steps),
comma-separated (default ``1``: one release at q = 1); ``delta`` is the per-release delta
(default: the total's). The web extension (web/dp_report.js) reads the plans from the DP
nodes wired to the budget node and asks whenever a prompt finishes and whenever the node's
ledger fields change, so the figure on the node is never older than the last release.
Nothing about images is served: per-image records and image keys stay in the ledger file
(docs/privacy.md §7).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict

logger = logging.getLogger(__name__)

ROUTE = "/dp_adapt/ledger_balance"
MARKER = "_comfyui_dp_adapt_ledger_route"
MAX_PLANS = 4
_CACHE_SIZE = 64
# Answers per (ledger file state, query): the search for each planned release's largest
# epsilon costs seconds, and the frontend asks again after every prompt.
_answers: OrderedDict[tuple, dict] = OrderedDict()
_answers_lock = threading.Lock()


def parse_plans(text: str, *, delta: float):
    """The planned releases of a ``plans`` query value (see the module docstring)."""
    from ..dp.errors import InvalidParameterError
    from ..dp.planner import PlannedRelease

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not 1 <= len(items) <= MAX_PLANS:
        raise InvalidParameterError(
            f"plans must list 1 to {MAX_PLANS} planned releases ('q' or 'q:T', comma-"
            f"separated), got plans={text!r}."
        )
    plans = []
    for item in items:
        q, _, steps = item.partition(":")
        try:
            plan = PlannedRelease(
                delta=delta,
                sampling_rate=float(q),
                steps=int(steps) if steps else None,
            )
        except ValueError as error:
            raise InvalidParameterError(
                f"a planned release is 'q' or 'q:T' (q a number in (0, 1], T a whole number "
                f"of DP-SGD steps), got {item!r} in plans={text!r}."
            ) from error
        if plan not in plans:
            plans.append(plan)
    return tuple(plans)


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
        delta = float(query.get("delta") or total.delta)
    except (KeyError, ValueError) as error:
        raise InvalidParameterError(
            f"{ROUTE} needs name, total_epsilon and total_delta, and a number as delta if "
            f"given ({error!r})."
        ) from error
    plans = parse_plans(str(query.get("plans") or "1"), delta=delta)
    ledger = Ledger(default_ledger_path(ledger_directory()))
    try:
        stat = ledger.path.stat()
        state = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        state = None
    key = (str(ledger.path), state, name, total, plans)
    with _answers_lock:
        if key in _answers:
            _answers.move_to_end(key)
            return _answers[key]
    balance = ledger_balance(ledger, name, requested_total=total, planned=plans)
    payload = {
        "collection": balance.collection,
        "releases": balance.releases,
        "spent_epsilon": balance.spent,
        "total_epsilon": balance.total.epsilon,
        "total_delta": balance.total.delta,
        "next": [
            {
                "sampling_rate": allowed.planned.sampling_rate,
                "steps": allowed.planned.steps,
                "delta": allowed.planned.delta,
                "epsilon": allowed.epsilon,
                "refused_kind": allowed.refused_kind,
                "filter": allowed.filter_kind,
            }
            for allowed in balance.next_releases
        ],
        "line": balance_line(balance),
    }
    with _answers_lock:
        _answers[key] = payload
        while len(_answers) > _CACHE_SIZE:
            _answers.popitem(last=False)
    return payload


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
