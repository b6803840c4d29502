"""The budget ledger: every release on a dataset, composed before the next (DP_SPEC 7).

ComfyUI re-executes a node whenever its inputs change and every execution of a DP node is a
new release, so spending has to be remembered across runs. One JSON file per ledger name
holds, per dataset (name + content fingerprint), the pinned total budget and an append-only
list of releases with their DpEvents. Before a release, all recorded events and the new one
are composed with the PLD accountant; the release is refused if the composition exceeds the
total.

Durability: writes go to a temp file in the same folder, are fsync'ed, then atomically
renamed over the ledger (and the folder fsync'ed), so a crash leaves either the old or the
new file, never a mix. An inter-process lock (``filelock``) serialises concurrent prompts:
``record`` re-reads, re-checks and writes under the lock. A ledger that cannot be read is
never overwritten.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dp_accounting as dpa

from .accounting import compose_epsilon, epsilon_for, event_from_dict, event_to_dict
from .errors import (
    BudgetExceededError,
    InvalidParameterError,
    LedgerCorruptError,
    LedgerFormatError,
)
from .validation import check_delta, check_epsilon

FORMAT = "comfyui-dp-adapt-ledger"
VERSION = 1
LOCK_TIMEOUT_S = 120
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$")


def sanitize_ledger_name(name: str) -> str:
    """The name itself if it is a plain file stem (no path separators, no '..')."""
    stripped = name.strip() if isinstance(name, str) else name
    if not isinstance(stripped, str) or not _NAME.fullmatch(stripped) or ".." in stripped:
        raise InvalidParameterError(
            "ledger name must be 1-100 letters, digits, spaces, '_', '-' or '.', starting with a "
            f"letter or digit and without '..' or path separators, got ledger_name={name!r}."
        )
    return stripped


def default_ledger_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{sanitize_ledger_name(name)}.json"


def dataset_key(name: str, fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise InvalidParameterError(f"fingerprint must be a non-empty string, got {fingerprint!r}.")
    return f"{sanitize_ledger_name(name)}|{fingerprint.strip()}"


@dataclass(frozen=True)
class TotalBudget:
    """A dataset's total (epsilon, delta) over all of its releases."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon, name="total epsilon")
        check_delta(self.delta, name="total delta")


@dataclass(frozen=True)
class BudgetCheck:
    """Spending before and after a candidate release, all epsilons at ``total.delta``."""

    spent: float
    requested: float
    total_after: float
    total: TotalBudget

    @property
    def ok(self) -> bool:
        return self.total_after <= self.total.epsilon

    @property
    def remaining(self) -> float:
        return max(0.0, self.total.epsilon - self.spent)


class Ledger:
    """One ledger file; see the module docstring for the guarantees."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- reading -------------------------------------------------------------------------
    def _read(self) -> dict:
        if not self.path.exists():
            return {"format": FORMAT, "version": VERSION, "datasets": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerCorruptError(
                f"budget ledger {self.path} cannot be read ({error}); it was left untouched. "
                "Restore it from a backup; deleting it would forget the budget already spent."
            ) from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LedgerFormatError(
                f"{self.path} is not a comfyui-dp-adapt ledger; it was left untouched."
            )
        if data.get("version") != VERSION:
            raise LedgerFormatError(
                f"ledger {self.path} has version {data.get('version')!r}; this version of the pack "
                f"reads version {VERSION}. It was left untouched."
            )
        datasets = data.get("datasets")
        if not isinstance(datasets, dict):
            raise LedgerCorruptError(
                f"ledger {self.path} has no readable 'datasets'; left untouched."
            )
        for key, entry in datasets.items():
            try:
                for release in entry["releases"]:
                    event_from_dict(release["event"])
                TotalBudget(**entry["total"])
            except (KeyError, TypeError, LedgerFormatError, InvalidParameterError) as error:
                raise LedgerCorruptError(
                    f"ledger {self.path} has an unreadable record for dataset {key!r} ({error}); "
                    "it was left untouched."
                ) from error
        return data

    def _entry(self, data: dict, name: str, fingerprint: str) -> dict | None:
        return data["datasets"].get(dataset_key(name, fingerprint))

    def releases(self, name: str, fingerprint: str) -> list[dpa.DpEvent]:
        entry = self._entry(self._read(), name, fingerprint)
        return [event_from_dict(r["event"]) for r in entry["releases"]] if entry else []

    def datasets_named(self, name: str) -> list[str]:
        """Fingerprints of the datasets recorded under ``name``."""
        name = sanitize_ledger_name(name)
        return [e["fingerprint"] for e in self._read()["datasets"].values() if e["name"] == name]

    def spent(self, name: str, fingerprint: str, *, delta: float) -> float:
        return compose_epsilon(self.releases(name, fingerprint), delta=delta)

    def check(
        self, name: str, fingerprint: str, event: dpa.DpEvent, *, total: TotalBudget
    ) -> BudgetCheck:
        """What recording ``event`` would do to the dataset's budget (reads only)."""
        return self._check(self._read(), name, fingerprint, event, total)

    def _check(self, data, name, fingerprint, event, total) -> BudgetCheck:
        entry = self._entry(data, name, fingerprint)
        recorded = [event_from_dict(r["event"]) for r in entry["releases"]] if entry else []
        if entry is not None:
            pinned = TotalBudget(**entry["total"])
            if total.epsilon > pinned.epsilon or total.delta > pinned.delta:
                raise InvalidParameterError(
                    f"dataset '{name}' was given the total budget (epsilon {pinned.epsilon:g}, delta "
                    f"{pinned.delta:g}) at its first release; raising it to (epsilon {total.epsilon:g}, "
                    f"delta {total.delta:g}) would allow overspending. Keep the total, or use a new "
                    "ledger name for new data."
                )
        return BudgetCheck(
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
        """Append ``event`` if the dataset can afford it; BudgetExceededError otherwise."""
        from filelock import FileLock, Timeout

        key = dataset_key(name, fingerprint)
        event_dict = event_to_dict(event)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                data = self._read()
                check = self._check(data, name, fingerprint, event, total)
                if not check.ok:
                    raise BudgetExceededError(
                        f"privacy budget of dataset '{name}' would be exceeded: spent epsilon "
                        f"{check.spent:.4g}, this release {check.requested:.4g}, together "
                        f"{check.total_after:.4g} > total {total.epsilon:g} (delta {total.delta:g})."
                    )
                entry = data["datasets"].setdefault(
                    key,
                    {
                        "name": sanitize_ledger_name(name),
                        "fingerprint": fingerprint.strip(),
                        "total": {"epsilon": total.epsilon, "delta": total.delta},
                        "releases": [],
                    },
                )
                # A smaller total than pinned tightens the budget from now on.
                entry["total"] = {
                    "epsilon": min(entry["total"]["epsilon"], total.epsilon),
                    "delta": min(entry["total"]["delta"], total.delta),
                }
                entry["releases"].append(
                    {
                        "event": event_dict,
                        "epsilon": check.requested,
                        "time": datetime.now(timezone.utc).isoformat(),
                        "label": label,
                    }
                )
                self._write(data)
                return check
        except Timeout as error:
            raise InvalidParameterError(
                f"the budget ledger {self.path} stayed locked for {LOCK_TIMEOUT_S} s by another "
                "process; nothing was released."
            ) from error

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:  # Windows cannot open folders; the rename is durable there
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
