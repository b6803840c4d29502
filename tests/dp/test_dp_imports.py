"""dp/ is the method, usable alone: it never imports ComfyUI (docs/privacy.md §1)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
DP_DIR = PACK_ROOT / "dp"

COMFY_MODULES = {
    "comfy",
    "comfy_extras",
    "comfy_execution",
    "comfy_api",
    "folder_paths",
    "nodes",
    "execution",
    "server",
    "latent_preview",
    "node_helpers",
}


def _dp_files() -> list[Path]:
    files = sorted(DP_DIR.glob("*.py"))
    assert DP_DIR / "__init__.py" in files and len(files) > 5
    return files


def test_no_dp_module_imports_comfyui_or_leaves_dp_statically():
    offenders = []
    for path in _dp_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level >= 2:  # "from ..nodes import x" reaches outside dp/
                    offenders.append(f"{path.name}:{node.lineno}: relative import leaves dp/")
                    continue
                if node.level == 1:
                    continue
                names = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES
            ]
    assert not offenders, offenders


def test_importing_every_dp_module_standalone_loads_no_comfyui_module(tmp_path):
    modules = [p.stem for p in _dp_files() if p.stem != "__init__"]
    script = textwrap.dedent(f"""
        import importlib, importlib.util, json, sys
        # Any package name works: dp/ uses relative imports only.
        spec = importlib.util.spec_from_file_location(
            "standalone_dp_check", {str(DP_DIR / "__init__.py")!r},
            submodule_search_locations=[{str(DP_DIR)!r}])
        package = importlib.util.module_from_spec(spec)
        sys.modules["standalone_dp_check"] = package
        spec.loader.exec_module(package)
        light = sorted(m for m in ("torch", "dp_accounting", "numpy") if m in sys.modules)
        for name in {modules!r}:
            importlib.import_module("standalone_dp_check." + name)
        print(json.dumps({{"light": light, "loaded": sorted({{m.split(".")[0] for m in sys.modules}})}}))
    """)
    done = subprocess.run(
        # An empty working directory: nothing importable by accident (sys.path[0] is '').
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["light"] == [], "importing the dp package alone must stay light"
    assert not set(result["loaded"]) & COMFY_MODULES, set(result["loaded"]) & COMFY_MODULES
    assert "standalone_dp_check" in result["loaded"]


def test_package_version_matches_pyproject():
    from comfyui_dp_adapt.dp.version import PACKAGE_VERSION

    text = (PACK_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == PACKAGE_VERSION
