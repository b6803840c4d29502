"""The README's first command, run literally on a fresh clone: it sets up its environment,
runs the demo on the embedded default and finishes within five minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.comfy_server]
BUDGET_S = 300


def _first_command() -> str:
    readme = (PACK_ROOT / "README.md").read_text()
    section = readme.split("## The first command", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_first_command_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(PACK_ROOT), str(clone)], check=True)
    command = _first_command()
    assert command.startswith("python3 run_workflow.py ")
    # As on a fresh machine: the test environment's Python is not on the PATH.
    ours = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != ours)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DP_ADAPT_VENV")}
    env["PATH"] = path
    started = time.monotonic()
    done = subprocess.run(
        command, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=BUDGET_S
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (clone / ".venv").is_dir()  # it built its own environment
    assert "[setup]" in done.stdout  # and said so
    out = clone / "out" / "demo"
    assert list((out / "embeddings").glob("dp_style*.safetensors"))
    assert len(list((out / "images").glob("*.png"))) == 4
    assert "epsilon" in (out / "privacy_report.txt").read_text()
    assert elapsed < BUDGET_S
