"""Level "instantiation": every node class loads through ComfyUI's own custom-node loader,
instantiates, and declares input specs and outputs ComfyUI can use."""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import pytest

from comfyui_dp_adapt.headless.comfy_server import PACK_LINK_NAME
from comfyui_dp_adapt.tests.support.pack import PACK_ROOT, expected_node_types

CORE_SOCKET_TYPES = {
    "MODEL",
    "CLIP",
    "VAE",
    "CLIP_VISION",
    "CLIP_VISION_OUTPUT",
    "CONDITIONING",
    "LATENT",
    "IMAGE",
    "MASK",
    "STRING",
    "INT",
    "FLOAT",
    "BOOLEAN",
}
PACK_SOCKET_TYPES = {"DP_BUDGET", "DP_PRIVATE_IMAGES", "DP_CLIP_TARGET"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def loaded_pack(comfy, monkeypatch_module):
    """Load the pack with ComfyUI's own loader, as ComfyUI does at start-up."""
    monkeypatch_module.setenv("COMFYUI_DP_ADAPT_TINY_MODELS", "1")
    import nodes

    link = comfy / "custom_nodes" / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    result = nodes.load_custom_node(str(link))
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    assert result is not False, "ComfyUI's load_custom_node could not import the pack"
    # Old ComfyUI names the module after the folder, new ComfyUI after its whole path.
    init = str(link / "__init__.py")
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == init)
    return nodes, module


@pytest.fixture(scope="module")
def monkeypatch_module():
    patcher = pytest.MonkeyPatch()
    yield patcher
    patcher.undo()


def test_pack_exports_the_two_mappings_and_its_web_directory(loaded_pack):
    _, module = loaded_pack
    public = {name for name in vars(module) if not name.startswith("_")}
    assert {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"} <= public
    assert set(module.__all__) == {
        "NODE_CLASS_MAPPINGS",
        "NODE_DISPLAY_NAME_MAPPINGS",
        "WEB_DIRECTORY",
    }
    assert (Path(module.__file__).parent / module.WEB_DIRECTORY / "dp_report.js").is_file()
    assert set(module.NODE_CLASS_MAPPINGS) == expected_node_types(include_testing=True)
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)


def test_every_node_is_registered_in_comfyui(loaded_pack):
    nodes, module = loaded_pack
    for node_type, cls in module.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[node_type] is cls


@pytest.mark.parametrize("node_type", sorted(expected_node_types(include_testing=True)))
def test_node_declares_a_usable_interface(loaded_pack, node_type):
    _, module = loaded_pack
    cls = module.NODE_CLASS_MAPPINGS[node_type]
    instance = cls()
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    function = getattr(instance, cls.FUNCTION)
    parameters = inspect.signature(function).parameters
    for section in ("required", "optional"):
        for name, input_spec in spec.get(section, {}).items():
            kind = input_spec[0]
            assert name in parameters, f"{node_type}.{cls.FUNCTION} has no parameter {name}"
            assert isinstance(kind, list) or kind in CORE_SOCKET_TYPES | PACK_SOCKET_TYPES, (
                f"{node_type}.{name} has unknown type {kind!r}"
            )
            options = input_spec[1] if len(input_spec) > 1 else {}
            assert options.get("tooltip"), f"{node_type}.{name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"]
            if isinstance(kind, list):
                assert kind and options.get("default", kind[0]) in kind
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    for kind in cls.RETURN_TYPES:
        assert kind in CORE_SOCKET_TYPES | PACK_SOCKET_TYPES, f"{node_type} returns {kind!r}"
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert cls.CATEGORY.startswith("DP Adapt")
    assert getattr(cls, "DESCRIPTION", "")
