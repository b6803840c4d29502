"""The budget ledger: the privacy budget protects people, not folders.

ComfyUI re-executes a node whenever its inputs change and every execution of a DP node is a
new release, so spending must be remembered across runs. One JSON file per ComfyUI
installation (``<user>/dp_adapt/ledger.json``) records every release:

    {"format": "comfyui-dp-adapt-ledger", "version": 3,
     "collections": {"<name>": {"total": {"epsilon": e, "delta": d},
                                "releases": ["<release id>", ...],
                                "filter": {"kind": "gaussian"} | {"kind": "rdp", "order": a}}},
     "releases": {"<release id>": {"collection": "<name>", "event": {...DpEvent...},
                  "epsilon": <the event's own epsilon at the collection total's delta>,
                  "label": "...", "request_key": "<opaque>", "result": {...public...}}},
     "images": {"<image key>": {"total": ..., "releases": [...], "filter": ...}}}

Lists are in the order of recording. There are no timestamps: a release's duration depends
on the private images, and so would its recorded times. Release ids are random. Image keys
and request keys are opaque keyed hashes computed by the caller; the ledger never sees an
image, a file name or a count, and its messages and logs never mention image keys, which
images were excluded or how many there are.

Two levels of budget, because the unit of privacy is one image (add/remove adjacency):

- Collection (public). A collection is the ledger name the user chose. Its total
  (epsilon, delta) is pinned at its first release: a later, larger total is refused (it
  would re-open spent budget), a smaller one tightens it for good. Before a release, the
  collection's filter (below) must admit it, or the release is refused with
  BudgetExceededError. This decision depends only on the releases the user made (public),
  never on which images are in the folder, so whether a release happens reveals nothing
  about the images.
- Image (per person): an individual privacy filter in the sense of Feldman & Zrnic 2021
  ("Individual Privacy Accounting via a Renyi Filter"). Each image key has its own total,
  pinned to the total of the first collection it was released in (tightened by a smaller
  total later, never raised), its filter and the list of releases it took part in. At a new
  release an image whose own filter does not admit the new event is excluded: it is not
  charged and contributes 0 (the caller drops it inside ``release``). Nothing says which or
  how many images were excluded. Because every image carries its own history, a folder with one image added,
  removed or re-encoded, or the same images under another ledger name, never gives the
  other images a fresh budget: the composition of the releases an image took part in, over
  every collection of the installation, never exceeds its total. Whether one image is
  included depends on its own history only, so adding or removing an image never changes
  what happens to the others.

Fully adaptive filters. Users choose each release after seeing earlier outputs, so every
decision (a collection refusal, an image exclusion) must rest on a composition proven for
adaptively chosen mechanisms and an adaptive stopping rule. The plain PLD composition is
not: for histories mixing Gaussian, Poisson-subsampled Gaussian and DP-SGD events the natural
PLD / f-DP filter can fail (arXiv 2602.06756, 2602.15815). It is still computed and shown as
the non-adaptive estimate (``spent``, ``image_spent``, ``BudgetCheck``'s epsilons, reports).
Each history (a collection's, each image's) has a filter pinned at its first release, from
that first event and the total in force (``HistoryFilter``):

- "gaussian": the first event is Gaussian without subsampling (q = 1, also DP-SGD with
  q = 1). A composition of Gaussians with noise multipliers z_i is exactly mu-GDP with
  mu^2 = sum 1/z_i^2 (Dong, Roth & Su 2022, Cor. 3.3); a release is admitted iff that mu's
  exact (analytic Gaussian) delta at the total epsilon is within the total delta. Proven for
  fully adaptive choices by Smith & Thakurta 2022 ("Fully adaptive composition for Gaussian
  differential privacy"; per image: Koskela, Tobaben & Honkela 2023). Every later event must
  be Gaussian too: a collection refuses any other (saying why), an image is excluded.
- "rdp" (anything else): the first event alone is admitted iff its own PLD epsilon is within
  the total (one event chosen before any output of the history: non-adaptive, exact). Every
  later event is admitted iff the sum of the RDP of all the history's events, the new one
  included, at ONE order alpha* is at most B(alpha*), the largest RDP that converts to the
  total (epsilon, delta) by dp_accounting's conversion (``rdp_budget``): Feldman & Zrnic
  2021, Thm 3.1 (Renyi filter). alpha* minimises RDP_first(alpha) / B(alpha) over the integer
  default orders; it stays pinned when the total is tightened (B is recomputed from the
  total in force). When the first event alone exceeds B, every later event is refused.

Why pin the kind instead of "GDP while the history is Gaussian-only, RDP filter once it is
not": the analyst could then choose adaptively between a branch that continues with
Gaussians up to the GDP limit (past what the RDP filter would allow) and a branch that
switches to a subsampled event; splitting the transcripts by branch and applying each
theorem gives only (epsilon, 2 delta). A kind fixed by the first event is fixed before any
output of that history exists. Decisions use delta * (1 - SAFETY_MARGIN) (``safe_delta``,
half the margin for the Gaussian filter), so rounding never puts a history above its total.
Version-2 ledgers (which stored no filter) are read by deriving each history's filter from
its first event and its stored total; the decisions recorded before the upgrade were PLD
decisions, and a Gaussian history that already holds a subsampled event admits nothing more.
A version-2 file is written as version 3 at its next release.

Idempotence: ``request_key`` identifies identical settings on identical images. A commit
with a recorded request key returns the stored public result and charges nothing (a
re-run after ComfyUI dropped its cache publishes the same release again, which is
post-processing of what was already released).

Durability and concurrency: ``commit`` holds an inter-process lock (``filelock``, the file
``<ledger>.lock`` next to it) while it re-reads the file, checks both levels, lets the
caller draw the release (so no noisy result exists before its record is written) and
writes. A write goes to a temp file in the same folder, is flushed and fsync'ed, atomically
renamed over the ledger with ``os.replace`` and the folder is fsync'ed, so a crash at any
point leaves the old or the new ledger, never a mix. Temp files left by a crash are never
read and are removed by the next commit. A ledger that cannot be read (unknown format or
version, invalid JSON, a record that fails validation) is never overwritten: every
operation on it raises and the file is left byte for byte as found.

The ledger guards against accidental overspending across runs of one installation;
whoever controls its files can always start over.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import dp_accounting as dpa
from dp_accounting import pld

from .accounting import (
    RDP_FILTER_ORDERS,
    compose_epsilon,
    epsilon_for,
    event_from_dict,
    event_rdp,
    event_to_dict,
    filter_order,
    gaussian_precision,
    gdp_admits,
    gdp_mu_limit,
    rdp_budget,
    safe_delta,
)
from .display import shown_path
from .errors import (
    BudgetExceededError,
    DpAdaptError,
    InvalidParameterError,
    LedgerCorruptError,
    LedgerError,
    LedgerFormatError,
)
from .validation import check_delta, check_epsilon

logger = logging.getLogger(__name__)

FORMAT = "comfyui-dp-adapt-ledger"
VERSION = 3
LEDGER_FILE_NAME = "ledger.json"
LOCK_TIMEOUT_S = 120.0
# Events the ledger accepts (new or stored). Calibration only produces noise multipliers in
# [0.05, 1e6]; outside that range the PLD accountant either overflows (z = 1e300), reports
# infinity (z = 0) or needs minutes (z = 1e-3), so a stored value there means a tampered
# or broken file. The count bound keeps a composition's work bounded (DP-SGD with up to
# 1e5 steps fits).
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1e6
MAX_MECHANISMS_PER_EVENT = 100_000

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,98}[A-Za-z0-9_-])?")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)
}
_KEY = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
_RELEASE_ID = re.compile(r"[0-9a-f]{32}")
_UPGRADES_LOGGED: set[Path] = set()  # version-2 ledgers already announced in the log
_TOP_LEVEL = {"format", "version", "collections", "releases", "images"}
# Optional top-level field: the check value of the fingerprint key the image keys were made
# under (``dp.fingerprint.key_check_value``), written by the first commit that carries one.
KEY_CHECK_FIELD = "key_check"
_KEY_CHECK = re.compile(r"[0-9a-f]{64}")
KEY_FILE_HINT = "<ComfyUI user directory>/dp_adapt/fingerprint.key"
_RELEASE_FIELDS = {"collection", "event", "epsilon", "label", "request_key", "result"}


def sanitize_ledger_name(name: str) -> str:
    """The ledger (collection) name, stripped of surrounding spaces, if it is safe.

    Allowed: 1-100 ASCII letters, digits, spaces, '_', '-', '.', starting with a letter or
    digit and not ending in a space or '.'; no '..', no path separators, no Windows device
    names. Anything else raises InvalidParameterError (never silently rewritten).
    """
    if not isinstance(name, str):
        raise InvalidParameterError(
            f"ledger name must be a string, got ledger_name={shown_path(repr(name))} ({type(name).__name__})."
        )
    stripped = name.strip()
    if (
        not _NAME.fullmatch(stripped)
        or ".." in stripped
        or stripped.split(".")[0].lower() in _WINDOWS_RESERVED
    ):
        raise InvalidParameterError(
            "ledger name must be 1-100 ASCII letters, digits, spaces, '_', '-' or '.', start "
            "with a letter or digit, not end with '.' or a space, contain no '..' or path "
            f"separators and not be a Windows device name, got ledger_name={shown_path(repr(name))}."
        )
    return stripped


def default_ledger_path(directory: Path) -> Path:
    """The installation's ledger file: ``<directory>/ledger.json``."""
    return Path(directory) / LEDGER_FILE_NAME


@dataclass(frozen=True)
class TotalBudget:
    """A total (epsilon, delta) over all releases of a collection, or of one image."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon, name="total epsilon"))
        object.__setattr__(self, "delta", check_delta(self.delta, name="total delta"))

    def as_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta}

    def tightened(self, other: TotalBudget) -> TotalBudget:
        """The componentwise smaller of the two totals (never larger than either)."""
        return TotalBudget(min(self.epsilon, other.epsilon), min(self.delta, other.delta))


GAUSSIAN_FILTER = "gaussian"
RENYI_FILTER = "rdp"


@dataclass(frozen=True)
class HistoryFilter:
    """The fully adaptive composition rule of one history, pinned at its first release.

    ``kind``: GAUSSIAN_FILTER when the first release was a Gaussian mechanism without
    subsampling (q = 1), RENYI_FILTER otherwise; ``order``: the Renyi filter's order alpha*
    (``filter_order``), None for a Gaussian filter. Both are functions of the public first
    event and the total in force at it, fixed before any output of the history exists.
    """

    kind: str
    order: int | None = None

    @classmethod
    def for_first(cls, event: dpa.DpEvent, total: TotalBudget) -> HistoryFilter:
        if gaussian_precision(event) is not None:
            return cls(GAUSSIAN_FILTER)
        return cls(RENYI_FILTER, filter_order(event, epsilon=total.epsilon, delta=total.delta))

    def as_dict(self) -> dict:
        if self.kind == GAUSSIAN_FILTER:
            return {"kind": GAUSSIAN_FILTER}
        return {"kind": RENYI_FILTER, "order": self.order}


@dataclass(frozen=True)
class FilterDecision:
    """How a history's pinned rule (``HistoryFilter``) decides on one more release.

    ``first``: the history was empty, so the release is judged alone; ``value`` and
    ``budget`` are in the rule's units: mu of the history with this release and the largest
    mu the total allows (Gaussian filter), the sum of the history's RDP at alpha* with this
    release and B(alpha*) (Renyi filter), or the release's own PLD epsilon and the total
    epsilon (a first release of a Renyi history: one non-adaptive event, exact).
    ``mixed``: a non-Gaussian release on a Gaussian history (always refused, value inf).
    ``ok``: the release may go ahead.
    """

    filter: HistoryFilter
    first: bool
    value: float
    budget: float
    ok: bool
    mixed: bool = False

    def explanation(self) -> str:
        if self.mixed:
            return (
                "its first release was a Gaussian mechanism without subsampling (q = 1), so "
                "its releases are composed as Gaussian DP, which is proven for adaptively "
                "chosen releases only while every release is Gaussian (Smith & Thakurta "
                "2022); this release is Poisson-subsampled (q < 1) and cannot join it. A "
                "new collection name does not help for the same pictures: each picture "
                "keeps its own history, and pictures first released with q = 1 can only take "
                "part in q = 1 releases (pictures first released with q < 1 take part in "
                "either kind). Use sampling rate q = 1 for these pictures"
            )
        if self.filter.kind == GAUSSIAN_FILTER and self.value == math.inf:
            return (
                "its history holds a Poisson-subsampled release recorded before ledger version "
                "3, which the Gaussian-DP filter (Smith & Thakurta 2022) cannot compose, so it "
                "admits no further release"
            )
        if self.filter.kind == GAUSSIAN_FILTER:
            return (
                "by the Gaussian-DP filter (Smith & Thakurta 2022, fully adaptive "
                f"composition), its releases with this one are mu-GDP with mu = {self.value:.6g}, "
                f"and the total allows mu <= {self.budget:.6g}"
            )
        if self.first:
            return (
                f"this release alone has epsilon {self.value:.6g} (PLD, exact for one release) "
                f"> total epsilon {self.budget:g}"
            )
        return (
            f"by the Renyi filter at order alpha = {self.filter.order} (Feldman & Zrnic 2021, "
            f"Thm 3.1), its releases with this one have Renyi DP {self.value:.6g} at that "
            f"order, and the total allows {self.budget:.6g}"
        )


@dataclass(frozen=True)
class BudgetCheck:
    """A candidate release against a collection's budget; all epsilons at ``total.delta``.

    ``ok`` (the release may go ahead) is the decision of the collection's fully adaptive
    filter, ``decision`` (None for a reused release, which spends nothing and is always ok).
    The epsilons are the PLD composition, the non-adaptive estimate shown in reports:
    ``spent`` of the recorded releases, ``requested`` the new event's own epsilon (0 for a
    reused release), ``total_after`` of the recorded releases and the new one;
    ``remaining``: total epsilon minus ``spent`` (>= 0).
    """

    spent: float
    requested: float
    total_after: float
    total: TotalBudget
    remaining: float
    ok: bool
    decision: FilterDecision | None

    @classmethod
    def of(
        cls,
        spent: float,
        requested: float,
        total_after: float,
        total: TotalBudget,
        decision: FilterDecision,
    ):
        return cls(
            spent=spent,
            requested=requested,
            total_after=total_after,
            total=total,
            remaining=max(0.0, total.epsilon - spent),
            ok=decision.ok,
            decision=decision,
        )

    @classmethod
    def reuse(cls, spent: float, total: TotalBudget) -> BudgetCheck:
        return cls(
            spent=spent,
            requested=0.0,
            total_after=spent,
            total=total,
            remaining=max(0.0, total.epsilon - spent),
            ok=True,
            decision=None,
        )

    def reason(self) -> str:
        """Why the collection's filter refuses (or admits) the release: the rule and its figures."""
        if self.decision is None:
            return "an identical release was recorded before and is reused"
        return self.decision.explanation()

    def refusal_message(self, name: str) -> str:
        mixed = self.decision is not None and self.decision.mixed
        headline = (
            f"collection '{name}' cannot take this release"
            if mixed
            else f"privacy budget of collection '{name}' would be exceeded"
        )
        return (
            f"{headline}: {self.reason()}. "
            f"Non-adaptive estimate (PLD composition): spent epsilon {self.spent:.6g}, this "
            f"release epsilon {self.requested:.6g}, together {self.total_after:.6g}, of total "
            f"budget epsilon {self.total.epsilon:g} at delta {self.total.delta:g}. Nothing was "
            "released."
        )


@dataclass(frozen=True)
class RecordedRelease:
    """A recorded release: its collection, DpEvent, label and public result."""

    release_id: str
    collection: str
    event: dpa.DpEvent
    label: str
    result: dict


@dataclass(frozen=True)
class Commit:
    """The outcome of ``Ledger.commit``.

    ``result``: the public released result (stored in the ledger); ``reused``: True when an
    identical request was recorded before and its result is returned without spending;
    ``check``: the collection-level check made before this release.
    """

    release_id: str
    result: dict
    reused: bool
    check: BudgetCheck


@dataclass
class _Snapshot:
    """A validated ledger document and what was parsed from it while validating."""

    data: dict
    events: dict[str, dpa.DpEvent]
    by_request: dict[str, str]


def _empty() -> dict:
    return {"format": FORMAT, "version": VERSION, "collections": {}, "releases": {}, "images": {}}


def _reject_constant(constant: str) -> None:
    raise ValueError(f"non-finite number {constant}")


def _check_total(total: TotalBudget) -> TotalBudget:
    if not isinstance(total, TotalBudget):
        raise InvalidParameterError(
            f"total must be a TotalBudget(epsilon, delta), got total={total!r}."
        )
    return total


def _check_image_keys(image_keys: Sequence[str]) -> tuple[str, ...]:
    # Image keys are derived from private images: messages name their type only.
    if isinstance(image_keys, (str, bytes)) or not isinstance(image_keys, Sequence):
        raise InvalidParameterError(
            "image_keys must be a sequence (list or tuple) of image key strings, got a "
            f"{type(image_keys).__name__}."
        )
    keys = tuple(image_keys)
    for key in keys:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InvalidParameterError(
                "every image key must be a string of 1-256 printable ASCII characters without "
                f"spaces (a keyed hash); one is not (a {type(key).__name__}; its value is not "
                "shown, image keys are private)."
            )
    return keys


def _kind(value: object) -> str:
    """What an opaque value is, without the value: its type (and length for a string)."""
    length = f" of length {len(value)}" if isinstance(value, str) else ""
    return f"a {type(value).__name__}{length}"


def _check_key_check(key_check: str | None) -> str | None:
    if key_check is not None and not (
        isinstance(key_check, str) and _KEY_CHECK.fullmatch(key_check)
    ):
        raise InvalidParameterError(
            "key_check must be None or 64 lowercase hexadecimal digits (the check value of the "
            f"fingerprint key, dp.fingerprint.key_check_value), got {_kind(key_check)}."
        )
    return key_check


def _check_request_key(request_key: str) -> str:
    if not isinstance(request_key, str) or not _KEY.fullmatch(request_key):
        raise InvalidParameterError(
            "request_key must be a string of 1-256 printable ASCII characters without spaces "
            f"(a keyed hash of the settings and images), got {_kind(request_key)} (its value "
            "is not shown)."
        )
    return request_key


def _check_event_dict(data: dict) -> None:
    """Raise InvalidParameterError unless the (readable) stored event is one the ledger
    accepts: supported by the PLD accountant, every noise multiplier in
    [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER], at most MAX_MECHANISMS_PER_EVENT
    Gaussian mechanisms in all."""

    def mechanisms(node: dict) -> int:
        kind = node["type"]
        if kind == "Gaussian":
            z = node["noise_multiplier"]
            if not MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER:
                raise InvalidParameterError(
                    f"a Gaussian noise multiplier must lie in [{MIN_NOISE_MULTIPLIER:g}, "
                    f"{MAX_NOISE_MULTIPLIER:g}] (the range calibration produces), got "
                    f"noise_multiplier={z!r}."
                )
            return 1
        if kind == "NoOp":
            return 0
        if kind in ("PoissonSampled", "SampledWithoutReplacement"):
            return mechanisms(node["event"])
        if kind == "SelfComposed":
            return node["count"] * mechanisms(node["event"])
        return sum(mechanisms(e) for e in node["events"])

    count = mechanisms(data)
    if count > MAX_MECHANISMS_PER_EVENT:
        raise InvalidParameterError(
            f"an event may compose at most {MAX_MECHANISMS_PER_EVENT} Gaussian mechanisms, "
            f"got {count}."
        )


def _checked_event(event: dpa.DpEvent) -> tuple[dpa.DpEvent, dict]:
    """The new release's event (as it will be read back) and its stored form."""
    if not isinstance(event, dpa.DpEvent):
        raise InvalidParameterError(
            f"event must be a dp_accounting DpEvent, got event={event!r} ({type(event).__name__})."
        )
    stored = event_to_dict(event)
    readable = event_from_dict(stored)
    _check_event_dict(stored)
    if not pld.PLDAccountant().supports(readable):
        raise InvalidParameterError(
            f"the PLD accountant (add/remove adjacency) cannot account for event={event!r}."
        )
    return readable, stored


def _public_result(result: object) -> tuple[str, dict]:
    """The JSON text of the caller's released result, and that result as read back."""
    if not isinstance(result, dict):
        raise InvalidParameterError(
            f"release must return a dict (the public released result), got a "
            f"{type(result).__name__}; nothing was recorded."
        )
    try:
        text = json.dumps(result, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidParameterError(
            "release must return a JSON-serialisable dict of finite numbers, strings, lists "
            f"and dicts ({error}); nothing was recorded."
        ) from error
    return text, json.loads(text)


class _Decider:
    """Fully adaptive filter decisions on the histories of one snapshot (module docstring).

    Caches every per-event figure (Gaussian precision, RDP at an order, PLD epsilon of the new
    event) and every decision per (history, filter, total), so many images sharing a few
    histories cost a few computations.
    """

    def __init__(self, events: dict[str, dpa.DpEvent], event: dpa.DpEvent, failed: Callable):
        self._events = events
        self._event = event
        self._failed = failed
        self._precision: dict[str, float | None] = {}
        self._rdp: dict[tuple[str, int], float] = {}
        self._new_rdp: dict[int, float] = {}
        self._new_precision = self._guarded(lambda: gaussian_precision(event))
        self._new_epsilon: dict[float, float] = {}
        self._firsts: dict[TotalBudget, HistoryFilter] = {}
        self._mu_limits: dict[TotalBudget, float] = {}
        self._decisions: dict[tuple, FilterDecision] = {}

    def _guarded(self, compute: Callable):
        try:
            return compute()
        except DpAdaptError:
            raise
        except (ArithmeticError, MemoryError, ValueError) as error:
            raise self._failed(error) from error

    def first_filter(self, total: TotalBudget) -> HistoryFilter:
        """The filter a history starting with the new event would be pinned to."""
        if total not in self._firsts:
            self._firsts[total] = self._guarded(lambda: HistoryFilter.for_first(self._event, total))
        return self._firsts[total]

    def _mu_limit(self, total: TotalBudget) -> float:
        if total not in self._mu_limits:
            self._mu_limits[total] = self._guarded(
                lambda: gdp_mu_limit(epsilon=total.epsilon, delta=total.delta)
            )
        return self._mu_limits[total]

    def _precision_of(self, rid: str) -> float | None:
        if rid not in self._precision:
            self._precision[rid] = self._guarded(lambda: gaussian_precision(self._events[rid]))
        return self._precision[rid]

    def _rdp_of(self, rid: str | None, order: int) -> float:
        cache, key = (self._new_rdp, order) if rid is None else (self._rdp, (rid, order))
        if key not in cache:
            event = self._event if rid is None else self._events[rid]
            cache[key] = self._guarded(lambda: event_rdp(event, (order,))[0])
        return cache[key]

    def decide(
        self, pinned: HistoryFilter | None, history: Sequence[str], total: TotalBudget
    ) -> FilterDecision:
        """The decision on the new event for a history (release ids in order) pinned to
        ``pinned`` (None for an empty history) under ``total``."""
        key = (pinned, tuple(history), total)
        if key not in self._decisions:
            self._decisions[key] = self._decide(pinned, history, total)
        return self._decisions[key]

    def _gaussian(self, precision: float, total: TotalBudget, *, first: bool) -> FilterDecision:
        admitted = self._guarded(
            lambda: gdp_admits(precision, epsilon=total.epsilon, delta=total.delta)
        )
        return FilterDecision(
            HistoryFilter(GAUSSIAN_FILTER),
            first=first,
            value=math.sqrt(precision),
            budget=self._mu_limit(total),
            ok=admitted,
        )

    def _decide(
        self, pinned: HistoryFilter | None, history: Sequence[str], total: TotalBudget
    ) -> FilterDecision:
        if not history:
            pinned = self.first_filter(total)
            if pinned.kind == GAUSSIAN_FILTER:
                return self._gaussian(self._new_precision, total, first=True)
            # One event chosen before any output of this history: non-adaptive, and its PLD
            # epsilon is exact (an upper bound). At safe_delta, as calibration checks it.
            delta = safe_delta(total.delta)
            if delta not in self._new_epsilon:
                self._new_epsilon[delta] = self._guarded(
                    lambda: epsilon_for(self._event, delta=delta)
                )
            epsilon = self._new_epsilon[delta]
            return FilterDecision(
                pinned, first=True, value=epsilon, budget=total.epsilon, ok=epsilon <= total.epsilon
            )
        if pinned.kind == GAUSSIAN_FILTER:
            # Smith & Thakurta 2022: adaptively chosen mu_i-GDP mechanisms, stopped before
            # sum mu_i^2 exceeds mu^2, are mu-GDP. Only Gaussian releases have a mu: any other
            # one is refused (a history upgraded from version 2 may already hold one; then
            # nothing more is admitted).
            precisions = [self._precision_of(rid) for rid in history]
            precisions.append(self._new_precision)
            if any(p is None for p in precisions):
                return FilterDecision(
                    pinned,
                    first=False,
                    value=math.inf,
                    budget=self._mu_limit(total),
                    ok=False,
                    mixed=self._new_precision is None,
                )
            return self._gaussian(math.fsum(precisions), total, first=False)
        # Feldman & Zrnic 2021, Thm 3.1: adaptively chosen releases, each admitted only while
        # the sum of their RDP at alpha* stays <= B, are (alpha*, B)-RDP together, which
        # converts to the total (epsilon, delta) (``rdp_budget``).
        order = pinned.order
        value = math.fsum(
            [*(self._rdp_of(rid, order) for rid in history), self._rdp_of(None, order)]
        )
        budget = self._guarded(lambda: rdp_budget(order, epsilon=total.epsilon, delta=total.delta))
        return FilterDecision(
            pinned, first=False, value=value, budget=budget, ok=budget > 0 and value <= budget
        )


class Ledger:
    """The installation's ledger file (see the module docstring for format and guarantees)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    @property
    def target(self) -> Path:
        """The file the ledger is written to: ``path``, or where it links to.

        A ledger that is a symbolic link (a ledger shared between installations) is written
        through the link: the temp file and the atomic rename happen in the target's folder,
        so the link stays and every installation sharing the target sees every release.
        """
        if self.path.is_symlink():
            return Path(os.path.realpath(self.path))
        return self.path

    @property
    def lock_path(self) -> Path:
        """The lock file, next to the target: installations sharing a target share its lock."""
        target = self.target
        return target.with_name(target.name + ".lock")

    # -- reading -------------------------------------------------------------------------

    def _corrupt(self, what: str, error: Exception | None = None) -> LedgerCorruptError:
        detail = f" ({error})" if error is not None else ""
        return LedgerCorruptError(
            f"budget ledger {self.path}: {what}{detail}; it was left untouched. Restore it from "
            "a backup: deleting it would forget the budget already spent."
        )

    def _read(self, target: Path | None = None) -> _Snapshot:
        """The parsed, fully validated ledger (an empty one if the file does not exist).

        ``target``: the resolved file to read (``commit`` reads the target it will write)."""
        try:
            raw = (target or self.path).read_bytes()
        except FileNotFoundError:
            return _Snapshot(_empty(), {}, {})
        except OSError as error:
            raise LedgerCorruptError(
                f"budget ledger {self.path} cannot be read ({error}); it was left untouched."
            ) from error
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise self._corrupt("the file is not valid JSON", error) from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LedgerFormatError(
                f"{self.path} is not a comfyui-dp-adapt budget ledger (format {found!r}, "
                f"expected {FORMAT!r}); it was left untouched."
            )
        version = data.get("version")
        if version == 1 and not isinstance(version, bool):
            raise LedgerFormatError(
                f"budget ledger {self.path} is a version-1 ledger: it recorded releases per "
                "folder fingerprint, which cannot be attributed to images, so it cannot be "
                "carried into a per-image ledger (version 2 or later). It was left "
                "untouched. Move it aside to start a new ledger (the budget it records stays "
                "spent: keep it to know what was released), or keep the older pack."
            )
        if version not in (2, VERSION) or isinstance(version, bool):
            raise LedgerFormatError(
                f"budget ledger {self.path} has version {version!r}; this version of "
                f"comfyui-dp-adapt reads versions 2 and {VERSION} only. It was left untouched: "
                "update the pack."
            )
        if set(data) - {KEY_CHECK_FIELD} != _TOP_LEVEL:
            raise self._corrupt(
                f"the document must have exactly the fields {sorted(_TOP_LEVEL)} (and optionally "
                f"'{KEY_CHECK_FIELD}'), got {sorted(map(str, data))}"
            )
        if KEY_CHECK_FIELD in data and not (
            isinstance(data[KEY_CHECK_FIELD], str) and _KEY_CHECK.fullmatch(data[KEY_CHECK_FIELD])
        ):
            raise self._corrupt(f"'{KEY_CHECK_FIELD}' is not 64 lowercase hexadecimal digits")
        return self._validate(data, upgrade=version == 2)

    def _total(self, value: object, owner: str) -> TotalBudget:
        try:
            if not isinstance(value, dict) or set(value) != {"epsilon", "delta"}:
                raise InvalidParameterError("total must be {epsilon, delta}")
            return TotalBudget(**value)
        except DpAdaptError as error:
            raise self._corrupt(f"{owner} has an invalid total budget", error) from error

    def _release_list(self, value: object, owner: str, releases: dict) -> list[str]:
        if not isinstance(value, list):
            raise self._corrupt(f"{owner} has a 'releases' value that is not a list")
        for rid in value:
            if not isinstance(rid, str) or rid not in releases:
                raise self._corrupt(f"{owner} refers to a release id that is not recorded")
        if len(set(value)) != len(value):
            raise self._corrupt(f"{owner} lists a release twice")
        return value

    def _history_filter(
        self,
        entry: dict,
        owner: str,
        events: dict[str, dpa.DpEvent],
        upgrade: bool,
        derived: dict[tuple, HistoryFilter],
    ) -> None:
        """Validate (version 3) or derive (version 2) the pinned filter of a history entry.

        Version 2 stored no filter: it is derived from the history's first event and its
        stored total, as it would have been pinned (decisions recorded before the upgrade
        were PLD decisions; from now on the filter decides). Version 3: the kind must be the
        one the first event gives, the order one of RDP_FILTER_ORDERS (it cannot be
        recomputed: the total may have been tightened since it was pinned).
        """
        fields = {"total", "releases"} if upgrade else {"total", "releases", "filter"}
        if not isinstance(entry, dict) or set(entry) != fields:
            raise self._corrupt(f"{owner} does not have exactly {', '.join(sorted(fields))}")
        if not isinstance(entry["releases"], list) or not entry["releases"]:
            raise self._corrupt(f"{owner} lists no release (a history starts with its first)")
        first = entry["releases"][0]
        if not isinstance(first, str) or first not in events:
            raise self._corrupt(f"{owner} refers to a release id that is not recorded")
        total = self._total(entry["total"], owner)
        if upgrade:
            key = (first, total)
            if key not in derived:
                try:
                    derived[key] = HistoryFilter.for_first(events[first], total)
                except (ArithmeticError, MemoryError, ValueError, DpAdaptError) as error:
                    raise self._corrupt(f"{owner} has a first event without RDP", error) from error
            entry["filter"] = derived[key].as_dict()
            return
        stored = entry["filter"]
        kind = GAUSSIAN_FILTER if gaussian_precision(events[first]) is not None else RENYI_FILTER
        if kind == GAUSSIAN_FILTER:
            valid = stored == {"kind": GAUSSIAN_FILTER}
        else:
            order = stored.get("order") if isinstance(stored, dict) else None
            valid = (
                isinstance(stored, dict)
                and set(stored) == {"kind", "order"}
                and stored["kind"] == RENYI_FILTER
                and type(order) is int
                and order in RDP_FILTER_ORDERS
            )
        if not valid:
            raise self._corrupt(
                f"{owner} has an invalid filter {json.dumps(stored)[:80]} (its first release "
                f"needs kind '{kind}'"
                + ("" if kind == GAUSSIAN_FILTER else " with an order from RDP_FILTER_ORDERS")
                + ")"
            )

    def _validate(self, data: dict, *, upgrade: bool = False) -> _Snapshot:
        collections, releases, images = data["collections"], data["releases"], data["images"]
        for field, value in (
            ("collections", collections),
            ("releases", releases),
            ("images", images),
        ):
            if not isinstance(value, dict):
                raise self._corrupt(f"'{field}' is not an object")

        events: dict[str, dpa.DpEvent] = {}
        by_request: dict[str, str] = {}
        accountant = pld.PLDAccountant()
        for rid, release in releases.items():
            if not _RELEASE_ID.fullmatch(rid):
                raise self._corrupt(f"release id {rid!r:.80} is not 32 hexadecimal digits")
            owner = f"release {rid}"
            if not isinstance(release, dict) or set(release) != _RELEASE_FIELDS:
                raise self._corrupt(f"{owner} does not have exactly {sorted(_RELEASE_FIELDS)}")
            try:
                event = event_from_dict(release["event"])
                _check_event_dict(release["event"])
                if not accountant.supports(event):
                    raise InvalidParameterError("the PLD accountant cannot account for it")
            except DpAdaptError as error:
                raise self._corrupt(f"{owner} has a DpEvent that cannot be used", error) from error
            events[rid] = event
            epsilon = release["epsilon"]
            if (
                isinstance(epsilon, bool)
                or not isinstance(epsilon, Real)
                or not 0 <= epsilon < math.inf
            ):
                raise self._corrupt(f"{owner} has an invalid epsilon {epsilon!r:.80}")
            if not isinstance(release["label"], str):
                raise self._corrupt(f"{owner} has a label that is not a string")
            if not isinstance(release["result"], dict):
                raise self._corrupt(f"{owner} has a result that is not an object")
            key = release["request_key"]
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise self._corrupt(f"{owner} has an invalid request key")
            if key in by_request:
                raise self._corrupt(f"{owner} repeats the request key of another release")
            by_request[key] = rid
            name = release["collection"]
            if not isinstance(name, str) or name not in collections:
                raise self._corrupt(f"{owner} belongs to a collection that is not recorded")

        listed: set[str] = set()
        derived: dict[tuple, HistoryFilter] = {}
        for name, entry in collections.items():
            try:
                valid_name = sanitize_ledger_name(name) == name
            except InvalidParameterError:
                valid_name = False
            if not valid_name:
                raise self._corrupt(f"collection name {name!r:.120} is not a valid ledger name")
            owner = f"collection {name!r}"
            self._history_filter(entry, owner, events, upgrade, derived)
            for rid in self._release_list(entry["releases"], owner, releases):
                if releases[rid]["collection"] != name:
                    raise self._corrupt(f"{owner} lists release {rid} of another collection")
                listed.add(rid)
        if len(listed) != len(releases):
            raise self._corrupt("a release is not listed by its collection")

        for key, entry in images.items():
            # Image keys are private: errors never quote them.
            if not _KEY.fullmatch(key):
                raise self._corrupt("an image key is not 1-256 printable ASCII characters")
            owner = "an image"
            self._history_filter(entry, owner, events, upgrade, derived)
            self._release_list(entry["releases"], owner, releases)
        if upgrade and self.path not in _UPGRADES_LOGGED:
            _UPGRADES_LOGGED.add(self.path)
            logger.info(
                "budget ledger %s: version 2 read; each history's filter was derived from its "
                "first release (earlier decisions were PLD decisions); written as version %d "
                "at the next release",
                self.path,
                VERSION,
            )
        if upgrade:
            data["version"] = VERSION
        return _Snapshot(data, events, by_request)

    def _compose(self, events: list[dpa.DpEvent], delta: float) -> float:
        try:
            return compose_epsilon(events, delta=delta)
        except DpAdaptError:
            raise
        except (ArithmeticError, MemoryError, ValueError) as error:
            raise LedgerError(
                f"privacy accounting failed on the releases in {self.path} ({error!r}); "
                "nothing was released and the ledger was left untouched."
            ) from error

    def _collection_events(self, snapshot: _Snapshot, name: str) -> list[dpa.DpEvent]:
        entry = snapshot.data["collections"].get(name)
        return [snapshot.events[rid] for rid in entry["releases"]] if entry else []

    def collections(self) -> list[str]:
        """The names of the collections with at least one recorded release, sorted."""
        return sorted(self._read().data["collections"])

    def release_count(self, collection: str) -> int:
        """How many releases the collection has recorded (public: each was a release)."""
        entry = self._read().data["collections"].get(sanitize_ledger_name(collection))
        return len(entry["releases"]) if entry else 0

    def find_release(self, request_key: str) -> RecordedRelease | None:
        """The release recorded for ``request_key``, or None. Reads only."""
        key = _check_request_key(request_key)
        snapshot = self._read()
        rid = snapshot.by_request.get(key)
        if rid is None:
            return None
        return self._recorded(snapshot, rid)

    @staticmethod
    def _recorded(snapshot: _Snapshot, rid: str) -> RecordedRelease:
        release = snapshot.data["releases"][rid]
        return RecordedRelease(
            release_id=rid,
            collection=release["collection"],
            event=snapshot.events[rid],
            label=release["label"],
            result=json.loads(json.dumps(release["result"])),
        )

    def total(self, collection: str) -> TotalBudget | None:
        """The collection's pinned total budget, or None before its first release."""
        entry = self._read().data["collections"].get(sanitize_ledger_name(collection))
        return TotalBudget(**entry["total"]) if entry else None

    def spent(self, collection: str, *, delta: float) -> float:
        """epsilon spent by the collection at ``delta``: PLD composition of its releases."""
        name = sanitize_ledger_name(collection)
        delta = check_delta(delta)
        return self._compose(self._collection_events(self._read(), name), delta)

    def image_spent(self, image_key: str, *, delta: float) -> float:
        """epsilon spent on one image at ``delta``: PLD composition of the releases it took
        part in (for tests and tools; reads only)."""
        (key,) = _check_image_keys((image_key,))
        delta = check_delta(delta)
        snapshot = self._read()
        entry = snapshot.data["images"].get(key)
        events = [snapshot.events[rid] for rid in entry["releases"]] if entry else []
        return self._compose(events, delta)

    def check(self, *, collection: str, event: dpa.DpEvent, total: TotalBudget) -> BudgetCheck:
        """What a new release of ``event`` would do to the collection's budget. Reads only.

        Collection level only (public). Raises InvalidParameterError if ``total`` is larger
        than the collection's pinned total.
        """
        name = sanitize_ledger_name(collection)
        _check_total(total)
        event, _ = _checked_event(event)
        return self._check(self._read(), name, event, total)

    def _pinned_check(self, snapshot: _Snapshot, name: str, total: TotalBudget) -> None:
        entry = snapshot.data["collections"].get(name)
        if entry is None:
            return
        pinned = TotalBudget(**entry["total"])
        if total.epsilon > pinned.epsilon or total.delta > pinned.delta:
            raise InvalidParameterError(
                f"collection '{name}' has the total budget (epsilon {pinned.epsilon:g}, delta "
                f"{pinned.delta:g}), pinned at its first release; raising it to (epsilon "
                f"{total.epsilon:g}, delta {total.delta:g}) is refused, as it would allow "
                "spending more than was promised. Keep the total (or lower it)."
            )

    def _decider(self, snapshot: _Snapshot, event: dpa.DpEvent) -> _Decider:
        def failed(error: Exception) -> LedgerError:
            return LedgerError(
                f"privacy accounting failed on the releases in {self.path} ({error!r}); "
                "nothing was released and the ledger was left untouched."
            )

        return _Decider(snapshot.events, event, failed)

    @staticmethod
    def _pinned_filter(entry: dict | None) -> HistoryFilter | None:
        if entry is None:
            return None
        stored = entry["filter"]
        return HistoryFilter(stored["kind"], stored.get("order"))

    def _check(
        self,
        snapshot: _Snapshot,
        name: str,
        event: dpa.DpEvent,
        total: TotalBudget,
        decider: _Decider | None = None,
    ) -> BudgetCheck:
        self._pinned_check(snapshot, name, total)
        entry = snapshot.data["collections"].get(name)
        decider = decider or self._decider(snapshot, event)
        decision = decider.decide(
            self._pinned_filter(entry), entry["releases"] if entry else (), total
        )
        recorded = self._collection_events(snapshot, name)
        return BudgetCheck.of(
            spent=self._compose(recorded, total.delta),
            requested=epsilon_for(event, delta=total.delta),
            total_after=self._compose([*recorded, event], total.delta),
            total=total,
            decision=decision,
        )

    def _filter(
        self, snapshot: _Snapshot, keys: tuple[str, ...], decider: _Decider, total: TotalBudget
    ) -> tuple[tuple[bool, ...], dict[str, tuple[TotalBudget, HistoryFilter]]]:
        """The individual privacy filter (Feldman & Zrnic 2021): which images may take part.

        An image is included iff its own pinned filter (module docstring) admits the new
        event after its recorded releases, under its total: its pinned one tightened by
        ``total`` (a new image gets ``total`` and the filter the new event pins). Only the
        first occurrence of a key can be included. Returns the mask and, per included key,
        the total and filter to store.
        """
        images = snapshot.data["images"]
        mask: list[bool] = []
        charged: dict[str, tuple[TotalBudget, HistoryFilter]] = {}
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                mask.append(False)  # one image, one charge
                continue
            seen.add(key)
            entry = images.get(key)
            if entry is None:
                limit, history = total, ()
            else:
                limit = TotalBudget(**entry["total"]).tightened(total)
                history = entry["releases"]
            decision = decider.decide(self._pinned_filter(entry), history, limit)
            mask.append(decision.ok)
            if decision.ok:
                charged[key] = (limit, decision.filter)
        return tuple(mask), charged

    # -- writing -------------------------------------------------------------------------

    def _unwritable(
        self, what: str, error: OSError | None = None, *, fix: str | None = None
    ) -> LedgerError:
        detail = f" ({error.strerror or error})" if error is not None else ""
        fix = fix or (
            "Make that folder writable (or start ComfyUI with a writable --user-directory)"
        )
        return LedgerError(
            f"the budget ledger {self.path} cannot be written: {what}{detail}. A release could "
            f"not be recorded, so nothing was trained or released. {fix}; the ledger was left "
            "untouched."
        )

    def _lock_unusable(self, lock_path: Path, error: OSError) -> LedgerError:
        fix = (
            f"Move the folder {lock_path} aside (the lock file is created again)"
            if lock_path.is_dir()
            else None
        )
        return self._unwritable(f"the lock file {lock_path} cannot be used", error, fix=fix)

    def _writable_target(self) -> Path:
        """The resolved target, if it is a regular file or absent (else a clear error)."""
        target = self.target
        if target.is_symlink():  # a link loop or a link realpath could not resolve
            raise self._unwritable(
                f"the link does not lead to a file ({target})", fix="Repair the link"
            )
        if target.exists() and not target.is_file():
            raise self._unwritable(
                f"{target} is not a regular file (a folder?)",
                fix="Move it aside, or point the ledger at a file",
            )
        return target

    def check_writable(self) -> None:
        """Raise LedgerError, with the reason, unless a release could be recorded now.

        Called before any training or embedding starts (``dp.release.plan_release``), so that
        no work is done for a release whose record could not be written: the ledger (through a
        link, its target) is a regular file or absent, its folder exists or can be created,
        the lock file can be created and locked (held by another process counts: it exists),
        and a temp file can be created in the folder. Leaves nothing behind but the folder
        and the lock file.
        """
        from filelock import FileLock, Timeout

        target = self._writable_target()
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._unwritable(f"its folder {folder} cannot be created", error) from error
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            pass  # another prompt holds it: the lock file exists and works
        except OSError as error:
            raise self._lock_unusable(self.lock_path, error) from error
        else:
            lock.release()
        probe = folder / f"{self._temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise self._unwritable(f"no file can be created in {folder}", error) from error
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)

    def check_key(self, key_check: str | None) -> None:
        """Raise LedgerError unless ``key_check`` may commit to this ledger. Reads only.

        ``key_check``: the check value of the fingerprint key the caller's image keys were made
        under (``dp.fingerprint.key_check_value``). The ledger stores the first one it is given;
        from then on a commit under another key (the key file was deleted or replaced, or a
        shared ledger is used by an installation with its own key) is refused: its image keys
        would not match the recorded ones, and the same pictures would get a fresh budget.
        """
        self._key_matches(self._read(), _check_key_check(key_check))

    def _key_matches(self, snapshot: _Snapshot, key_check: str | None) -> None:
        stored = snapshot.data.get(KEY_CHECK_FIELD)
        if stored is None:
            return
        advice = (
            f"Restore the key file {KEY_FILE_HINT} from a backup (the same file, byte for "
            "byte; if this ledger is shared with another installation through a link, copy "
            "that installation's key file); or, to start over deliberately, move the ledger "
            f"{self.path} aside (what it records stays spent: keep it)."
        )
        if key_check is None:
            raise LedgerError(
                f"budget ledger {self.path} records images under a fingerprint key, and this "
                "release does not say which key its image keys were made under (key_check=None), "
                "so it cannot be matched to them; nothing was trained or released. Connect the "
                "images from DP Load Private Images."
            )
        if not hmac.compare_digest(stored, key_check):
            raise LedgerError(
                f"budget ledger {self.path} records its images' budgets under another "
                "fingerprint key than this installation's: the key file was deleted or "
                "replaced, so the same pictures now get other keys and would get a fresh "
                f"budget. Nothing was trained or released. {advice}"
            )

    @contextlib.contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        from filelock import FileLock, Timeout

        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._unwritable(
                f"its folder {target.parent} cannot be created", error
            ) from error
        lock_path = target.with_name(target.name + ".lock")
        lock = FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout as error:
            raise LedgerError(
                f"the budget ledger {self.path} stayed locked by another process for "
                f"{LOCK_TIMEOUT_S:g} s; nothing was released. If no other ComfyUI prompt is "
                f"running, a crashed process may hold {lock_path}."
            ) from error
        except OSError as error:
            raise self._lock_unusable(lock_path, error) from error
        try:
            yield
        finally:
            lock.release()

    def commit(
        self,
        *,
        collection: str,
        total: TotalBudget,
        event: dpa.DpEvent,
        image_keys: Sequence[str],
        request_key: str,
        label: str,
        release: Callable[[tuple[bool, ...]], dict],
        key_check: str | None = None,
    ) -> Commit:
        """Record and draw one release, or reuse the identical recorded one.

        Under the inter-process lock: re-read the ledger; refuse (LedgerError) if ``key_check``
        does not match the key check recorded with the image entries (``check_key``); if
        ``request_key`` is recorded, return its stored result (``reused=True``; nothing is
        charged or written and ``release`` is not called). Otherwise check the collection's
        budget (raise BudgetExceededError, writing nothing, if the composition would exceed
        ``total.epsilon``), compute which images may take part (the individual filter, see
        the module docstring), call ``release(mask)`` with one bool per entry of
        ``image_keys`` (False: the image must contribute 0), and write the release, its
        result and the charge of every included image atomically (with ``key_check``, if the
        ledger holds none yet). If ``release`` raises, the exception propagates and nothing
        is written.

        ``release`` returns the public released result as a JSON-serialisable dict; it
        draws the DP noise, so nothing noisy exists before the record is written.
        """
        name = sanitize_ledger_name(collection)
        _check_total(total)
        event, event_dict = _checked_event(event)
        keys = _check_image_keys(image_keys)
        request_key = _check_request_key(request_key)
        key_check = _check_key_check(key_check)
        if not isinstance(label, str):
            raise InvalidParameterError(f"label must be a string, got label={label!r}.")
        if not callable(release):
            raise InvalidParameterError(
                f"release must be a callable taking the inclusion mask, got release={release!r}."
            )
        target = self._writable_target()  # resolved once: read, lock and write the same file
        with self._locked(target):
            snapshot = self._read(target)
            self._key_matches(snapshot, key_check)
            found = snapshot.by_request.get(request_key)
            if found is not None:
                self._pinned_check(snapshot, name, total)
                spent = self._compose(self._collection_events(snapshot, name), total.delta)
                return Commit(
                    release_id=found,
                    result=self._recorded(snapshot, found).result,
                    reused=True,
                    check=BudgetCheck.reuse(spent, total),
                )
            decider = self._decider(snapshot, event)
            check = self._check(snapshot, name, event, total, decider)
            if not check.ok:
                raise BudgetExceededError(check.refusal_message(name))
            mask, charged = self._filter(snapshot, keys, decider, total)
            text, stored = _public_result(release(mask))

            data = snapshot.data
            if key_check is not None:
                data.setdefault(KEY_CHECK_FIELD, key_check)
            rid = secrets.token_hex(16)
            while rid in data["releases"]:
                rid = secrets.token_hex(16)
            entry = data["collections"].setdefault(
                name,
                {
                    "total": total.as_dict(),
                    "releases": [],
                    "filter": check.decision.filter.as_dict(),
                },
            )
            if TotalBudget(**entry["total"]) != total:
                logger.info(
                    "ledger %s: total budget of collection '%s' tightened to (%g, %g)",
                    self.path,
                    name,
                    total.epsilon,
                    total.delta,
                )
            # _check refused a larger total, so this only ever tightens the pinned one.
            entry["total"] = total.as_dict()
            entry["releases"].append(rid)
            data["releases"][rid] = {
                "collection": name,
                "event": event_dict,
                "epsilon": check.requested,
                "label": label,
                "request_key": request_key,
                "result": stored,
            }
            images = data["images"]
            for key, (limit, pinned) in charged.items():
                image = images.setdefault(
                    key, {"total": limit.as_dict(), "releases": [], "filter": pinned.as_dict()}
                )
                image["total"] = limit.as_dict()
                image["releases"].append(rid)
            self._remove_stale_temp_files(target)
            self._write(data, target)
            return Commit(release_id=rid, result=json.loads(text), reused=False, check=check)

    @staticmethod
    def _temp_prefix(target: Path) -> str:
        return f".{target.name}."

    def _remove_stale_temp_files(self, target: Path) -> None:
        # Called under the lock: no other writer exists, so any temp file is a crash leftover.
        for leftover in target.parent.glob(self._temp_prefix(target) + "*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                logger.info("removed leftover ledger temp file %s", leftover)

    def _write(self, data: dict, target: Path) -> None:
        """Atomically replace ``target`` (the resolved ledger file) by ``data``."""
        text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
        tmp = target.with_name(
            f"{self._temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )
        try:
            with open(tmp, "x", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as error:
            raise LedgerError(
                f"could not write the budget ledger {self.path} ({error}); the previous ledger "
                "is intact and nothing was released."
            ) from error
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
