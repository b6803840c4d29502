"""dp/ is the method, usable alone: it never imports ComfyUI (HOUSE_STYLE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

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


def test_no_dp_module_imports_comfyui_statically():
    offenders = []
    for path in sorted((PACK_ROOT / "dp").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not offenders, offenders


def test_importing_all_of_dp_alone_loads_no_comfyui_module():
    modules = sorted(p.stem for p in (PACK_ROOT / "dp").glob("*.py") if p.stem != "__init__")
    script = textwrap.dedent(f"""
        import importlib, importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "standalone_dp", {str(PACK_ROOT / "dp" / "__init__.py")!r},
            submodule_search_locations=[{str(PACK_ROOT / "dp")!r}])
        package = importlib.util.module_from_spec(spec)
        sys.modules["standalone_dp"] = package
        spec.loader.exec_module(package)
        for name in {modules!r}:
            importlib.import_module("standalone_dp." + name)
        print(",".join(sorted(m.split(".")[0] for m in sys.modules)))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.strip().split(","))
    assert not loaded & COMFY_MODULES, loaded & COMFY_MODULES


def test_package_version_matches_pyproject():
    import re

    from comfyui_dp_adapt.dp.version import PACKAGE_VERSION

    text = (PACK_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == PACKAGE_VERSION
