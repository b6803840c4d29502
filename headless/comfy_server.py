"""A real ComfyUI server process with the pack linked into its ``custom_nodes``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_LINK_NAME = "ComfyUI-DP-Adapt"
"""Users clone under any name; a hyphenated one proves relative imports are enough."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_with(parent: int):
    """For ``Popen(preexec_fn=...)`` on Linux: the kernel sends the server SIGTERM when the
    process that started it dies, however it dies (SIGKILL included), so a killed run or test
    never leaves a ComfyUI running on its own (prctl PR_SET_PDEATHSIG). Checked after the
    call too: a parent that died before it leaves the server stopping at once. The kernel
    watches the starting THREAD: start a server from a thread that outlives it (every caller
    here starts it from the main thread)."""

    def arrange() -> None:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


LOG_TAIL_LINES = 15  # of ComfyUI's log, shown above the one-line summary


class ServerStartFailed(RuntimeError):
    """ComfyUI exited, or did not answer, at start-up. ``summary`` is one line: the reason
    (the last line of ComfyUI's log, e.g. its ModuleNotFoundError) and where the log is."""

    def __init__(self, reason: str, log_text: str, log_path: Path):
        tail = [line.strip() for line in log_text.strip().splitlines() if line.strip()]
        last = tail[-1][:300] if tail else "ComfyUI printed nothing"
        self.reason, self.log_text = reason, log_text
        self.summary = f"{reason}: {last} (ComfyUI's log: {log_path})"
        self.log_tail = "\n".join(tail[-LOG_TAIL_LINES:])
        super().__init__(f"{self.summary}\n{self.log_tail}")


class PromptFailed(RuntimeError):
    """ComfyUI refused or failed a prompt; the message holds ComfyUI's own error text.

    ``summary`` is one line for people: the failing node and its error message.
    """

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        lines = message.strip().splitlines()
        self.summary = summary or (lines[-1][:500] if lines else "ComfyUI gave no message")


def summarize_failure(payload) -> str:
    """One line from ComfyUI's error payload: an execution error's node type and exception
    message, or a validation error's node errors, else the payload's first message."""
    if isinstance(payload, list):  # history status messages: [[kind, data], ...]
        for kind, data in (m for m in payload if isinstance(m, (list, tuple)) and len(m) == 2):
            if kind in ("execution_error", "execution_interrupted") and isinstance(data, dict):
                node = data.get("node_type") or "a node"
                text = str(data.get("exception_message") or kind).strip()
                return f"{node}: {' '.join(text.split())}"
    if isinstance(payload, dict):
        for node_error in (payload.get("node_errors") or {}).values():
            for error in node_error.get("errors", []):
                node = node_error.get("class_type", "a node")
                # ComfyUI puts the rule in "message" ("Value bigger than max") and often only
                # the input's name in "details": both are needed to read it.
                parts = [str(error.get(k) or "").strip() for k in ("message", "details")]
                detail = ": ".join(p for p in parts if p) or "refused"
                return f"{node}: {' '.join(detail.split())}"
        error = payload.get("error")
        if isinstance(error, dict):
            return " ".join(str(error.get("message", error)).split())
    return " ".join(str(payload).split())[:500]


@dataclass
class ComfyServer:
    comfy_dir: Path
    pack_dir: Path
    work_dir: Path
    extra_env: dict = field(default_factory=dict)
    user_dir: Path | None = None
    extra_model_paths: dict = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "comfyui.log"

    @property
    def input_dir(self) -> Path:
        return self.work_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    @property
    def temp_dir(self) -> Path:
        """Where Preview Image writes: ComfyUI puts a ``temp`` folder inside --temp-directory."""
        nested = self.work_dir / "temp" / "temp"
        return nested if nested.is_dir() else self.work_dir / "temp"

    @property
    def default_embeddings_dir(self) -> Path:
        """ComfyUI's own embeddings folder, the first one it searches (where tokens are saved)."""
        return self.comfy_dir / "models" / "embeddings"

    def _supports(self, flag: str) -> bool:
        return flag in (self.comfy_dir / "comfy" / "cli_args.py").read_text()

    def start(self, timeout: float = 180.0) -> ComfyServer:
        custom_nodes = self.work_dir / "custom_nodes"
        if self.user_dir is None:
            self.user_dir = self.work_dir / "user"
        for folder in (
            custom_nodes,
            self.input_dir,
            self.output_dir,
            self.default_embeddings_dir,
            self.user_dir,
            self.work_dir / "temp",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        paths = self.work_dir / "extra_model_paths.yaml"
        lines = ["dp_adapt:", f"    custom_nodes: {custom_nodes}"]
        lines += [f"    {kind}: {Path(folder)}" for kind, folder in self.extra_model_paths.items()]
        paths.write_text("\n".join(lines) + "\n")
        self.port = free_loopback_port()
        command = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--extra-model-paths-config",
            str(paths),
            "--input-directory",
            str(self.input_dir),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.work_dir / "temp"),
        ]
        if self._supports("--user-directory"):
            command += ["--user-directory", str(self.user_dir)]
        else:  # old ComfyUI always uses ComfyUI/user
            fixed = self.comfy_dir / "user"
            if fixed.is_symlink() or (fixed.exists() and not any(fixed.iterdir())):
                fixed.unlink() if fixed.is_symlink() else fixed.rmdir()
            if not fixed.exists():
                fixed.symlink_to(self.user_dir, target_is_directory=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=self.comfy_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_stop_with(os.getpid()) if sys.platform.startswith("linux") else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartFailed("ComfyUI exited at start-up", self.log(), self.log_path)
            try:
                self.get_json("/object_info/CheckpointLoaderSimple", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerStartFailed(
            f"ComfyUI did not answer within {timeout:g} s", self.log(), self.log_path
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            try:
                summary = summarize_failure(json.loads(body))
            except json.JSONDecodeError:
                summary = None
            raise PromptFailed(body, summary) from error

    def run_prompt(self, prompt: dict, timeout: float = 600, client_id: str | None = None) -> dict:
        """Queue an API-format prompt, wait for it, return its history entry.

        ``client_id``: the websocket client that should receive the prompt's progress
        messages (a fresh one when None). Raises PromptFailed with ComfyUI's error text when
        validation or execution fails.
        """
        client_id = client_id or uuid.uuid4().hex
        queued = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    messages = status.get("messages", status)
                    raise PromptFailed(json.dumps(messages, indent=1), summarize_failure(messages))
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise PromptFailed(f"ComfyUI died while running the prompt:\n{self.log()}")
            time.sleep(0.25)
        raise PromptFailed(f"prompt {prompt_id} did not finish within {timeout} s")
