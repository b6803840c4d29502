"""The budget ledger: refusal, exact composition, crash safety, concurrency, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from comfyui_dp_adapt.dp.accounting import compose_epsilon, release_event
from comfyui_dp_adapt.dp.errors import (
    BudgetExceededError,
    InvalidParameterError,
    LedgerCorruptError,
    LedgerFormatError,
)
from comfyui_dp_adapt.dp.ledger import Ledger, TotalBudget, default_ledger_path
from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

DELTA = 1e-5
EVENT = release_event(noise_multiplier=3.75, sampling_rate=1.0)  # epsilon ~1 at 1e-5
FP = "hmac-sha256:abc"


def budget_for_exactly(k: int) -> TotalBudget:
    """A total that admits exactly k releases of EVENT (midway between k and k+1)."""
    low = compose_epsilon([EVENT] * k, delta=DELTA)
    high = compose_epsilon([EVENT] * (k + 1), delta=DELTA)
    return TotalBudget(epsilon=(low + high) / 2, delta=DELTA)


def count(ledger: Ledger) -> int:
    return len(ledger.releases("art", FP))


def test_refuses_overspend_stating_spent_requested_and_total(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(2)
    ledger.record("art", FP, EVENT, total=total)
    ledger.record("art", FP, EVENT, total=total)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceededError) as error:
        ledger.record("art", FP, EVENT, total=total)
    message = str(error.value)
    assert "spent" in message and "this release" in message and "total" in message
    assert f"{total.epsilon:g}" in message
    assert ledger.path.read_bytes() == before
    assert not ledger.check("art", FP, EVENT, total=total).ok


def test_releases_compose_exactly_not_by_adding_epsilons(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    one = compose_epsilon([EVENT], delta=DELTA)
    total = TotalBudget(epsilon=2.5 * one, delta=DELTA)
    recorded = 0
    while True:
        try:
            ledger.record("art", FP, EVENT, total=total)
        except BudgetExceededError:
            break
        recorded += 1
    assert recorded > 2, "PLD composition of Gaussians is sub-additive: more than 2.5 // 1 fit"
    assert ledger.spent("art", FP, delta=DELTA) == pytest.approx(
        compose_epsilon([EVENT] * recorded, delta=DELTA)
    )


def test_datasets_are_separate_by_fingerprint(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(1)
    ledger.record("art", FP, EVENT, total=total)
    ledger.record("art", "hmac-sha256:other", EVENT, total=total)
    assert sorted(ledger.datasets_named("art")) == sorted([FP, "hmac-sha256:other"])


def test_a_crash_between_write_and_rename_loses_nothing(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(3)
    ledger.record("art", FP, EVENT, total=total)
    before = ledger.path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ledger.record("art", FP, EVENT, total=total)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    ledger.record("art", FP, EVENT, total=total)
    assert count(ledger) == 2


def test_a_killed_writer_leaves_a_readable_ledger(tmp_path):
    """A process killed right after writing its temp file (before the rename)."""
    path = tmp_path / "art.json"
    Ledger(path).record("art", FP, EVENT, total=budget_for_exactly(3))
    script = _bootstrap() + textwrap.dedent(f"""
        import os, signal
        from comfyui_dp_adapt.dp.ledger import Ledger, TotalBudget
        from comfyui_dp_adapt.dp.accounting import release_event
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        Ledger({str(path)!r}).record("art", {FP!r}, release_event(noise_multiplier=3.75, sampling_rate=1.0),
                                     total=TotalBudget(epsilon=100.0, delta=1e-5))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0
    assert count(Ledger(path)) == 1
    Ledger(path).record("art", FP, EVENT, total=budget_for_exactly(3))
    assert count(Ledger(path)) == 2


def _bootstrap() -> str:
    return textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("comfyui_dp_adapt")
        package.__path__ = [{str(PACK_ROOT)!r}]
        sys.modules["comfyui_dp_adapt"] = package
    """)


def test_two_processes_releasing_at_once_are_serialised(tmp_path):
    path = tmp_path / "art.json"
    k = 3
    total = budget_for_exactly(k)
    script = _bootstrap() + textwrap.dedent(f"""
        from comfyui_dp_adapt.dp.ledger import Ledger, TotalBudget
        from comfyui_dp_adapt.dp.accounting import release_event
        from comfyui_dp_adapt.dp.errors import BudgetExceededError
        ledger = Ledger({str(path)!r})
        event = release_event(noise_multiplier=3.75, sampling_rate=1.0)
        total = TotalBudget(epsilon={total.epsilon!r}, delta={total.delta!r})
        ok = 0
        for _ in range({k}):
            try:
                ledger.record("art", {FP!r}, event, total=total)
                ok += 1
            except BudgetExceededError:
                pass
        print(ok)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    successes = [int(p.communicate(timeout=300)[0].strip()) for p in procs]
    assert sum(successes) == k
    data = json.loads(path.read_text())
    assert len(data["datasets"][f"art|{FP}"]["releases"]) == k


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b'{"format": "something-else", "version": 1, "datasets": {}}', LedgerFormatError),
        (
            b'{"format": "comfyui-dp-adapt-ledger", "version": 99, "datasets": {}}',
            LedgerFormatError,
        ),
        (b'{"format": "comfyui-dp-adapt-ledger", "version": 1, "datas', LedgerCorruptError),
        (b"\xff\xfe not json", LedgerCorruptError),
        (
            b'{"format": "comfyui-dp-adapt-ledger", "version": 1, "datasets": {"art|x": '
            b'{"name": "art", "fingerprint": "x", "total": {"epsilon": 1, "delta": 1e-5}, '
            b'"releases": [{"event": {"type": "Mystery"}}]}}}',
            LedgerCorruptError,
        ),
    ],
)
def test_unknown_or_corrupted_ledgers_are_refused_and_left_untouched(tmp_path, content, error):
    path = tmp_path / "art.json"
    path.write_bytes(content)
    ledger = Ledger(path)
    with pytest.raises(error) as raised:
        ledger.record("art", FP, EVENT, total=budget_for_exactly(2))
    assert "untouched" in str(raised.value)
    with pytest.raises(error):
        ledger.spent("art", FP, delta=DELTA)
    assert path.read_bytes() == content


def test_raising_the_total_later_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=3.0, delta=DELTA))
    with pytest.raises(InvalidParameterError, match="overspending"):
        ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=10.0, delta=DELTA))
    ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=2.5, delta=DELTA))
    pinned = json.loads(ledger.path.read_text())["datasets"][f"art|{FP}"]["total"]
    assert pinned["epsilon"] == 2.5, "a smaller total tightens the budget"


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".hidden"])
def test_ledger_names_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(InvalidParameterError, match="ledger name"):
        default_ledger_path(tmp_path, name)


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0, 1e-5), (float("nan"), 1e-5), (1, 0), (1, 1), (-1, 0.5)]
)
def test_bad_totals_are_refused(epsilon, delta):
    with pytest.raises(InvalidParameterError):
        TotalBudget(epsilon=epsilon, delta=delta)
