"""``python bench/reproduce_paper.py --quick``: runs on the demo model and its JSON has every
cell (each method and epsilon: the per-release fidelities) plus the positive control."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

pytestmark = pytest.mark.slow

DP_METHODS = ("DPAgg-TI", "DP-SGD TI", "DP guidance")


def test_quick_reproduction_writes_every_cell(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(PACK_ROOT / "bench" / "reproduce_paper.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "reproduction_quick.json").read_text())
    assert record["quick"] is True and record["complete"] is True
    assert record["grid"] == {"ns": [20], "epsilons": [1.0, 8.0], "releases": 3}
    assert 0.0 <= record["positive_control"]["accuracy"] <= 1.0
    fidelity = record["fidelity"]
    for method in DP_METHODS:
        for epsilon in ("1.0", "8.0"):
            values = fidelity[method]["20"][epsilon]
            assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)
    assert len(fidelity["non-private TI"]["20"]["inf"]) == 3
    assert (tmp_path / "reproduction_quick.csv").read_text().startswith("method,n,epsilon")
    assert (tmp_path / "reproduction_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fidelity [95% CI]" in done.stdout
