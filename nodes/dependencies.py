"""Clear messages for missing Python packages, instead of a crash at ComfyUI start-up."""

from __future__ import annotations

import importlib.util

# import name -> name to ``pip install`` (requirements.txt pins the versions).
RUNTIME_PACKAGES = {
    "dp_accounting": "dp-accounting",
    "opendp": "opendp",
    "filelock": "filelock",
    "safetensors": "safetensors",
    "PIL": "Pillow",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
}


class MissingDependencyError(ImportError):
    """A package the pack needs is not installed in ComfyUI's Python environment."""


def missing_packages() -> list[str]:
    """Pip names of the runtime packages that cannot be imported."""
    return [
        pip for module, pip in RUNTIME_PACKAGES.items() if importlib.util.find_spec(module) is None
    ]


def install_hint(packages: list[str]) -> str:
    return (
        "comfyui-dp-adapt needs the Python package(s) "
        + ", ".join(packages)
        + ". Install them into ComfyUI's Python environment, e.g. "
        + "`python -m pip install -r custom_nodes/<this pack>/requirements.txt`, then restart ComfyUI."
    )


def require_runtime_packages() -> None:
    """Raise a readable error naming what to install; called before a node does its work."""
    missing = missing_packages()
    if missing:
        raise MissingDependencyError(install_hint(missing))
