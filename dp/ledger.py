"""The budget ledger: the privacy budget protects people, not folders.

ComfyUI re-executes a node whenever its inputs change and every execution of a DP node is a
new release, so spending must be remembered across runs. One JSON file per ComfyUI
installation (``<user>/dp_adapt/ledger.json``) records every release:

    {"format": "comfyui-dp-adapt-ledger", "version": 2,
     "collections": {"<name>": {"total": {"epsilon": e, "delta": d},
                                "releases": ["<release id>", ...]}},
     "releases": {"<release id>": {"collection": "<name>", "event": {...DpEvent...},
                  "epsilon": <the event's own epsilon at the collection total's delta>,
                  "label": "...", "request_key": "<opaque>", "result": {...public...}}},
     "images": {"<image key>": {"total": {"epsilon": e, "delta": d},
                                "releases": ["<release id>", ...]}}}

Lists are in the order of recording. There are no timestamps: a release's duration depends
on the private images, and so would its recorded times. Release ids are random. Image keys
and request keys are opaque keyed hashes computed by the caller; the ledger never sees an
image, a file name or a count, and its messages and logs never mention image keys, which
images were excluded or how many there are.

Two levels of budget, because the unit of privacy is one image (add/remove adjacency):

- Collection (public). A collection is the ledger name the user chose. Its total
  (epsilon, delta) is pinned at its first release: a later, larger total is refused (it
  would re-open spent budget), a smaller one tightens it for good. Before a release, the
  PLD composition of the collection's recorded events and the new one, at the total's
  delta, must not exceed the total epsilon, or the release is refused with
  BudgetExceededError. This decision depends only on the releases the user made (public),
  never on which images are in the folder, so whether a release happens reveals nothing
  about the images.
- Image (per person): an individual privacy filter in the sense of Feldman & Zrnic 2021
  ("Individual Privacy Accounting via a Renyi Filter"). Each image key has its own total,
  pinned to the total of the first collection it was released in (tightened by a smaller
  total later, never raised), and the list of releases it took part in. At a new release an
  image whose own composition (its recorded events and the new one, PLD at its total's
  delta) would exceed its total epsilon is excluded: it is not charged and contributes 0
  (the caller drops it inside ``release``). Nothing says which or how many images were
  excluded. Because every image carries its own history, a folder with one image added,
  removed or re-encoded, or the same images under another ledger name, never gives the
  other images a fresh budget: the composition of the releases an image took part in, over
  every collection of the installation, never exceeds its total. Whether one image is
  included depends on its own history only, so adding or removing an image never changes
  what happens to the others. Feldman & Zrnic prove the filter for Renyi DP; for Gaussian
  events without subsampling the PLD composition used here is Gaussian-DP composition, for
  which fully adaptive composition holds too (Smith & Thakurta 2022, "Fully adaptive
  composition for Gaussian differential privacy"; Koskela, Tobaben, Honkela 2023,
  "Individual privacy accounting with Gaussian differential privacy"); for Poisson-sampled
  events the PLD filter is the same rule, not covered by those theorems. Compositions are
  cached per multiset of events, so many images sharing a few histories cost a few
  compositions.

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

from .accounting import compose_epsilon, epsilon_for, event_from_dict, event_to_dict
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
VERSION = 2
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
_TOP_LEVEL = {"format", "version", "collections", "releases", "images"}
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


@dataclass(frozen=True)
class BudgetCheck:
    """A candidate release against a collection's budget; all epsilons at ``total.delta``.

    ``spent``: PLD composition of the collection's recorded releases; ``requested``: the new
    event's own epsilon (0 for a reused release); ``total_after``: PLD composition of the
    recorded releases and the new one; ``remaining``: total epsilon minus ``spent`` (before
    this release, >= 0); ``ok``: the release may go ahead (``total_after <= total.epsilon``;
    always True for a reused release, which spends nothing).
    """

    spent: float
    requested: float
    total_after: float
    total: TotalBudget
    remaining: float
    ok: bool

    @classmethod
    def of(cls, spent: float, requested: float, total_after: float, total: TotalBudget):
        return cls(
            spent=spent,
            requested=requested,
            total_after=total_after,
            total=total,
            remaining=max(0.0, total.epsilon - spent),
            ok=total_after <= total.epsilon,
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
        )

    def refusal_message(self, name: str) -> str:
        return (
            f"privacy budget of collection '{name}' would be exceeded: spent epsilon "
            f"{self.spent:.6g}, this release requests epsilon {self.requested:.6g}, together "
            f"(PLD composition) {self.total_after:.6g} > total budget epsilon "
            f"{self.total.epsilon:g} at delta {self.total.delta:g}. Nothing was released."
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


def _check_request_key(request_key: str) -> str:
    if not isinstance(request_key, str) or not _KEY.fullmatch(request_key):
        length = f" of length {len(request_key)}" if isinstance(request_key, str) else ""
        raise InvalidParameterError(
            "request_key must be a string of 1-256 printable ASCII characters without spaces "
            f"(a keyed hash of the settings and images), got a {type(request_key).__name__}"
            f"{length} (its value is not shown)."
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


class Ledger:
    """The installation's ledger file (see the module docstring for format and guarantees)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # -- reading -------------------------------------------------------------------------

    def _corrupt(self, what: str, error: Exception | None = None) -> LedgerCorruptError:
        detail = f" ({error})" if error is not None else ""
        return LedgerCorruptError(
            f"budget ledger {self.path}: {what}{detail}; it was left untouched. Restore it from "
            "a backup: deleting it would forget the budget already spent."
        )

    def _read(self) -> _Snapshot:
        """The parsed, fully validated ledger (an empty one if the file does not exist)."""
        try:
            raw = self.path.read_bytes()
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
                "carried into this version's per-image ledger (version 2). It was left "
                "untouched. Move it aside to start a new ledger (the budget it records stays "
                "spent: keep it to know what was released), or keep the older pack."
            )
        if version != VERSION or isinstance(version, bool):
            raise LedgerFormatError(
                f"budget ledger {self.path} has version {version!r}; this version of "
                f"comfyui-dp-adapt reads version {VERSION} only. It was left untouched: "
                "update the pack."
            )
        if set(data) != _TOP_LEVEL:
            raise self._corrupt(
                f"the document must have exactly the fields {sorted(_TOP_LEVEL)}, got "
                f"{sorted(map(str, data))}"
            )
        return self._validate(data)

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

    def _validate(self, data: dict) -> _Snapshot:
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
        for name, entry in collections.items():
            try:
                valid_name = sanitize_ledger_name(name) == name
            except InvalidParameterError:
                valid_name = False
            if not valid_name:
                raise self._corrupt(f"collection name {name!r:.120} is not a valid ledger name")
            owner = f"collection {name!r}"
            if not isinstance(entry, dict) or set(entry) != {"total", "releases"}:
                raise self._corrupt(f"{owner} does not have exactly total and releases")
            self._total(entry["total"], owner)
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
            if not isinstance(entry, dict) or set(entry) != {"total", "releases"}:
                raise self._corrupt(f"{owner} does not have exactly total and releases")
            self._total(entry["total"], owner)
            self._release_list(entry["releases"], owner, releases)
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

    def _check(
        self, snapshot: _Snapshot, name: str, event: dpa.DpEvent, total: TotalBudget
    ) -> BudgetCheck:
        self._pinned_check(snapshot, name, total)
        recorded = self._collection_events(snapshot, name)
        return BudgetCheck.of(
            spent=self._compose(recorded, total.delta),
            requested=epsilon_for(event, delta=total.delta),
            total_after=self._compose([*recorded, event], total.delta),
            total=total,
        )

    def _filter(
        self, snapshot: _Snapshot, keys: tuple[str, ...], event: dpa.DpEvent, total: TotalBudget
    ) -> tuple[tuple[bool, ...], dict[str, TotalBudget]]:
        """The individual privacy filter (Feldman & Zrnic 2021): which images may take part.

        An image is included iff the PLD composition of its recorded events and ``event``,
        at its total's delta, is at most its total epsilon, its total being its pinned one
        tightened by ``total`` (a new image gets ``total``). Only the first occurrence of a
        key can be included. Returns the mask and each included key's total to store.
        """
        images = snapshot.data["images"]
        histories: dict[tuple[str, ...], tuple[str, ...]] = {}
        composed: dict[tuple[tuple[str, ...], float], float] = {}
        mask: list[bool] = []
        charged: dict[str, TotalBudget] = {}
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
                history = tuple(entry["releases"])
            # Composition depends on the multiset of events only (commutative): many images
            # with different release ids but equal events share one composition.
            signature = histories.get(history)
            if signature is None:
                signature = tuple(sorted(repr(snapshot.events[rid]) for rid in history))
                histories[history] = signature
            cache_key = (signature, limit.delta)
            epsilon = composed.get(cache_key)
            if epsilon is None:
                events = [snapshot.events[rid] for rid in history]
                epsilon = self._compose([*events, event], limit.delta)
                composed[cache_key] = epsilon
            included = epsilon <= limit.epsilon
            mask.append(included)
            if included:
                charged[key] = limit
        return tuple(mask), charged

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LedgerError(
                f"cannot create the ledger folder {self.path.parent} ({error}); nothing was "
                "released."
            ) from error
        lock = FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout as error:
            raise LedgerError(
                f"the budget ledger {self.path} stayed locked by another process for "
                f"{LOCK_TIMEOUT_S:g} s; nothing was released. If no other ComfyUI prompt is "
                f"running, a crashed process may hold {self.lock_path}."
            ) from error
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
    ) -> Commit:
        """Record and draw one release, or reuse the identical recorded one.

        Under the inter-process lock: re-read the ledger; if ``request_key`` is recorded,
        return its stored result (``reused=True``; nothing is charged or written and
        ``release`` is not called). Otherwise check the collection's budget (raise
        BudgetExceededError, writing nothing, if the composition would exceed
        ``total.epsilon``), compute which images may take part (the individual filter, see
        the module docstring), call ``release(mask)`` with one bool per entry of
        ``image_keys`` (False: the image must contribute 0), and write the release, its
        result and the charge of every included image atomically. If ``release`` raises,
        the exception propagates and nothing is written.

        ``release`` returns the public released result as a JSON-serialisable dict; it
        draws the DP noise, so nothing noisy exists before the record is written.
        """
        name = sanitize_ledger_name(collection)
        _check_total(total)
        event, event_dict = _checked_event(event)
        keys = _check_image_keys(image_keys)
        request_key = _check_request_key(request_key)
        if not isinstance(label, str):
            raise InvalidParameterError(f"label must be a string, got label={label!r}.")
        if not callable(release):
            raise InvalidParameterError(
                f"release must be a callable taking the inclusion mask, got release={release!r}."
            )
        with self._locked():
            snapshot = self._read()
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
            check = self._check(snapshot, name, event, total)
            if not check.ok:
                raise BudgetExceededError(check.refusal_message(name))
            mask, charged = self._filter(snapshot, keys, event, total)
            text, stored = _public_result(release(mask))

            data = snapshot.data
            rid = secrets.token_hex(16)
            while rid in data["releases"]:
                rid = secrets.token_hex(16)
            entry = data["collections"].setdefault(name, {"total": total.as_dict(), "releases": []})
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
            for key, limit in charged.items():
                image = images.setdefault(key, {"total": limit.as_dict(), "releases": []})
                image["total"] = limit.as_dict()
                image["releases"].append(rid)
            self._remove_stale_temp_files()
            self._write(data)
            return Commit(release_id=rid, result=json.loads(text), reused=False, check=check)

    def _temp_prefix(self) -> str:
        return f".{self.path.name}."

    def _remove_stale_temp_files(self) -> None:
        # Called under the lock: no other writer exists, so any temp file is a crash leftover.
        for leftover in self.path.parent.glob(self._temp_prefix() + "*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                logger.info("removed leftover ledger temp file %s", leftover)

    def _write(self, data: dict) -> None:
        text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
        tmp = self.path.with_name(f"{self._temp_prefix()}{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as error:
            raise LedgerError(
                f"could not write the budget ledger {self.path} ({error}); the previous ledger "
                "is intact and nothing was released."
            ) from error
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        _fsync_directory(self.path.parent)


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
