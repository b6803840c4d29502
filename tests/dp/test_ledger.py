"""The budget ledger: refusal, PLD composition, pinned totals, crash safety, concurrency,
and unreadable files left byte for byte as found."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from comfyui_dp_adapt.dp import ledger as ledger_module
from comfyui_dp_adapt.dp.accounting import (
    compose_epsilon,
    epsilon_for,
    event_from_dict,
    event_to_dict,
    release_event,
)
from comfyui_dp_adapt.dp.errors import (
    BudgetExceededError,
    InvalidParameterError,
    LedgerCorruptError,
    LedgerError,
    LedgerFormatError,
)
from comfyui_dp_adapt.dp.ledger import (
    Ledger,
    TotalBudget,
    dataset_key,
    default_ledger_path,
    sanitize_ledger_name,
)

DELTA = 1e-5
EVENT = release_event(noise_multiplier=3.75, sampling_rate=1.0)  # epsilon ~1 at 1e-5
SAMPLED = release_event(noise_multiplier=2.0, sampling_rate=0.2)
FP = "hmac-sha256:0123abcd"


def budget_for_exactly(k: int, event=EVENT) -> TotalBudget:
    """The total that admits exactly k releases of ``event``: their composed epsilon."""
    return TotalBudget(epsilon=compose_epsilon([event] * k, delta=DELTA), delta=DELTA)


def recorded(ledger: Ledger, fingerprint: str = FP) -> list[dict]:
    data = json.loads(ledger.path.read_text())
    return data["datasets"][dataset_key("art", fingerprint)]["releases"]


def test_a_release_is_stored_in_the_documented_format(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    check = ledger.record("art", FP, SAMPLED, total=TotalBudget(5.0, DELTA), label="TI run")
    data = json.loads(ledger.path.read_text())
    assert data["format"] == "comfyui-dp-adapt-ledger" and data["version"] == 1
    entry = data["datasets"][f"art|{FP}"]
    assert entry["name"] == "art" and entry["fingerprint"] == FP
    assert entry["total"] == {"epsilon": 5.0, "delta": DELTA}
    (only,) = entry["releases"]
    assert event_from_dict(only["event"]) == SAMPLED
    assert only["epsilon"] == epsilon_for(SAMPLED, delta=DELTA) == check.requested
    assert only["label"] == "TI run" and only["time"].startswith("20")
    assert ledger.releases("art", FP) == [SAMPLED]
    assert (check.spent, check.ok) == (0.0, True)
    assert check.total_after == check.requested
    assert check.remaining == 5.0
    assert ledger.total("art", FP) == TotalBudget(5.0, DELTA)


def test_refuses_overspend_stating_spent_requested_and_total(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(2)
    ledger.record("art", FP, EVENT, total=total)
    ledger.record("art", FP, EVENT, total=total)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceededError) as error:
        ledger.record("art", FP, EVENT, total=total)
    message = str(error.value)
    spent = compose_epsilon([EVENT] * 2, delta=DELTA)
    requested = epsilon_for(EVENT, delta=DELTA)
    assert f"spent epsilon {spent:.6g}" in message
    assert f"requests epsilon {requested:.6g}" in message
    assert f"total budget epsilon {total.epsilon:g}" in message
    assert ledger.path.read_bytes() == before
    check = ledger.check("art", FP, EVENT, total=total)
    assert not check.ok and check.total_after > total.epsilon
    assert check.spent == pytest.approx(spent) and check.remaining == pytest.approx(0, abs=1e-12)


def test_spending_is_the_pld_composition_of_all_records_not_their_sum(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    events = [EVENT, SAMPLED, EVENT]
    for event in events:
        ledger.record("art", FP, event, total=TotalBudget(50.0, DELTA))
    spent = ledger.spent("art", FP, delta=DELTA)
    assert spent == compose_epsilon(events, delta=DELTA)
    assert spent < sum(r["epsilon"] for r in recorded(ledger))
    # ... and a budget that the sum of epsilons would refuse admits a fourth release.
    total = TotalBudget(epsilon=compose_epsilon([*events, EVENT], delta=DELTA), delta=DELTA)
    assert total.epsilon < sum(epsilon_for(e, delta=DELTA) for e in [*events, EVENT])
    ledger_two = Ledger(tmp_path / "two.json")
    for event in [*events, EVENT]:
        ledger_two.record("art", FP, event, total=total)
    assert len(ledger_two.releases("art", FP)) == 4


def test_check_reads_only(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "art.json")
    check = ledger.check("art", FP, EVENT, total=budget_for_exactly(1))
    assert check.ok and not ledger.path.parent.exists()
    ledger.record("art", FP, EVENT, total=budget_for_exactly(2))
    before = ledger.path.read_bytes()
    ledger.check("art", FP, EVENT, total=budget_for_exactly(2))
    assert ledger.path.read_bytes() == before


def test_datasets_are_separate_by_fingerprint(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(1)
    ledger.record("art", FP, EVENT, total=total)
    ledger.record("art", "hmac-sha256:other", EVENT, total=total)
    with pytest.raises(BudgetExceededError):
        ledger.record("art", FP, EVENT, total=total)
    assert sorted(ledger.datasets_named("art")) == sorted([FP, "hmac-sha256:other"])
    assert ledger.datasets_named("photos") == []


def test_the_total_is_pinned_raising_is_refused_lowering_tightens_for_good(tmp_path):
    ledger = Ledger(tmp_path / "art.json")
    ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=3.0, delta=DELTA))
    before = ledger.path.read_bytes()
    for larger in (TotalBudget(10.0, DELTA), TotalBudget(3.0, 2 * DELTA)):
        with pytest.raises(InvalidParameterError, match="pinned") as error:
            ledger.record("art", FP, EVENT, total=larger)
        assert "epsilon 3" in str(error.value)
        with pytest.raises(InvalidParameterError, match="pinned"):
            ledger.check("art", FP, EVENT, total=larger)
    assert ledger.path.read_bytes() == before
    ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=2.5, delta=DELTA))
    assert ledger.total("art", FP) == TotalBudget(2.5, DELTA)
    with pytest.raises(InvalidParameterError, match="pinned"):
        ledger.record("art", FP, EVENT, total=TotalBudget(epsilon=3.0, delta=DELTA))


def test_a_failed_rename_loses_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "art.json")
    total = budget_for_exactly(3)
    ledger.record("art", FP, EVENT, total=total)
    before = ledger.path.read_bytes()

    def power_cut(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(ledger_module.os, "replace", power_cut)
    with pytest.raises(LedgerError, match="power cut"):
        ledger.record("art", FP, EVENT, total=total)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art.json", "art.json.lock"]
    ledger.record("art", FP, EVENT, total=total)
    assert len(ledger.releases("art", FP)) == 2


needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(),
    reason="forked writer processes need the fork start method (POSIX)",
)


def _killed_writer(path: Path, total: TotalBudget) -> None:
    """Dies (like a kill -9 or a power cut) right after fsync'ing its temp file."""
    os.replace = lambda *args, **kwargs: os._exit(9)
    Ledger(path).record("art", FP, EVENT, total=total)
    os._exit(0)  # not reached


@needs_fork
def test_a_writer_killed_between_write_and_rename_loses_nothing(tmp_path):
    path = tmp_path / "art.json"
    total = budget_for_exactly(3)
    Ledger(path).record("art", FP, EVENT, total=total, label="first")
    before = path.read_bytes()
    writer = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(path, total))
    writer.start()
    writer.join(timeout=120)
    assert writer.exitcode == 9
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, "the killed writer's temp file is left behind"
    leftovers[0].write_text("garbage that must never be read")
    assert path.read_bytes() == before
    ledger = Ledger(path)
    assert ledger.releases("art", FP) == [EVENT]
    ledger.record("art", FP, EVENT, total=total, label="second")
    assert [r["label"] for r in recorded(ledger)] == ["first", "second"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "leftover cleaned"


def _racing_writer(path: Path, total: TotalBudget, tag: str, attempts: int, go: Path, out) -> None:
    while not go.exists():
        time.sleep(0.005)
    ok = 0
    for i in range(attempts):
        try:
            Ledger(path).record("art", FP, SAMPLED, total=total, label=f"{tag}{i}")
            ok += 1
        except BudgetExceededError:
            pass
        time.sleep(0.05)  # like separate prompts: lets the other process take the lock
    out.put((tag, ok))


@needs_fork
def test_two_processes_recording_at_once_are_serialised(tmp_path):
    path, go, k = tmp_path / "art.json", tmp_path / "go", 4
    total = budget_for_exactly(k, SAMPLED)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    writers = [
        context.Process(target=_racing_writer, args=(path, total, tag, k, go, out)) for tag in "ab"
    ]
    for writer in writers:
        writer.start()
    go.touch()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0]
    successes = dict(out.get(timeout=10) for _ in writers)
    assert sum(successes.values()) == k, successes
    releases = recorded(Ledger(path))  # parses: the file is valid JSON
    labels = [r["label"] for r in releases]
    assert len(labels) == k and len(set(labels)) == k, labels
    assert sorted(labels) == sorted(f"{tag}{i}" for tag, n in successes.items() for i in range(n))
    assert Ledger(path).spent("art", FP, delta=DELTA) <= total.epsilon


VALID_ENTRY = {
    "name": "art",
    "fingerprint": "x",
    "total": {"epsilon": 1, "delta": 1e-5},
    "releases": [
        {
            "event": event_to_dict(EVENT),
            "epsilon": 0.99,
            "time": "2026-01-01T00:00:00+00:00",
            "label": "",
        }
    ],
}


def _ledger_bytes(**changes) -> bytes:
    data = {"format": "comfyui-dp-adapt-ledger", "version": 1, "datasets": {"art|x": VALID_ENTRY}}
    data.update(changes)
    return json.dumps(data).encode()


def _with_release(**changes) -> bytes:
    release = {**VALID_ENTRY["releases"][0], **changes}
    return _ledger_bytes(datasets={"art|x": {**VALID_ENTRY, "releases": [release]}})


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (_ledger_bytes(format="something-else"), LedgerFormatError, "not a comfyui-dp-adapt"),
        (b"[1, 2]", LedgerFormatError, "not a comfyui-dp-adapt"),
        (_ledger_bytes(version=2), LedgerFormatError, "version 2"),
        (_ledger_bytes(version="1"), LedgerFormatError, "version '1'"),
        (b'{"format": "comfyui-dp-adapt-ledger", "version": 1, "datas', LedgerCorruptError, "JSON"),
        (b"", LedgerCorruptError, "JSON"),
        (b"\xff\xfe not json", LedgerCorruptError, "JSON"),
        (_ledger_bytes(datasets=[]), LedgerCorruptError, "datasets"),
        (_with_release(event={"type": "Mystery"}), LedgerCorruptError, "DpEvent"),
        (_with_release(event={"type": "Gaussian"}), LedgerCorruptError, "DpEvent"),
        (_with_release(epsilon="a lot"), LedgerCorruptError, "epsilon"),
        (_ledger_bytes(datasets={"other|x": VALID_ENTRY}), LedgerCorruptError, "key"),
        (
            _ledger_bytes(
                datasets={"art|x": {**VALID_ENTRY, "total": {"epsilon": -1, "delta": 0}}}
            ),
            LedgerCorruptError,
            "total",
        ),
    ],
)
def test_unknown_or_corrupted_ledgers_are_refused_and_left_untouched(
    tmp_path, content, error, message
):
    path = tmp_path / "art.json"
    path.write_bytes(content)
    ledger = Ledger(path)
    with pytest.raises(error, match=message) as raised:
        ledger.record("art", FP, EVENT, total=budget_for_exactly(2))
    assert "untouched" in str(raised.value)
    for read in (
        lambda: ledger.spent("art", FP, delta=DELTA),
        lambda: ledger.check("art", FP, EVENT, total=budget_for_exactly(2)),
        lambda: ledger.releases("art", FP),
        lambda: ledger.datasets_named("art"),
    ):
        with pytest.raises(error):
            read()
    assert path.read_bytes() == content


def test_the_valid_fixture_ledger_reads_back(tmp_path):
    # Guards the corruption cases above: the unaltered document is accepted.
    path = tmp_path / "art.json"
    path.write_bytes(_ledger_bytes())
    assert Ledger(path).releases("art", "x") == [EVENT]


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "", "   ", "..", ".hidden", "x..y", "con", "NUL.txt", "a.", 7]
)
def test_ledger_names_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(InvalidParameterError, match="ledger name"):
        default_ledger_path(tmp_path, name)
    with pytest.raises(InvalidParameterError, match="ledger name"):
        Ledger(tmp_path / "l.json").record(name, FP, EVENT, total=budget_for_exactly(1))
    assert list(tmp_path.iterdir()) == []


def test_ledger_paths_stay_in_their_directory(tmp_path):
    assert sanitize_ledger_name("  my art v1.2 ") == "my art v1.2"
    path = default_ledger_path(tmp_path, "my art_v1-2")
    assert path == tmp_path / "my art_v1-2.json"
    assert path.resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize("fingerprint", ["", "has space", None, "x" * 300, "tab\there"])
def test_bad_fingerprints_are_refused(tmp_path, fingerprint):
    with pytest.raises(InvalidParameterError, match="fingerprint"):
        Ledger(tmp_path / "art.json").record("art", fingerprint, EVENT, total=budget_for_exactly(1))
    assert not (tmp_path / "art.json").exists()


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0, 1e-5), (float("nan"), 1e-5), (1, 0), (1, 1), (-1, 0.5), (True, 0.1)]
)
def test_bad_totals_are_refused(epsilon, delta):
    with pytest.raises(InvalidParameterError, match="total"):
        TotalBudget(epsilon=epsilon, delta=delta)


def test_a_total_must_be_a_total_budget(tmp_path):
    with pytest.raises(InvalidParameterError, match="TotalBudget"):
        Ledger(tmp_path / "art.json").record("art", FP, EVENT, total=(1.0, 1e-5))


def test_ledger_files_use_an_atomic_replace(tmp_path, monkeypatch):
    """Every write goes through os.replace of a fsync'ed temp file in the same folder."""
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        ledger_module.os,
        "replace",
        lambda a, b: (calls.append(("replace", a, b)), real_replace(a, b)),
    )
    monkeypatch.setattr(
        ledger_module.os, "fsync", lambda fd: (calls.append(("fsync",)), real_fsync(fd))
    )
    ledger = Ledger(tmp_path / "art.json")
    ledger.record("art", FP, EVENT, total=budget_for_exactly(1))
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"], "file fsync, rename, folder fsync"
    _, source, target = calls[1]
    assert Path(source).parent == tmp_path and Path(target) == ledger.path
