"""The budget ledger: every release on a dataset, composed before the next (DP_SPEC 7).

ComfyUI re-executes a node whenever its inputs change and every execution of a DP node is a
new release, so spending must be remembered across runs. One JSON file per ledger name
holds, per dataset (ledger name + content fingerprint), the dataset's total budget and an
append-only list of its releases with their DpEvents:

    {"format": "comfyui-dp-adapt-ledger", "version": 1,
     "datasets": {"<name>|<fingerprint>": {"name": ..., "fingerprint": ...,
                  "total": {"epsilon": ..., "delta": ...},
                  "releases": [{"event": {...}, "epsilon": ..., "time": "<ISO 8601>",
                                "label": "..."}]}}}

A release's "epsilon" is that event's own epsilon at the dataset's total delta at the time
it was recorded (informative only: spending is always recomputed by composing the events).

Budget rule: before a release, all recorded events and the new one are composed with the
PLD accountant at the total's delta, and the release is refused if the result exceeds the
total epsilon. The total is pinned at the dataset's first release: a later, larger total is
refused (it would re-open spent budget); a smaller one tightens the pinned total for good
when that release is recorded.

Durability and concurrency: ``record`` holds an inter-process lock (``filelock``, the file
``<ledger>.lock`` next to it) while it re-reads the file, re-checks the budget and writes.
A write goes to a temp file in the same folder, is flushed and fsync'ed, atomically renamed
over the ledger with ``os.replace`` and the folder is fsync'ed, so a crash at any point
leaves the old or the new ledger, never a mix. Temp files left by a crash are never read
and are removed by the next ``record``. A ledger that cannot be read (unknown format or
version, invalid JSON, an unreadable record) is never overwritten: every operation on it
raises and the file is left byte for byte as found.

The ledger guards against accidental overspending across runs of one installation; whoever
controls the files (or picks a new ledger name) can always start over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path

import dp_accounting as dpa

from .accounting import compose_epsilon, epsilon_for, event_from_dict, event_to_dict
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
VERSION = 1
LOCK_TIMEOUT_S = 120.0

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,98}[A-Za-z0-9_-])?")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)
}
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces


def sanitize_ledger_name(name: str) -> str:
    """The ledger name, stripped of surrounding spaces, if it is a safe file stem.

    Allowed: 1-100 ASCII letters, digits, spaces, '_', '-', '.', starting with a letter or
    digit and not ending in a space or '.'; no '..', no path separators, no Windows device
    names. Anything else raises InvalidParameterError (never silently rewritten).
    """
    if not isinstance(name, str):
        raise InvalidParameterError(
            f"ledger name must be a string, got ledger_name={name!r} ({type(name).__name__})."
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
            f"separators and not be a Windows device name, got ledger_name={name!r}."
        )
    return stripped


def _check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidParameterError(
            "fingerprint must be 1-256 printable ASCII characters without spaces (as output "
            f"by DP Load Private Images), got fingerprint={fingerprint!r}."
        )
    return fingerprint


def dataset_key(name: str, fingerprint: str) -> str:
    """The key of a dataset in a ledger file: ``<sanitised name>|<fingerprint>``."""
    return f"{sanitize_ledger_name(name)}|{_check_fingerprint(fingerprint)}"


def default_ledger_path(directory: Path, name: str) -> Path:
    """``<directory>/<sanitised name>.json``."""
    return Path(directory) / f"{sanitize_ledger_name(name)}.json"


@dataclass(frozen=True)
class TotalBudget:
    """A dataset's total (epsilon, delta) over all of its releases."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon, name="total epsilon"))
        object.__setattr__(self, "delta", check_delta(self.delta, name="total delta"))


@dataclass(frozen=True)
class BudgetCheck:
    """A candidate release against a dataset's budget; all epsilons at ``total.delta``.

    ``spent``: PLD composition of the recorded releases; ``requested``: the new event's
    own epsilon; ``total_after``: PLD composition of the recorded releases and the new one;
    ``remaining``: total epsilon minus ``spent`` (before this release, >= 0); ``ok``:
    ``total_after <= total.epsilon``.
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

    def refusal_message(self, name: str) -> str:
        return (
            f"privacy budget of dataset '{name}' would be exceeded: spent epsilon "
            f"{self.spent:.6g}, this release requests epsilon {self.requested:.6g}, together "
            f"(PLD composition) {self.total_after:.6g} > total budget epsilon "
            f"{self.total.epsilon:g} at delta {self.total.delta:g}. Nothing was released."
        )


def _empty() -> dict:
    return {"format": FORMAT, "version": VERSION, "datasets": {}}


class Ledger:
    """One ledger file (see the module docstring for the format and the guarantees)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # -- reading -------------------------------------------------------------------------

    def _read(self) -> dict:
        """The parsed, fully validated ledger (an empty one if the file does not exist)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _empty()
        except OSError as error:
            raise LedgerCorruptError(
                f"budget ledger {self.path} cannot be read ({error}); it was left untouched."
            ) from error
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise LedgerCorruptError(
                f"budget ledger {self.path} is not valid JSON ({error}); it was left untouched. "
                "Restore it from a backup: deleting it would forget the budget already spent."
            ) from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LedgerFormatError(
                f"{self.path} is not a comfyui-dp-adapt budget ledger (format {found!r}, "
                f"expected {FORMAT!r}); it was left untouched."
            )
        version = data.get("version")
        if version != VERSION or isinstance(version, bool):
            raise LedgerFormatError(
                f"budget ledger {self.path} has version {version!r}; this version of "
                f"comfyui-dp-adapt reads version {VERSION} only. It was left untouched: "
                "update the pack, or use a new ledger name."
            )
        datasets = data.get("datasets")
        if not isinstance(datasets, dict):
            raise LedgerCorruptError(
                f"budget ledger {self.path} has no 'datasets' object (got {datasets!r:.80}); "
                "it was left untouched."
            )
        for key, entry in datasets.items():
            self._validate_entry(key, entry)
        return data

    def _validate_entry(self, key: str, entry: object) -> None:
        def corrupt(what: str, error: Exception | None = None) -> LedgerCorruptError:
            detail = f" ({error})" if error is not None else ""
            return LedgerCorruptError(
                f"budget ledger {self.path}: dataset {key!r} {what}{detail}; the ledger was "
                "left untouched."
            )

        if not isinstance(entry, dict) or not {"name", "fingerprint", "total", "releases"} <= set(
            entry
        ):
            raise corrupt("is missing name, fingerprint, total or releases")
        try:
            expected = dataset_key(entry["name"], entry["fingerprint"])
        except InvalidParameterError as error:
            raise corrupt("has an invalid name or fingerprint", error) from error
        if key != expected or entry["name"] != sanitize_ledger_name(entry["name"]):
            raise corrupt(
                f"is stored under a key that does not match its name and fingerprint ({expected!r})"
            )
        total = entry["total"]
        try:
            if not isinstance(total, dict) or set(total) != {"epsilon", "delta"}:
                raise InvalidParameterError(f"total must be {{epsilon, delta}}, got {total!r:.80}")
            TotalBudget(**total)
        except DpAdaptError as error:
            raise corrupt("has an invalid total budget", error) from error
        releases = entry["releases"]
        if not isinstance(releases, list):
            raise corrupt("has a 'releases' value that is not a list")
        for index, release in enumerate(releases):
            if not isinstance(release, dict) or set(release) != {
                "event",
                "epsilon",
                "time",
                "label",
            }:
                raise corrupt(f"has release #{index} without exactly event, epsilon, time, label")
            try:
                event_from_dict(release["event"])
            except DpAdaptError as error:
                raise corrupt(
                    f"has release #{index} whose DpEvent cannot be read", error
                ) from error
            epsilon = release["epsilon"]
            if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not epsilon >= 0:
                raise corrupt(f"has release #{index} with epsilon {epsilon!r}")
            if not isinstance(release["time"], str) or not isinstance(release["label"], str):
                raise corrupt(f"has release #{index} with a non-string time or label")

    @staticmethod
    def _events(entry: dict | None) -> list[dpa.DpEvent]:
        return [event_from_dict(r["event"]) for r in entry["releases"]] if entry else []

    def releases(self, name: str, fingerprint: str) -> list[dpa.DpEvent]:
        """The DpEvents recorded for the dataset, oldest first ([] if none)."""
        key = dataset_key(name, fingerprint)
        return self._events(self._read()["datasets"].get(key))

    def datasets_named(self, name: str) -> list[str]:
        """Fingerprints of the datasets recorded under ledger name ``name``."""
        name = sanitize_ledger_name(name)
        return [e["fingerprint"] for e in self._read()["datasets"].values() if e["name"] == name]

    def total(self, name: str, fingerprint: str) -> TotalBudget | None:
        """The dataset's pinned total budget, or None before its first release."""
        entry = self._read()["datasets"].get(dataset_key(name, fingerprint))
        return TotalBudget(**entry["total"]) if entry else None

    def spent(self, name: str, fingerprint: str, *, delta: float) -> float:
        """epsilon spent on the dataset at ``delta``: PLD composition of its releases."""
        return compose_epsilon(self.releases(name, fingerprint), delta=check_delta(delta))

    def check(
        self, name: str, fingerprint: str, event: dpa.DpEvent, *, total: TotalBudget
    ) -> BudgetCheck:
        """What recording ``event`` would do to the dataset's budget. Reads only.

        Raises InvalidParameterError if ``total`` is larger than the dataset's pinned total.
        """
        key = dataset_key(name, fingerprint)
        _check_total(total)
        return self._check(self._read(), key, name, event, total)

    def _check(
        self, data: dict, key: str, name: str, event: dpa.DpEvent, total: TotalBudget
    ) -> BudgetCheck:
        entry = data["datasets"].get(key)
        if entry is not None:
            pinned = TotalBudget(**entry["total"])
            if total.epsilon > pinned.epsilon or total.delta > pinned.delta:
                raise InvalidParameterError(
                    f"dataset '{name}' has the total budget (epsilon {pinned.epsilon:g}, delta "
                    f"{pinned.delta:g}), pinned at its first release; raising it to (epsilon "
                    f"{total.epsilon:g}, delta {total.delta:g}) is refused, as it would allow "
                    "spending more than was promised. Keep the total (or lower it)."
                )
        recorded = self._events(entry)
        return BudgetCheck.of(
            spent=compose_epsilon(recorded, delta=total.delta),
            requested=epsilon_for(event, delta=total.delta),
            total_after=compose_epsilon([*recorded, event], delta=total.delta),
            total=total,
        )

    # -- writing -------------------------------------------------------------------------

    def record(
        self,
        name: str,
        fingerprint: str,
        event: dpa.DpEvent,
        *,
        total: TotalBudget,
        label: str = "",
    ) -> BudgetCheck:
        """Append ``event`` to the dataset's releases if the budget allows it.

        Under the inter-process lock: re-read the ledger, compose everything recorded with
        ``event`` (PLD, at ``total.delta``), raise BudgetExceededError if that exceeds
        ``total.epsilon``, otherwise append and write atomically. Returns the check made
        (``spent`` is the spending before this release).
        """
        from filelock import FileLock, Timeout

        key = dataset_key(name, fingerprint)
        _check_total(total)
        if not isinstance(label, str):
            raise InvalidParameterError(f"label must be a string, got label={label!r}.")
        event_dict = event_to_dict(event)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LedgerError(
                f"cannot create the ledger folder {self.path.parent} ({error}); nothing was released."
            ) from error
        lock = FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                data = self._read()
                check = self._check(data, key, name, event, total)
                if not check.ok:
                    raise BudgetExceededError(check.refusal_message(sanitize_ledger_name(name)))
                datasets = data["datasets"]
                entry = datasets.setdefault(
                    key,
                    {
                        "name": sanitize_ledger_name(name),
                        "fingerprint": fingerprint,
                        "total": {"epsilon": total.epsilon, "delta": total.delta},
                        "releases": [],
                    },
                )
                if (total.epsilon, total.delta) != (
                    entry["total"]["epsilon"],
                    entry["total"]["delta"],
                ):
                    logger.info(
                        "ledger %s: total budget of dataset '%s' tightened to (%g, %g)",
                        self.path,
                        entry["name"],
                        total.epsilon,
                        total.delta,
                    )
                # _check refused a larger total, so this only ever tightens the pinned one.
                entry["total"] = {"epsilon": total.epsilon, "delta": total.delta}
                entry["releases"].append(
                    {
                        "event": event_dict,
                        "epsilon": check.requested,
                        "time": datetime.now(timezone.utc).isoformat(),
                        "label": label,
                    }
                )
                self._remove_stale_temp_files()
                self._write(data)
                return check
        except Timeout as error:
            raise LedgerError(
                f"the budget ledger {self.path} stayed locked by another process for "
                f"{LOCK_TIMEOUT_S:g} s; nothing was released. If no other ComfyUI prompt is "
                f"running, a crashed process may hold {self.lock_path}."
            ) from error

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


def _check_total(total: TotalBudget) -> None:
    if not isinstance(total, TotalBudget):
        raise InvalidParameterError(
            f"total must be a TotalBudget(epsilon, delta), got total={total!r}."
        )


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
