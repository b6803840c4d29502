"""The budget ledger protects people, not folders: images shared between collections share
their spending, adding/removing/renaming never opens a fresh budget, the public refusal
depends on the collection's history only, identical requests are reused, and the file
survives crashes, concurrent writers and tampering (left byte for byte as found)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import rdp

from comfyui_dp_adapt.dp import ledger as ledger_module
from comfyui_dp_adapt.dp.accounting import (
    RDP_FILTER_ORDERS,
    compose_epsilon,
    epsilon_for,
    event_from_dict,
    event_rdp,
    event_to_dict,
    filter_order,
    gdp_mu_limit,
    rdp_budget,
    release_event,
    safe_delta,
)
from comfyui_dp_adapt.dp.errors import (
    BudgetExceededError,
    InvalidParameterError,
    LedgerCorruptError,
    LedgerError,
    LedgerFormatError,
)
from comfyui_dp_adapt.dp.fingerprint import key_check_value, keyed_fingerprint, load_or_create_key
from comfyui_dp_adapt.dp.ledger import (
    Commit,
    Ledger,
    RecordedRelease,
    TotalBudget,
    default_ledger_path,
    sanitize_ledger_name,
)

PACK_ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
EVENT = release_event(noise_multiplier=3.75, sampling_rate=1.0)  # epsilon ~1 at 1e-5
SAMPLED = release_event(noise_multiplier=2.0, sampling_rate=0.2)


def budget_for_exactly(k: int, event=EVENT) -> TotalBudget:
    """A total that admits exactly k releases of the Gaussian ``event``: their composed PLD
    epsilon (for Gaussians it matches the exact, Gaussian-DP one to ~1e-9) plus a hair for
    the filter's safety margin, far below the epsilon of k + 1 releases."""
    return TotalBudget(epsilon=compose_epsilon([event] * k, delta=DELTA) * (1 + 1e-6), delta=DELTA)


def rdp_budget_for_exactly(k: int, event=SAMPLED) -> TotalBudget:
    """The total whose Renyi filter admits exactly k releases of the subsampled ``event``:
    the RDP accountant's epsilon of k releases over the filter's orders (the order it picks
    is then the filter's pinned alpha*), plus a hair for rounding."""
    accountant = rdp.RdpAccountant(orders=[float(a) for a in RDP_FILTER_ORDERS])
    accountant.compose(event, k)
    return TotalBudget(accountant.get_epsilon(safe_delta(DELTA)) * (1 + 1e-9), DELTA)


_requests = iter(range(10**9))


def commit(
    ledger: Ledger,
    image_keys,
    *,
    collection: str = "art",
    total: TotalBudget | None = None,
    event=EVENT,
    request_key: str | None = None,
    label: str = "",
    result: dict | None = None,
    key_check: str | None = None,
) -> tuple[Commit, tuple[bool, ...] | None]:
    """One commit; returns it and the mask ``release`` was called with (None if not)."""
    masks = []

    def release(mask):
        masks.append(mask)
        return result if result is not None else {"estimate": [random.random()]}

    done = ledger.commit(
        collection=collection,
        total=total or budget_for_exactly(2),
        event=event,
        image_keys=image_keys,
        request_key=request_key or f"request-{next(_requests)}",
        label=label,
        release=release,
        key_check=key_check,
    )
    assert len(masks) <= 1
    return done, (masks[0] if masks else None)


def never_called(mask):
    raise AssertionError("release must not be called")


def spent_on(ledger: Ledger, key: str) -> float:
    return ledger.image_spent(key, delta=DELTA)


# --- format ---------------------------------------------------------------------------


def test_a_release_is_stored_in_the_documented_format_without_timestamps(tmp_path):
    ledger = Ledger(default_ledger_path(tmp_path))
    assert ledger.path == tmp_path / "ledger.json"
    done, mask = commit(
        ledger,
        ["img-a", "img-b"],
        total=TotalBudget(5.0, DELTA),
        event=SAMPLED,
        request_key="req-1",
        label="TI run",
        result={"estimate": [0.5, -1.25], "dimension": 2},
    )
    assert mask == (True, True) and not done.reused
    text = ledger.path.read_text()
    data = json.loads(text)
    assert set(data) == {"format", "version", "collections", "releases", "images"}
    assert data["format"] == "comfyui-dp-adapt-ledger" and data["version"] == 3
    assert re.fullmatch(r"[0-9a-f]{32}", done.release_id)
    # A subsampled first release pins a Renyi filter at the order chosen from it alone.
    pinned = {"kind": "rdp", "order": filter_order(SAMPLED, epsilon=5.0, delta=DELTA)}
    assert data["collections"] == {
        "art": {
            "total": {"epsilon": 5.0, "delta": DELTA},
            "releases": [done.release_id],
            "filter": pinned,
        }
    }
    stored = data["releases"][done.release_id]
    assert set(stored) == {"collection", "event", "epsilon", "label", "request_key", "result"}
    assert event_from_dict(stored["event"]) == SAMPLED
    assert stored["epsilon"] == epsilon_for(SAMPLED, delta=DELTA) == done.check.requested
    assert (stored["label"], stored["request_key"]) == ("TI run", "req-1")
    assert stored["result"] == done.result == {"estimate": [0.5, -1.25], "dimension": 2}
    for key in ("img-a", "img-b"):
        assert data["images"][key] == {
            "total": {"epsilon": 5.0, "delta": DELTA},
            "releases": [done.release_id],
            "filter": pinned,
        }
    # No wall-clock time anywhere (a release's duration depends on the private images).
    assert not re.search(r"\d{4}-\d{2}-\d{2}|T\d{2}:\d{2}", text)
    assert "time" not in text.lower() and "date" not in text.lower()
    assert (done.check.spent, done.check.ok, done.check.remaining) == (0.0, True, 5.0)
    assert ledger.collections() == ["art"] and ledger.total("art") == TotalBudget(5.0, DELTA)


def test_results_expose_neither_the_mask_nor_any_count_of_images():
    assert [f.name for f in fields(Commit)] == ["release_id", "result", "reused", "check"]
    assert [f.name for f in fields(RecordedRelease)] == [
        "release_id",
        "collection",
        "event",
        "label",
        "result",
    ]


# --- the per-image guarantee ------------------------------------------------------------


def test_collections_sharing_images_share_their_spending(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    total = budget_for_exactly(2)
    for _ in range(2):
        _, mask = commit(ledger, ["a", "b"], collection="art", total=total)
        assert mask == (True, True)
    spent_a = spent_on(ledger, "a")
    assert spent_a == pytest.approx(total.epsilon)

    # Another collection name, same people: "a" and "b" are spent, the new image is not.
    done, mask = commit(ledger, ["a", "fresh", "b"], collection="photos", total=total)
    assert mask == (False, True, False)
    assert spent_on(ledger, "a") == spent_a and spent_on(ledger, "b") == spent_a
    assert spent_on(ledger, "fresh") == epsilon_for(EVENT, delta=DELTA)
    assert done.check.spent == 0.0  # the collection itself was fresh: a public fact


def test_adding_removing_reencoding_or_renaming_never_gives_a_fresh_budget(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    total = budget_for_exactly(2)
    folder = ["a", "b", "c"]
    for _ in range(2):
        commit(ledger, folder, collection="art", total=total)
    spent = {key: spent_on(ledger, key) for key in folder}
    with pytest.raises(BudgetExceededError):  # the collection itself is spent
        commit(ledger, [*folder, "d"], collection="art", total=total)
    variants = {
        "art plus one": [*folder, "d"],  # one image added
        "art minus one": ["a", "b"],  # one image removed
        "art reencoded": ["a", "b", "c-reencoded"],  # one image re-encoded: a new key
        "art renamed": folder,  # the same folder under another name
    }
    for name, keys in variants.items():
        _, mask = commit(ledger, keys, collection=name, total=total)
        assert mask == tuple(key not in folder for key in keys), name
        assert {key: spent_on(ledger, key) for key in folder} == spent, name


def test_an_image_keeps_the_total_of_its_first_collection(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    small, large = budget_for_exactly(2), budget_for_exactly(5)
    for _ in range(2):
        commit(ledger, ["a"], collection="small", total=small)
    # A collection with a larger total does not raise the image's own total ...
    _, mask = commit(ledger, ["a", "new"], collection="large", total=large)
    assert mask == (False, True)
    # ... while an image first released there does get it.
    for _ in range(4):
        _, mask = commit(ledger, ["a", "new"], collection="large", total=large)
        assert mask == (False, True)
    assert spent_on(ledger, "new") == pytest.approx(large.epsilon)
    assert spent_on(ledger, "a") == pytest.approx(small.epsilon)


def test_a_smaller_total_tightens_an_image_total_for_good(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a", "b"], collection="loose", total=budget_for_exactly(5))
    # A strict collection admits one release in all: both images already took part in one.
    strict = budget_for_exactly(1)
    _, mask = commit(ledger, ["a", "fresh"], collection="strict", total=strict)
    assert mask == (False, True)
    # "fresh" took its only release under the strict total; the loose collection cannot
    # raise it back.
    _, mask = commit(ledger, ["a", "fresh"], collection="loose", total=budget_for_exactly(5))
    assert mask == (True, False)
    assert spent_on(ledger, "fresh") == pytest.approx(strict.epsilon)
    data = json.loads(ledger.path.read_text())
    assert data["images"]["fresh"]["total"] == {"epsilon": strict.epsilon, "delta": DELTA}

    # An image charged under a smaller total keeps it: "b" (one release under the loose
    # total) takes part in a release of a medium collection and is then held to it.
    medium, loose = budget_for_exactly(3), budget_for_exactly(5)
    _, mask = commit(ledger, ["b"], collection="medium", total=medium)
    assert mask == (True,)
    masks = [commit(ledger, ["b"], collection="loose", total=loose)[1] for _ in range(2)]
    assert masks == [(True,), (False,)]
    assert spent_on(ledger, "b") == pytest.approx(medium.epsilon)


def test_each_image_is_charged_once_per_release_even_if_listed_twice(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    _, mask = commit(ledger, ["a", "b", "a", "a"])
    assert mask == (True, True, False, False)
    assert spent_on(ledger, "a") == epsilon_for(EVENT, delta=DELTA)
    assert json.loads(ledger.path.read_text())["images"]["a"]["releases"] == [
        json.loads(ledger.path.read_text())["collections"]["art"]["releases"][0]
    ]


def test_no_image_ever_spends_more_than_its_total(tmp_path):
    """Random collections, totals, events and folders: the filter's invariant holds."""
    rng = random.Random(7)
    ledger = Ledger(tmp_path / "ledger.json")
    people = [f"p{i}" for i in range(6)]
    totals = {name: budget_for_exactly(k) for name, k in (("x", 2), ("y", 3), ("z", 1))}
    first_total: dict[str, TotalBudget] = {}
    for step in range(12):
        name = rng.choice(sorted(totals))
        keys = rng.sample(people, rng.randint(0, len(people)))
        try:
            _, mask = commit(ledger, keys, collection=name, total=totals[name])
        except BudgetExceededError:
            continue
        for key, included in zip(keys, mask, strict=True):
            if included:
                first_total.setdefault(key, totals[name])
        for key in people:
            if key in first_total:
                assert spent_on(ledger, key) <= first_total[key].epsilon, (step, key)
    for name, total in totals.items():
        assert ledger.spent(name, delta=DELTA) <= total.epsilon
    assert first_total, "some releases went ahead"


# --- the public, collection-level decision ----------------------------------------------


@pytest.mark.parametrize("keys", [[], ["a"], ["fresh"], ["a", "fresh", "b"], ["x"] * 3])
def test_the_collection_refusal_depends_only_on_its_history(tmp_path, keys):
    ledger = Ledger(tmp_path / "ledger.json")
    total = budget_for_exactly(2)
    commit(ledger, ["a", "b"], collection="other", total=total)
    commit(ledger, ["a", "b"], collection="other", total=total)  # a and b now spent
    commit(ledger, ["a"], collection="art", total=total)
    # One release left in "art": it goes ahead whichever images are passed.
    done, mask = commit(ledger, keys, collection="art", total=total)
    assert done.check.ok and len(mask) == len(keys)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceededError) as error:
        ledger.commit(
            collection="art",
            total=total,
            event=EVENT,
            image_keys=keys,
            request_key="refused",
            label="",
            release=never_called,
        )
    spent = compose_epsilon([EVENT] * 2, delta=DELTA)
    # The rule that refused (three Gaussians are mu-GDP with mu = sqrt(3) / z), then the
    # non-adaptive PLD estimate.
    mu = (3 / EVENT.noise_multiplier**2) ** 0.5
    assert str(error.value) == (
        "privacy budget of collection 'art' would be exceeded: by the Gaussian-DP filter "
        "(Smith & Thakurta 2022, fully adaptive composition), its releases with this one are "
        f"mu-GDP with mu = {mu:.6g}, and the total allows mu <= "
        f"{gdp_mu_limit(epsilon=total.epsilon, delta=DELTA):.6g}. Non-adaptive estimate (PLD "
        f"composition): spent epsilon {spent:.6g}, this release epsilon "
        f"{epsilon_for(EVENT, delta=DELTA):.6g}, together "
        f"{compose_epsilon([EVENT] * 3, delta=DELTA):.6g}, of total budget epsilon "
        f"{total.epsilon:g} at delta {DELTA:g}. Nothing was released."
    )
    assert ledger.path.read_bytes() == before
    check = ledger.check(collection="art", event=EVENT, total=total)
    assert not check.ok and check.spent == pytest.approx(spent)


@pytest.mark.parametrize("event", [EVENT, SAMPLED], ids=["gaussian", "subsampled"])
def test_spending_is_the_pld_composition_not_the_sum(tmp_path, event):
    # One kind per history: a collection whose first release is Gaussian (q = 1) takes
    # Gaussian releases only (see the filter tests below), so each kind is checked alone.
    ledger = Ledger(tmp_path / "ledger.json")
    events = [event] * 3
    for one in events:
        commit(ledger, ["a"], event=one, total=TotalBudget(50.0, DELTA))
    assert ledger.spent("art", delta=DELTA) == compose_epsilon(events, delta=DELTA)
    assert spent_on(ledger, "a") == compose_epsilon(events, delta=DELTA)
    assert ledger.spent("art", delta=DELTA) < sum(epsilon_for(e, delta=DELTA) for e in events)
    # The filters compose too: a total that the sum of epsilons would refuse admits a
    # fourth release.
    total = budget_for_exactly(4) if event is EVENT else rdp_budget_for_exactly(4)
    assert total.epsilon < 4 * epsilon_for(event, delta=DELTA)
    other = Ledger(tmp_path / "other.json")
    for _ in range(4):
        _, mask = commit(other, ["a"], event=event, total=total)
        assert mask == (True,)


def test_check_reads_only(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.json")
    assert ledger.check(collection="art", event=EVENT, total=budget_for_exactly(1)).ok
    assert not ledger.path.parent.exists()
    commit(ledger, ["a"])
    before = ledger.path.read_bytes()
    ledger.check(collection="art", event=EVENT, total=budget_for_exactly(2))
    ledger.spent("art", delta=DELTA)
    ledger.image_spent("a", delta=DELTA)
    ledger.find_release("request-x")
    assert ledger.path.read_bytes() == before


def test_the_total_is_pinned_raising_is_refused_lowering_tightens_for_good(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], total=TotalBudget(3.0, DELTA))
    before = ledger.path.read_bytes()
    for larger in (TotalBudget(10.0, DELTA), TotalBudget(3.0, 2 * DELTA)):
        with pytest.raises(InvalidParameterError, match="pinned") as error:
            commit(ledger, ["a"], total=larger)
        assert "epsilon 3" in str(error.value)
        with pytest.raises(InvalidParameterError, match="pinned"):
            ledger.check(collection="art", event=EVENT, total=larger)
    assert ledger.path.read_bytes() == before
    commit(ledger, ["a"], total=TotalBudget(2.5, DELTA))
    assert ledger.total("art") == TotalBudget(2.5, DELTA)
    with pytest.raises(InvalidParameterError, match="pinned"):
        commit(ledger, ["a"], total=TotalBudget(3.0, DELTA))


# --- fully adaptive filters (docs/privacy.md §7) --------------------------------------------


def _commits_until_refused(ledger, event, total, *, limit=50, collection="art", keys=("a",)):
    """How many releases of ``event`` the collection admits before refusing one."""
    for count in range(limit):
        try:
            commit(ledger, list(keys), collection=collection, total=total, event=event)
        except BudgetExceededError as error:
            return count, str(error)
    raise AssertionError(f"no refusal within {limit} releases")


@pytest.mark.parametrize("side", [1 + 1e-6, 1 - 1e-6])
def test_a_gaussian_history_is_admitted_up_to_the_exact_gdp_limit_and_no_further(tmp_path, side):
    # k Gaussians with multiplier z compose to one with z / sqrt(k) (mu-GDP, mu^2 = k / z^2):
    # the largest z whose k-fold composition meets the total exactly is sqrt(k) z*, with z*
    # the analytic Gaussian noise for the total (Balle & Wang 2018).
    k, total = 4, TotalBudget(2.0, DELTA)
    z = k**0.5 * dpa.get_sigma_gaussian(total.epsilon, total.delta) * side
    event = dpa.GaussianDpEvent(z)
    ledger = Ledger(tmp_path / "ledger.json")
    admitted, message = _commits_until_refused(ledger, event, total)
    assert admitted == (k if side > 1 else k - 1)
    assert "Gaussian-DP filter (Smith & Thakurta 2022" in message
    assert f"mu = {((admitted + 1) / z**2) ** 0.5:.6g}" in message
    # The image's own filter is the same rule: a fresh collection cannot add one more.
    _, mask = commit(ledger, ["a", "b"], collection="other", total=total, event=event)
    assert mask == (False, True)


def test_a_gaussian_collection_refuses_a_subsampled_release_and_a_gaussian_image_is_excluded(
    tmp_path,
):
    ledger = Ledger(tmp_path / "ledger.json")
    total = TotalBudget(50.0, DELTA)
    commit(ledger, ["a"], collection="gauss", total=total, event=EVENT)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceededError) as error:
        commit(ledger, ["a"], collection="gauss", total=total, event=SAMPLED)
    message = str(error.value)
    assert "cannot take this release" in message and "Poisson-subsampled (q < 1)" in message
    assert "each picture keeps its own history" in message and "only take part in q = 1" in message
    assert ledger.path.read_bytes() == before
    assert not ledger.check(collection="gauss", event=SAMPLED, total=total).ok
    # A fresh collection name goes ahead, but "a" (a Gaussian history) sits it out silently.
    done, mask = commit(ledger, ["a", "b"], collection="sampled", total=total, event=SAMPLED)
    assert mask == (False, True) and done.check.ok
    # The other way round is allowed: "b" (first released with q < 1, a Renyi filter)
    # takes part in a Gaussian release.
    _, mask = commit(ledger, ["a", "b"], collection="gauss", total=total, event=EVENT)
    assert mask == (True, True)


def test_a_dpsgd_run_with_q_one_is_gaussian_and_with_q_below_one_is_not(tmp_path):
    from comfyui_dp_adapt.dp.accounting import dpsgd_event

    ledger = Ledger(tmp_path / "ledger.json")
    total = TotalBudget(50.0, DELTA)
    commit(ledger, ["a"], collection="g", total=total, event=EVENT)
    full = dpsgd_event(noise_multiplier=20.0, sampling_rate=1.0, steps=3)
    sampled = dpsgd_event(noise_multiplier=2.0, sampling_rate=0.5, steps=3)
    assert commit(ledger, ["a"], collection="g", total=total, event=full)[1] == (True,)
    with pytest.raises(BudgetExceededError, match="q < 1"):
        commit(ledger, ["a"], collection="g", total=total, event=sampled)


def _first_then_refused_pair():
    """A subsampled first release F and a total that the PLD composition of [F, F] meets but
    the Renyi filter pinned by F does not: found by computation."""
    for q, z in ((0.2, 1.0), (0.1, 0.8), (0.5, 1.5)):
        first = release_event(noise_multiplier=z, sampling_rate=q)
        total = TotalBudget(compose_epsilon([first, first], delta=DELTA) * (1 + 1e-6), DELTA)
        order = filter_order(first, epsilon=total.epsilon, delta=total.delta)
        (value,) = event_rdp(first, (order,))
        if 2 * value > rdp_budget(order, epsilon=total.epsilon, delta=total.delta):
            return first, total, order
    raise AssertionError("no pair found")


def test_a_renyi_history_takes_its_first_release_at_the_full_pld_budget(tmp_path):
    # One non-adaptive event: its own PLD epsilon decides, even where RDP would refuse it.
    first = release_event(noise_multiplier=1.0, sampling_rate=0.2)
    total = TotalBudget(epsilon_for(first, delta=safe_delta(DELTA)), DELTA)
    assert rdp.RdpAccountant().compose(first).get_epsilon(DELTA) > total.epsilon
    ledger = Ledger(tmp_path / "ledger.json")
    done, mask = commit(ledger, ["a"], total=total, event=first)
    assert mask == (True,) and done.check.decision.first
    # Its RDP alone exceeds the filter's budget, so every later release is refused, however
    # little it spends.
    tiny = release_event(noise_multiplier=1000.0, sampling_rate=0.01)
    with pytest.raises(BudgetExceededError, match="Renyi filter at order"):
        commit(ledger, ["a"], total=total, event=tiny)
    _, mask = commit(ledger, ["a", "b"], collection="other", total=total, event=tiny)
    assert mask == (False, True)


def test_the_renyi_filter_refuses_a_second_release_that_pld_composition_would_allow(tmp_path):
    first, total, order = _first_then_refused_pair()
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], total=total, event=first)
    check = ledger.check(collection="art", event=first, total=total)
    assert check.total_after <= total.epsilon, "the non-adaptive PLD estimate would allow it"
    assert not check.ok
    assert check.decision.filter.order == order
    with pytest.raises(BudgetExceededError) as error:
        commit(ledger, ["a"], total=total, event=first)
    assert f"Renyi filter at order alpha = {order}" in str(error.value)
    # The image's filter agrees: a fresh collection's release excludes "a".
    _, mask = commit(ledger, ["a", "b"], collection="other", total=total, event=first)
    assert mask == (False, True)


def test_the_renyi_order_stays_pinned_when_the_total_is_tightened(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    loose = TotalBudget(5.0, DELTA)
    pinned = filter_order(SAMPLED, epsilon=loose.epsilon, delta=DELTA)
    tighter = [
        TotalBudget(e, DELTA)
        for e in (3.0, 2.0, 1.5, 1.0)
        if filter_order(SAMPLED, epsilon=e, delta=DELTA) != pinned
    ]
    assert tighter, "a smaller total would pick another order for the same first event"
    tight = tighter[0]
    commit(ledger, ["a"], total=loose, event=SAMPLED)
    done, mask = commit(ledger, ["a"], total=tight, event=SAMPLED)
    assert mask == (True,)
    assert done.check.decision.filter.order == pinned
    assert done.check.decision.budget == rdp_budget(pinned, epsilon=tight.epsilon, delta=DELTA)
    data = json.loads(ledger.path.read_text())
    assert data["collections"]["art"]["total"] == tight.as_dict()
    assert data["collections"]["art"]["filter"] == {"kind": "rdp", "order": pinned}
    assert data["images"]["a"]["filter"] == {"kind": "rdp", "order": pinned}


def test_every_history_stays_within_its_filter(tmp_path):
    """Random collections, totals, kinds and folders: for every collection and image the
    recomputed filter value (mu^2 or RDP at alpha*, from the stored events) is within the
    budget of its total, or the history is a single release within its total (PLD)."""
    rng = random.Random(11)
    ledger = Ledger(tmp_path / "ledger.json")
    people = [f"p{i}" for i in range(6)]
    events = [EVENT, SAMPLED, SAMPLED, release_event(noise_multiplier=6.0, sampling_rate=1.0)]
    totals = {
        "x": TotalBudget(2.0, DELTA),
        "y": TotalBudget(3.0, DELTA),
        "z": TotalBudget(1.2, DELTA),
    }
    for _ in range(18):
        name = rng.choice(sorted(totals))
        keys = rng.sample(people, rng.randint(0, len(people)))
        with contextlib.suppress(BudgetExceededError):
            commit(ledger, keys, collection=name, total=totals[name], event=rng.choice(events))
    data = json.loads(ledger.path.read_text())
    stored = {rid: event_from_dict(r["event"]) for rid, r in data["releases"].items()}
    histories = [*data["collections"].values(), *data["images"].values()]
    kinds = {entry["filter"]["kind"] for entry in histories if len(entry["releases"]) > 1}
    assert kinds == {"gaussian", "rdp"}, "both filters composed several releases"
    for entry in histories:
        total, history = TotalBudget(**entry["total"]), [stored[r] for r in entry["releases"]]
        if len(history) == 1:
            assert epsilon_for(history[0], delta=safe_delta(total.delta)) <= total.epsilon
        elif entry["filter"]["kind"] == "gaussian":
            z = sum(e.noise_multiplier**-2 for e in history) ** -0.5
            assert dpa.get_epsilon_gaussian(z, total.delta) <= total.epsilon
        else:
            order = entry["filter"]["order"]
            value = sum(event_rdp(e, (order,))[0] for e in history)
            assert value <= rdp_budget(order, epsilon=total.epsilon, delta=total.delta)


def test_a_version_2_ledger_is_read_with_filters_derived_from_first_releases(tmp_path):
    rids = [f"{i:032x}" for i in range(1, 4)]
    release = lambda collection, event, key: {  # noqa: E731
        "collection": collection,
        "event": event_to_dict(event),
        "epsilon": epsilon_for(event, delta=DELTA),
        "label": "",
        "request_key": key,
        "result": {},
    }
    total = {"epsilon": 5.0, "delta": DELTA}
    # Version 2 decided by PLD: "mixed" holds a Gaussian, then a subsampled release.
    v2 = {
        "format": "comfyui-dp-adapt-ledger",
        "version": 2,
        "collections": {
            "mixed": {"total": total, "releases": rids[:2]},
            "sampled": {"total": total, "releases": rids[2:]},
        },
        "releases": {
            rids[0]: release("mixed", EVENT, "k0"),
            rids[1]: release("mixed", SAMPLED, "k1"),
            rids[2]: release("sampled", SAMPLED, "k2"),
        },
        "images": {
            "g": {"total": total, "releases": rids[:2]},
            "s": {"total": total, "releases": rids[2:]},
        },
    }
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(v2))
    ledger = Ledger(path)
    assert ledger.spent("mixed", delta=DELTA) == compose_epsilon([EVENT, SAMPLED], delta=DELTA)
    assert ledger.total("sampled") == TotalBudget(5.0, DELTA)
    assert path.read_text() == json.dumps(v2), "reading leaves the file as it is"
    # The Gaussian history that already holds a subsampled release admits nothing more.
    with pytest.raises(BudgetExceededError, match="before ledger version 3"):
        commit(ledger, ["g"], collection="mixed", total=TotalBudget(5.0, DELTA), event=EVENT)
    # The subsampled history is a Renyi filter at the order its first release pins.
    _, mask = commit(
        ledger, ["g", "s"], collection="sampled", total=TotalBudget(5.0, DELTA), event=EVENT
    )
    assert mask == (False, True)
    data = json.loads(path.read_text())
    order = filter_order(SAMPLED, epsilon=5.0, delta=DELTA)
    assert data["version"] == 3
    assert data["collections"]["mixed"]["filter"] == {"kind": "gaussian"}
    assert data["collections"]["sampled"]["filter"] == {"kind": "rdp", "order": order}
    assert data["images"]["g"]["filter"] == {"kind": "gaussian"}
    assert data["images"]["s"]["filter"] == {"kind": "rdp", "order": order}
    assert data["images"]["s"]["releases"][:1] == rids[2:]


# --- idempotence --------------------------------------------------------------------------


def test_an_identical_request_reuses_the_recorded_release_and_spends_nothing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    total = budget_for_exactly(1)
    first, _ = commit(ledger, ["a", "b"], total=total, request_key="same", label="run")
    before = ledger.path.read_bytes()
    spent = spent_on(ledger, "a")
    # The collection is now spent: a new release would be refused, the same one is reused.
    again = ledger.commit(
        collection="art",
        total=total,
        event=EVENT,
        image_keys=["a", "b"],
        request_key="same",
        label="run",
        release=never_called,
    )
    assert again.reused and again.release_id == first.release_id
    assert again.result == first.result
    assert again.check.requested == 0.0 and again.check.ok
    assert again.check.spent == pytest.approx(total.epsilon)
    assert ledger.path.read_bytes() == before
    assert spent_on(ledger, "a") == spent
    found = ledger.find_release("same")
    assert found == RecordedRelease(first.release_id, "art", EVENT, "run", first.result)
    assert ledger.find_release("other") is None


# --- nothing is recorded when the release fails -----------------------------------------


def _raise(error: Exception):
    raise error


@pytest.mark.parametrize(
    ("release", "error"),
    [
        (lambda mask: _raise(RuntimeError("noise failed")), RuntimeError),
        (lambda mask: {"estimate": [float("nan")]}, InvalidParameterError),
        (lambda mask: {"estimate": object()}, InvalidParameterError),
        (lambda mask: [1.0, 2.0], InvalidParameterError),
    ],
)
def test_a_failed_release_leaves_the_file_byte_identical(tmp_path, release, error):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"])
    before = ledger.path.read_bytes()
    with pytest.raises(error):
        ledger.commit(
            collection="art",
            total=budget_for_exactly(2),
            event=EVENT,
            image_keys=["a", "b"],
            request_key="failing",
            label="",
            release=release,
        )
    assert ledger.path.read_bytes() == before
    assert ledger.find_release("failing") is None


def test_a_failed_first_release_creates_no_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")

    def boom(mask):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ledger.commit(
            collection="art",
            total=budget_for_exactly(1),
            event=EVENT,
            image_keys=["a"],
            request_key="r",
            label="",
            release=boom,
        )
    assert not ledger.path.exists()


# --- what leaves the ledger --------------------------------------------------------------


def test_messages_and_logs_never_reveal_image_keys_or_their_count(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    total = budget_for_exactly(1)
    outcomes = []
    for n in (7, 13):
        ledger = Ledger(tmp_path / f"{n}" / "ledger.json")
        keys = [f"secret-key-{i}" for i in range(n)]
        commit(ledger, keys[:1], collection="warm", total=total)
        done, _ = commit(ledger, keys, total=total, request_key="r")
        with pytest.raises(BudgetExceededError) as refused:
            commit(ledger, keys, total=total)
        again = ledger.commit(
            collection="art",
            total=TotalBudget(total.epsilon / 2, DELTA),
            event=EVENT,
            image_keys=keys,
            request_key="r",
            label="",
            release=never_called,
        )
        bad = [*keys, "secret key with spaces"]
        with pytest.raises(InvalidParameterError) as invalid:
            commit(ledger, bad, total=total)
        messages = [str(refused.value), str(invalid.value), repr(done), repr(again)]
        for message in messages:
            assert "secret" not in message
        outcomes.append(
            [str(refused.value), str(invalid.value), repr(done.check), again.check.requested]
        )
    assert outcomes[0] == outcomes[1], "nothing published depends on the number of images"
    assert "secret" not in caplog.text


@pytest.mark.parametrize("key", ["", "has space", None, "x" * 257, "tab\there", "é"])
def test_bad_image_keys_are_refused_without_echoing_them(tmp_path, key):
    with pytest.raises(InvalidParameterError, match="image key") as error:
        commit(Ledger(tmp_path / "ledger.json"), ["good", key])
    if key:
        assert repr(key) not in str(error.value) and str(key) not in str(error.value)
    assert not (tmp_path / "ledger.json").exists()


@pytest.mark.parametrize("keys", ["abc", b"abc", {"a", "b"}, None])
def test_image_keys_must_be_a_sequence_of_keys(tmp_path, keys):
    with pytest.raises(InvalidParameterError, match="image_keys"):
        commit(Ledger(tmp_path / "ledger.json"), keys)


@pytest.mark.parametrize("request_key", ["", "has space", None, "y" * 257])
def test_bad_request_keys_are_refused(tmp_path, request_key):
    ledger = Ledger(tmp_path / "ledger.json")
    with pytest.raises(InvalidParameterError, match="request_key"):
        ledger.commit(
            collection="art",
            total=budget_for_exactly(1),
            event=EVENT,
            image_keys=["a"],
            request_key=request_key,
            label="",
            release=never_called,
        )
    with pytest.raises(InvalidParameterError, match="request_key"):
        ledger.find_release(request_key)
    assert not ledger.path.exists()


def test_an_empty_folder_is_released_like_any_other(tmp_path):
    # Refusing it would make whether a release happens depend on the (private) count.
    ledger = Ledger(tmp_path / "ledger.json")
    done, mask = commit(ledger, [])
    assert mask == () and not done.reused
    assert ledger.spent("art", delta=DELTA) == epsilon_for(EVENT, delta=DELTA)


# --- performance ----------------------------------------------------------------------------


def test_a_thousand_images_with_three_histories_commit_quickly(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.json")
    total = budget_for_exactly(5)
    keys = [f"image-{i:04d}" for i in range(1000)]
    commit(ledger, keys[:333], collection="one", total=total, event=EVENT)
    commit(ledger, keys[333:666], collection="two", total=total, event=SAMPLED)
    calls, rdp_calls = [], []
    real, real_rdp = ledger_module.compose_epsilon, ledger_module.event_rdp
    monkeypatch.setattr(
        ledger_module,
        "compose_epsilon",
        lambda events, *, delta: (calls.append(1), real(events, delta=delta))[1],
    )
    monkeypatch.setattr(
        ledger_module,
        "event_rdp",
        lambda event, orders: (rdp_calls.append(1), real_rdp(event, orders))[1],
    )
    start = time.perf_counter()
    _, mask = commit(ledger, keys, collection="three", total=total)
    elapsed = time.perf_counter() - start
    # All included: images first released with q < 1 (Renyi filter) take Gaussian releases.
    assert all(mask)
    # Two PLD compositions for the collection's estimate; the filters' figures are computed
    # once per distinct event (the subsampled history's and the new one at alpha*), not once
    # per image.
    assert len(calls) <= 2, len(calls)
    assert len(rdp_calls) <= 2, len(rdp_calls)
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert spent_on(ledger, keys[0]) == compose_epsilon([EVENT, EVENT], delta=DELTA)


# --- durability ---------------------------------------------------------------------------


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
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"])
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"], "file fsync, rename, folder fsync"
    _, source, target = calls[1]
    assert Path(source).parent == tmp_path and Path(target) == ledger.path


def test_a_failed_rename_loses_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], total=budget_for_exactly(3))
    before = ledger.path.read_bytes()

    def power_cut(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(ledger_module.os, "replace", power_cut)
    with pytest.raises(LedgerError, match="power cut"):
        commit(ledger, ["a"], total=budget_for_exactly(3))
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    commit(ledger, ["a"], total=budget_for_exactly(3))
    assert ledger.image_spent("a", delta=DELTA) == compose_epsilon([EVENT] * 2, delta=DELTA)


# Child processes are fresh interpreters (like multiprocessing's spawn start method): the
# tests are imported with --import-mode=importlib, so a spawned child could not import a
# target defined here; each child registers the pack package as tests/conftest.py does.
_PRELUDE = f"""
import sys, types
_package = types.ModuleType("comfyui_dp_adapt")
_package.__path__ = [{str(PACK_ROOT)!r}]
sys.modules["comfyui_dp_adapt"] = _package
import os, secrets, time
from pathlib import Path
from comfyui_dp_adapt.dp.accounting import release_event
from comfyui_dp_adapt.dp.errors import BudgetExceededError
from comfyui_dp_adapt.dp.ledger import Ledger, TotalBudget
"""


def _child(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_KILLED_BEFORE_RENAME = """
path = Path(sys.argv[1])
os.replace = lambda *args, **kwargs: os._exit(9)  # dies right after fsync'ing its temp file
Ledger(path).commit(collection="art", total=TotalBudget(10.0, 1e-5),
    event=release_event(noise_multiplier=3.75, sampling_rate=1.0), image_keys=["a", "b"],
    request_key="killed", label="killed", release=lambda mask: {"x": 1})
os._exit(0)  # not reached
"""


def test_a_writer_killed_between_write_and_rename_loses_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    commit(ledger, ["a"], total=TotalBudget(10.0, DELTA), label="first")
    before = path.read_bytes()
    writer = _child(_KILLED_BEFORE_RENAME, path)
    _, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 9, stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, "the killed writer's temp file is left behind"
    leftovers[0].write_text("garbage that must never be read")
    assert path.read_bytes() == before
    assert ledger.find_release("killed") is None
    commit(ledger, ["a"], total=TotalBudget(10.0, DELTA), label="second")
    assert spent_on(ledger, "a") == compose_epsilon([EVENT] * 2, delta=DELTA)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "leftover cleaned"


_WRITE_LOOP = """
path, ready = Path(sys.argv[1]), Path(sys.argv[2])
ledger, event = Ledger(path), release_event(noise_multiplier=3.75, sampling_rate=1.0)
for i in range(10**6):
    ledger.commit(collection="art", total=TotalBudget(1000.0, 1e-5), event=event,
        image_keys=[f"img-{i % 5}", "shared"], request_key=secrets.token_hex(8),
        label=str(i), release=lambda mask: {"x": [float(i)] * 200})
    if i == 2:
        ready.touch()
"""


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_a_readable_consistent_ledger(tmp_path):
    path, rng = tmp_path / "ledger.json", random.Random(3)
    ledger = Ledger(path)
    for round_ in range(3):
        ready = tmp_path / f"ready-{round_}"
        writer = _child(_WRITE_LOOP, path, ready)
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None, writer.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)  # kill -9, mid write loop
        writer.communicate(timeout=60)
        assert writer.returncode == -signal.SIGKILL
        # Reading validates every record and every reference: the file is consistent.
        data = json.loads(path.read_text())
        releases = data["collections"]["art"]["releases"]
        assert len(releases) == len(data["releases"]) >= 3
        assert data["images"]["shared"]["releases"] == releases
        assert ledger.spent("art", delta=DELTA) == spent_on(ledger, "shared")
    _, mask = commit(ledger, ["shared"], total=TotalBudget(1000.0, DELTA))
    assert mask == (True,)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


_RACER = """
path, go, tag, attempts, epsilon = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(
    sys.argv[4]), float(sys.argv[5])
event = release_event(noise_multiplier=2.0, sampling_rate=0.2)
while not go.exists():
    time.sleep(0.005)
ok = 0
for i in range(attempts):
    try:
        Ledger(path).commit(collection="art", total=TotalBudget(epsilon, 1e-5), event=event,
            image_keys=[f"{tag}-{i}", "shared"], request_key=f"{tag}-{i}", label=f"{tag}{i}",
            release=lambda mask: {"tag": tag})
        ok += 1
    except BudgetExceededError:
        pass
    time.sleep(0.05)  # like separate prompts: lets the other processes take the lock
print(ok)
"""


@pytest.mark.slow
def test_processes_committing_at_once_are_serialised_and_never_overspend(tmp_path):
    path, go, k = tmp_path / "ledger.json", tmp_path / "go", 4
    total = rdp_budget_for_exactly(k, SAMPLED)
    writers = {tag: _child(_RACER, path, go, tag, k, repr(total.epsilon)) for tag in "abc"}
    go.touch()
    successes = {}
    for tag, writer in writers.items():
        stdout, stderr = writer.communicate(timeout=300)
        assert writer.returncode == 0, stderr
        successes[tag] = int(stdout)
    assert sum(successes.values()) == k, successes
    ledger = Ledger(path)
    labels = [r["label"] for r in json.loads(path.read_text())["releases"].values()]
    assert sorted(labels) == sorted(f"{tag}{i}" for tag, n in successes.items() for i in range(n))
    assert ledger.spent("art", delta=DELTA) <= total.epsilon
    assert spent_on(ledger, "shared") == ledger.spent("art", delta=DELTA)


# --- unreadable ledgers are refused and left untouched --------------------------------------

RID = "0123456789abcdef0123456789abcdef"
VALID = {
    "format": "comfyui-dp-adapt-ledger",
    "version": 3,
    "collections": {
        "art": {
            "total": {"epsilon": 2, "delta": 1e-5},
            "releases": [RID],
            "filter": {"kind": "gaussian"},
        }
    },
    "releases": {
        RID: {
            "collection": "art",
            "event": event_to_dict(EVENT),
            "epsilon": 0.99,
            "label": "",
            "request_key": "req",
            "result": {"estimate": [0.25]},
        }
    },
    "images": {
        "img": {
            "total": {"epsilon": 2, "delta": 1e-5},
            "releases": [RID],
            "filter": {"kind": "gaussian"},
        }
    },
}
# The same ledger with a subsampled first release (a Renyi filter).
_SUBSAMPLED_FIRST = json.loads(
    json.dumps(VALID).replace(json.dumps(event_to_dict(EVENT)), json.dumps(event_to_dict(SAMPLED)))
)
_RDP_ORDER = filter_order(SAMPLED, epsilon=2, delta=1e-5)
for _entry in (_SUBSAMPLED_FIRST["collections"]["art"], _SUBSAMPLED_FIRST["images"]["img"]):
    _entry["filter"] = {"kind": "rdp", "order": _RDP_ORDER}


def _changed(path: tuple, value, base: dict = VALID) -> bytes:
    data = json.loads(json.dumps(base))
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return json.dumps(data).encode()


_GAUSSIAN = ("releases", RID, "event", "noise_multiplier")
_V1 = {
    "format": "comfyui-dp-adapt-ledger",
    "version": 1,
    "datasets": {"art|x": {"name": "art", "fingerprint": "x", "total": {}, "releases": []}},
}


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (json.dumps(_V1).encode(), LedgerFormatError, "version-1 ledger.*images"),
        (_changed(("format",), "something-else"), LedgerFormatError, "not a comfyui-dp-adapt"),
        (b"[1, 2]", LedgerFormatError, "not a comfyui-dp-adapt"),
        (_changed(("version",), 4), LedgerFormatError, "version 4"),
        (_changed(("version",), "2"), LedgerFormatError, "version '2'"),
        (_changed(("version",), True), LedgerFormatError, "version True"),
        (json.dumps(VALID).encode()[:-40], LedgerCorruptError, "JSON"),
        (b"", LedgerCorruptError, "JSON"),
        (b"\xff\xfe not json", LedgerCorruptError, "JSON"),
        (json.dumps(VALID).replace("0.99", "NaN").encode(), LedgerCorruptError, "JSON"),
        (_changed(("images",), []), LedgerCorruptError, "'images' is not an object"),
        (_changed(("extra",), 1), LedgerCorruptError, "exactly the fields"),
        (_changed(("collections", "art", "releases"), ["f" * 32]), LedgerCorruptError, "not rec"),
        (_changed(("images", "img", "releases"), [RID, "e" * 32]), LedgerCorruptError, "not rec"),
        (_changed(("images", "img", "releases"), [RID, RID]), LedgerCorruptError, "twice"),
        (_changed(("collections", "art", "releases"), []), LedgerCorruptError, "no release"),
        (_changed(("images", "img", "releases"), []), LedgerCorruptError, "no release"),
        # The pinned filter: the kind the first event gives, an order among the filter's.
        (_changed(("collections", "art", "filter"), {"kind": "rdp", "order": 8}), None, "filter"),
        (_changed(("images", "img", "filter"), {"kind": "Gaussian"}), None, "filter"),
        (_changed(("images", "img", "filter"), {"kind": "gaussian", "order": 8}), None, "filter"),
        (_changed(("images", "img", "filter"), None), None, "filter"),
        (
            _changed(("collections", "art", "filter", "kind"), "gaussian", _SUBSAMPLED_FIRST),
            None,
            "filter",
        ),
        (
            _changed(("collections", "art", "filter"), {"kind": "gaussian"}, _SUBSAMPLED_FIRST),
            None,
            "filter",
        ),
        (_changed(("images", "img", "filter", "order"), 7.5, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "filter", "order"), 8.0, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "filter", "order"), True, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "filter", "order"), 3000, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "filter", "order"), 1, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "filter", "extra"), 1, _SUBSAMPLED_FIRST), None, "filter"),
        (_changed(("images", "img", "extra"), 1), None, "exactly"),
        (_changed(("collections", "art", "total"), {"epsilon": -1, "delta": 0}), None, "total"),
        (_changed(("images", "img", "total"), {"epsilon": 1}), LedgerCorruptError, "total"),
        (_changed(("images", "img", "total", "delta"), 1.5), LedgerCorruptError, "total"),
        (_changed(_GAUSSIAN, 0), LedgerCorruptError, "noise_multiplier=0"),
        (_changed(_GAUSSIAN, 1e300), LedgerCorruptError, "noise_multiplier=1e"),
        (_changed(_GAUSSIAN, 1e-3), LedgerCorruptError, "noise_multiplier=0.001"),
        (
            _changed(
                ("releases", RID, "event"),
                {"type": "SelfComposed", "count": 10**9, "event": event_to_dict(EVENT)},
            ),
            LedgerCorruptError,
            "at most",
        ),
        (_changed(("releases", RID, "event"), {"type": "Mystery"}), None, "DpEvent"),
        (_changed(("releases", RID, "event"), {"type": "Gaussian"}), None, "DpEvent"),
        (_changed(("releases", RID, "epsilon"), "a lot"), LedgerCorruptError, "epsilon"),
        (_changed(("releases", RID, "result"), [0.25]), LedgerCorruptError, "result"),
        (_changed(("releases", RID, "time"), "2026-01-01"), LedgerCorruptError, "exactly"),
        (_changed(("releases", RID, "collection"), "other"), LedgerCorruptError, "collection"),
        (_changed(("releases", RID, "request_key"), "a b"), LedgerCorruptError, "request key"),
        (_changed(("collections", "../x"), {"total": {}, "releases": []}), None, "name"),
        (json.dumps(VALID).replace(RID, "not-hex").encode(), LedgerCorruptError, "hexadecimal"),
        (_changed(("key_check",), "AB" * 32), LedgerCorruptError, "key_check"),
        (_changed(("key_check",), "ab" * 31), LedgerCorruptError, "key_check"),
        (_changed(("key_check",), None), LedgerCorruptError, "key_check"),
        (_changed(("key_check",), 5), LedgerCorruptError, "key_check"),
    ],
)
def test_unknown_or_tampered_ledgers_are_refused_and_left_untouched(
    tmp_path, content, error, message
):
    error = error or LedgerCorruptError
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    ledger = Ledger(path)
    start = time.perf_counter()
    with pytest.raises(error, match=message) as raised:
        commit(ledger, ["img"], total=budget_for_exactly(2))
    assert "untouched" in str(raised.value) and "'img'" not in str(raised.value)
    for read in (
        lambda: ledger.spent("art", delta=DELTA),
        lambda: ledger.check(collection="art", event=EVENT, total=budget_for_exactly(2)),
        lambda: ledger.find_release("req"),
        lambda: ledger.image_spent("img", delta=DELTA),
        lambda: ledger.collections(),
    ):
        with pytest.raises(error):
            read()
    assert time.perf_counter() - start < 10, "a clear error, not a hang"
    assert path.read_bytes() == content


def test_the_valid_fixture_ledger_reads_back(tmp_path):
    # Guards the tampering cases above: the unaltered document is accepted and extended.
    path = tmp_path / "ledger.json"
    path.write_bytes(json.dumps(VALID).encode())
    ledger = Ledger(path)
    assert ledger.find_release("req") == RecordedRelease(
        RID, "art", EVENT, "", {"estimate": [0.25]}
    )
    assert spent_on(ledger, "img") == epsilon_for(EVENT, delta=DELTA)
    _, mask = commit(ledger, ["img", "new"], total=TotalBudget(2, DELTA))
    assert mask == (True, True)


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "", "   ", "..", ".hidden", "x..y", "con", "NUL.txt", "a.", 7]
)
def test_collection_names_are_refused_unless_safe(tmp_path, name):
    with pytest.raises(InvalidParameterError, match="ledger name"):
        commit(Ledger(tmp_path / "ledger.json"), ["a"], collection=name)
    with pytest.raises(InvalidParameterError, match="ledger name"):
        Ledger(tmp_path / "ledger.json").check(
            collection=name, event=EVENT, total=budget_for_exactly(1)
        )
    assert list(tmp_path.iterdir()) == []


def test_collection_names_are_stripped(tmp_path):
    assert sanitize_ledger_name("  my art v1.2 ") == "my art v1.2"
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], collection="  my art ")
    assert ledger.collections() == ["my art"]


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0, 1e-5), (float("nan"), 1e-5), (1, 0), (1, 1), (-1, 0.5), (True, 0.1)]
)
def test_bad_totals_are_refused(epsilon, delta):
    with pytest.raises(InvalidParameterError, match="total"):
        TotalBudget(epsilon=epsilon, delta=delta)


def test_a_total_must_be_a_total_budget(tmp_path):
    with pytest.raises(InvalidParameterError, match="TotalBudget"):
        commit(Ledger(tmp_path / "ledger.json"), ["a"], total=(1.0, 1e-5))


@pytest.mark.parametrize(
    "event",
    [
        "Gaussian",
        dpa.GaussianDpEvent(noise_multiplier=1e-3),
    ],
)
def test_events_the_ledger_cannot_account_for_are_refused(tmp_path, event):
    with pytest.raises(InvalidParameterError, match=r"event|noise_multiplier"):
        commit(Ledger(tmp_path / "ledger.json"), ["a"], event=event)
    assert not (tmp_path / "ledger.json").exists()


# --- the fingerprint key the image keys were made under ------------------------------------


def _installation(user: Path) -> tuple[bytes, str]:
    """The installation key of the user folder ``user`` (created if absent) and its check."""
    key = load_or_create_key(user / "dp_adapt" / "fingerprint.key")
    return key, key_check_value(key)


def _commit_keyed(ledger, user: Path, digests, *, collection: str, total: TotalBudget):
    """A commit as the nodes make it: image keys and key check from the user folder's key."""
    key, check = _installation(user)
    masks = []
    done = ledger.commit(
        collection=collection,
        total=total,
        event=EVENT,
        image_keys=[keyed_fingerprint(d, key) for d in digests],
        request_key=f"request-{next(_requests)}",
        label="",
        release=lambda mask: (masks.append(mask), {"estimate": [0.5]})[1],
        key_check=check,
    )
    return done, masks[0] if masks else None


def test_a_deleted_fingerprint_key_is_refused_not_a_fresh_budget_for_the_same_pictures(tmp_path):
    """The auditor's case: the key file deleted, the same unchanged pictures got new keys and
    a second release at epsilon 1 against a per-image total of 1. Now the ledger notices that
    its image entries were made under another key and refuses, saying how to restore it."""
    user = tmp_path / "user"
    ledger = Ledger(default_ledger_path(user / "dp_adapt" / "ledgers"))
    digests = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    one = budget_for_exactly(1)
    _, mask = _commit_keyed(ledger, user, digests, collection="first", total=one)
    assert mask == (True, True)
    key_file = user / "dp_adapt" / "fingerprint.key"
    backup = key_file.read_bytes()
    key_file.unlink()
    before = ledger.path.read_bytes()

    with pytest.raises(LedgerError) as refused:
        _commit_keyed(ledger, user, digests, collection="second", total=one)
    message = str(refused.value)
    assert "another fingerprint key" in message and "backup" in message
    assert "fingerprint.key" in message and "move the ledger" in message
    assert str(ledger.path) in message
    assert ledger.path.read_bytes() == before, "nothing recorded, nothing spent"
    with pytest.raises(LedgerError, match="another fingerprint key"):
        ledger.check_key(_installation(user)[1])

    key_file.write_bytes(backup)  # restored: the pictures are recognised, their budget spent
    _, mask = _commit_keyed(ledger, user, digests, collection="second", total=one)
    assert mask == (False, False)
    key = load_or_create_key(key_file)
    for digest in digests:
        spent = spent_on(ledger, keyed_fingerprint(digest, key))
        assert spent == pytest.approx(epsilon_for(EVENT, delta=DELTA), rel=1e-12)


def test_the_key_check_is_stored_once_and_a_commit_without_one_is_refused_after(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"])  # no key check given: none stored, nothing to compare
    assert ledger_module.KEY_CHECK_FIELD not in json.loads(ledger.path.read_text())
    ledger.check_key(None)
    ledger.check_key("0" * 64)
    key, check = _installation(tmp_path / "user")
    assert check == hmac.new(key, b"comfyui-dp-adapt key check", hashlib.sha256).hexdigest()
    done, _ = commit(ledger, ["b"], request_key="with-check", key_check=check)
    assert json.loads(ledger.path.read_text())[ledger_module.KEY_CHECK_FIELD] == check
    ledger.check_key(check)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="key_check=None"):
        commit(ledger, ["c"])
    with pytest.raises(LedgerError, match="another fingerprint key"):
        ledger.check_key("0" * 64)
    assert ledger.path.read_bytes() == before
    reused, mask = commit(ledger, ["b"], request_key="with-check", key_check=check)
    assert mask is None, "nothing drawn"
    assert reused.reused and reused.release_id == done.release_id


@pytest.mark.parametrize("key_check", ["A" * 64, "ab", 17, b"0" * 64, "g" * 64])
def test_a_malformed_key_check_is_refused(tmp_path, key_check):
    ledger = Ledger(tmp_path / "ledger.json")
    with pytest.raises(InvalidParameterError, match="key_check must be None or 64"):
        ledger.check_key(key_check)
    with pytest.raises(InvalidParameterError, match="key_check must be None or 64"):
        commit(ledger, ["a"], key_check=key_check)
    assert not ledger.path.exists()


# --- a ledger shared through a link; files that cannot be written ------------------------


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need POSIX")
def test_a_linked_ledger_is_written_through_the_link_and_locked_at_its_target(tmp_path):
    """The auditor's case: ``ledger.json`` a link to a shared ledger; the first release
    replaced the link by a regular file, so the shared file never saw later releases."""
    shared = tmp_path / "shared" / "ledger.json"
    shared.parent.mkdir()
    one, two = tmp_path / "install-1", tmp_path / "install-2"
    for folder in (one, two):
        folder.mkdir()
        (folder / "ledger.json").symlink_to(shared)  # dangling until the first release
    first, second = Ledger(one / "ledger.json"), Ledger(two / "ledger.json")
    assert first.lock_path == shared.parent / "ledger.json.lock"

    first.check_writable()
    commit(first, ["a"], total=budget_for_exactly(2))
    commit(second, ["b"], total=budget_for_exactly(2))
    for folder in (one, two):
        assert (folder / "ledger.json").is_symlink(), "the link is kept"
        assert sorted(p.name for p in folder.iterdir()) == ["ledger.json"], "no lock, no temp"
    assert shared.is_file() and not shared.is_symlink()
    assert sorted(p.name for p in shared.parent.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert first.release_count("art") == second.release_count("art") == 2
    with pytest.raises(BudgetExceededError):
        commit(first, ["c"], total=budget_for_exactly(2))
    assert spent_on(second, "a") == spent_on(first, "a") > 0


def test_a_lock_file_that_is_a_folder_gives_a_clear_error_before_any_work(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], total=budget_for_exactly(3))
    before = ledger.path.read_bytes()
    ledger.lock_path.unlink()
    ledger.lock_path.mkdir()
    for attempt in (ledger.check_writable, lambda: commit(ledger, ["a"])):
        with pytest.raises(LedgerError) as error:
            attempt()
        message = str(error.value)
        assert "cannot be written" in message and str(ledger.lock_path) in message
        assert "Is a directory" in message and "Move the folder" in message
        assert "nothing was trained or released" in message
    assert ledger.path.read_bytes() == before


def test_a_ledger_that_is_a_folder_gives_a_clear_error(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.path.mkdir()
    with pytest.raises(LedgerError, match="not a regular file"):
        ledger.check_writable()
    with pytest.raises(LedgerError, match="not a regular file"):
        commit(ledger, ["a"])


def _read_only(folder: Path, monkeypatch) -> None:
    """Make every file creation in ``folder`` fail as on a read-only file system (EROFS):
    root ignores permissions, so a chmod cannot show it when the tests run as root."""
    real_open, real_builtin_open = os.open, open

    def refused(path) -> bool:
        return Path(os.fspath(path)).parent == folder

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and refused(file) and set(mode) & set("wxa+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr("builtins.open", builtin_open)


def test_a_read_only_ledger_folder_is_refused_clearly_before_any_work(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.json")
    commit(ledger, ["a"], total=budget_for_exactly(3))
    before = ledger.path.read_bytes()
    ledger.lock_path.unlink()
    _read_only(tmp_path, monkeypatch)
    for attempt in (ledger.check_writable, lambda: commit(ledger, ["a"])):
        with pytest.raises(LedgerError) as error:
            attempt()
        message = str(error.value)
        assert "cannot be written" in message and "Read-only file system" in message
        assert "Make that folder writable" in message
    assert ledger.path.read_bytes() == before
    # Reading still works: an identical recorded release could be published again.
    assert ledger.release_count("art") == 1


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="root ignores folder permissions (the monkeypatched variant above always runs)",
)
def test_a_folder_without_write_permission_is_refused_clearly(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    ledger = Ledger(folder / "ledger.json")
    commit(ledger, ["a"], total=budget_for_exactly(3))
    folder.chmod(0o555)
    try:
        with pytest.raises(LedgerError, match="cannot be written"):
            ledger.check_writable()
    finally:
        folder.chmod(0o755)
