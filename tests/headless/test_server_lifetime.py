"""A run that is killed never leaves its ComfyUI running: the server stops with the process
that started it, however that process dies (headless/comfy_server.py, PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

pytestmark = [
    pytest.mark.comfy_server,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux"),
]

# A stand-in for run_workflow.py or a test session: starts a server, reports its pid, waits.
STARTER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from comfy_server import ComfyServer
server = ComfyServer(comfy_dir=Path(sys.argv[2]), pack_dir=Path(sys.argv[3]),
                     work_dir=Path(sys.argv[4]))
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_starter_takes_its_comfyui_with_it(comfy_dir, tmp_path, how):
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STARTER,
            str(PACK_ROOT / "headless"),
            str(comfy_dir),
            str(PACK_ROOT),
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = None
    try:
        server_pid = int(starter.stdout.readline())
        assert _running(server_pid)
        starter.send_signal(how)
        starter.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(server_pid), "ComfyUI outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
        if server_pid is not None and _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)
