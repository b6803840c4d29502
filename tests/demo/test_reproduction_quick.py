"""``python bench/reproduce_paper.py --quick``: runs on the demo model, its JSON has every
cell (each method and epsilon: the per-release fidelities, by the style classifier and by
the hand-written dot detector), the baselines and the guidance control, and the evidence
world's targets hold on it (docs/reproduction.md states them and what they mean): the
private style is reachable but not the default, guidance steers towards it with the exact
target (+0.3 over unguided) and with DP targets at n = 100, eps = 8 (+0.2)."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys

import pytest

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

pytestmark = pytest.mark.slow

DP_METHODS = ("DPAgg-TI", "DP-SGD TI", "DP guidance")
N = "100"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduction")
    done = subprocess.run(
        [
            sys.executable,
            str(PACK_ROOT / "bench" / "reproduce_paper.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=3600,  # about 10 minutes alone on 2 cores; slower on a shared machine
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "reproduction_quick.json").read_text())
    return out, done.stdout, record


def _mean(record, method: str, epsilon: str, measure: str = "fidelity") -> float:
    return statistics.fmean(record[measure][method][N][epsilon])


def test_quick_reproduction_writes_every_cell(quick):
    out, stdout, record = quick
    assert record["quick"] is True and record["complete"] is True
    assert record["grid"] == {"ns": [100], "epsilons": [1.0, 8.0], "releases": 2}
    # The record (and the resume key of an interrupted run) names the exact weights measured.
    weights = PACK_ROOT / "demo" / "weights" / record["settings"]["weights"]
    assert record["settings"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for measure in ("fidelity", "detector"):
        for method in DP_METHODS:
            for epsilon in ("1.0", "8.0"):
                values = record[measure][method][N][epsilon]
                assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
        assert len(record[measure]["non-private TI"][N]["inf"]) == 2
    for arm in ("unguided", "non-private guidance"):
        assert 0.0 <= record["guidance_control"][arm]["fidelity"] <= 1.0
    assert (out / "reproduction_quick.csv").read_text().startswith("method,n,epsilon")
    assert (out / "reproduction_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fidelity [95% CI]" in stdout and "guidance control" in stdout


def test_the_private_style_is_reachable_but_not_the_default(quick):
    """The world has no confound: named training styles are drawn, while no prompt without
    the token draws dots much more than chance (six styles)."""
    _, _, record = quick
    assert record["positive_control"]["accuracy"] >= 0.9
    baselines = record["baselines"]
    assert baselines["no style word"]["fidelity"] <= 0.3
    initializer = next(v for k, v in baselines.items() if k.startswith("initializer word"))
    assert initializer["fidelity"] <= 0.15
    assert _mean(record, "non-private TI", "inf") >= 0.7


def test_the_dot_detector_agrees_with_the_classifier_on_the_ordering(quick):
    """The result does not rest on one learned model: the training-free detector ranks the
    non-private token above both baselines, and more privacy budget no lower, as the
    classifier does."""
    _, _, record = quick
    baselines = record["baselines"]
    for measure in ("fidelity", "detector"):
        token = _mean(record, "non-private TI", "inf", measure)
        assert all(token > baseline[measure] for baseline in baselines.values()), measure


def test_guidance_steers_to_the_private_style_with_exact_and_dp_targets(quick):
    """The control shows the sampler steers at all (exact mean target, +0.3 over the same
    prompts and seeds unguided); DP guidance at n = 100, eps = 8 keeps +0.2 of it."""
    _, _, record = quick
    control = record["guidance_control"]
    unguided = control["unguided"]["fidelity"]
    assert control["non-private guidance"]["fidelity"] >= unguided + 0.3
    assert _mean(record, "DP guidance", "8.0") >= unguided + 0.2
    assert control["non-private guidance"]["detector"] > control["unguided"]["detector"]
