"""Levels "workflow validation", "coverage" and "execution" for every shipped workflow."""

from __future__ import annotations

import math

import pytest

from comfyui_dp_adapt.headless import workflows as wf
from comfyui_dp_adapt.tests.support.pack import expected_node_types, shipped_workflows

pytestmark = pytest.mark.comfy_server
WORKFLOWS = shipped_workflows()


def _tiny_replacements(workflow):
    from comfyui_dp_adapt.nodes.tiny_loaders import replacements_for

    return replacements_for(workflow)


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")


def test_the_pack_ships_workflows():
    assert WORKFLOWS, "workflows/ has no *.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_the_nodes_comfyui_reports(path, object_info):
    workflow = wf.load_workflow(path)
    unknown = wf.node_types(workflow) - set(object_info)
    assert not unknown, f"{path.name} uses node types ComfyUI does not have: {sorted(unknown)}"
    prompt = wf.to_api_prompt(workflow, object_info)
    assert prompt, f"{path.name} has no executable node"


def test_optional_widgets_missing_from_a_saved_workflow_take_their_defaults(object_info):
    """A workflow saved before a node gained an optional widget (the guidance sampler's
    ``decode_size``) still converts, as ComfyUI's frontend loads it; a missing required
    widget is still an error naming it."""
    path = next(p for p in WORKFLOWS if "guidance" in p.name)
    workflow = wf.load_workflow(path)
    (sampler,) = [n for n in workflow["nodes"] if n["type"] == "DPAdaptUniversalGuidanceSampler"]
    optional = object_info["DPAdaptUniversalGuidanceSampler"]["input"]["optional"]
    assert "decode_size" in optional
    saved_before = list(sampler["widgets_values"])
    assert "clip" not in saved_before and len(saved_before) == 10

    inputs = wf.to_api_prompt(workflow, object_info)[str(sampler["id"])]["inputs"]
    assert "decode_size" not in inputs and inputs["mode"] == saved_before[-1]

    sampler["widgets_values"] = [*saved_before, "clip"]
    inputs = wf.to_api_prompt(workflow, object_info)[str(sampler["id"])]["inputs"]
    assert inputs["decode_size"] == "clip"

    sampler["widgets_values"] = saved_before[:-1]  # "mode" is required
    with pytest.raises(wf.WorkflowError, match="no widget value for mode"):
        wf.to_api_prompt(workflow, object_info)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_explains_itself_to_an_artist(path):
    workflow = wf.load_workflow(path)
    notes = [n for n in workflow["nodes"] if n["type"] in wf.FRONTEND_ONLY_TYPES]
    assert notes, f"{path.name} has no note explaining its steps"
    assert all((n.get("widgets_values") or [""])[0].strip() for n in notes)


def test_every_node_of_the_pack_is_used_by_a_shipped_workflow():
    used = set().union(*(wf.node_types(wf.load_workflow(p)) for p in WORKFLOWS))
    unused = expected_node_types() - used
    assert not unused, f"no shipped workflow uses {sorted(unused)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_executes_in_real_comfyui_on_tiny_models(path, comfy_server, object_info):
    from comfyui_dp_adapt.tests.support.workflow_inputs import TINY_MODEL_OVERRIDES, prepare_inputs

    workflow = wf.load_workflow(path)
    prepare_inputs(workflow, comfy_server)
    prompt = wf.to_api_prompt(
        workflow, object_info, replace=_tiny_replacements(workflow), overrides=TINY_MODEL_OVERRIDES
    )
    entry = comfy_server.run_prompt(prompt)
    output_nodes = [
        node_id
        for node_id, node in prompt.items()
        if object_info[node["class_type"]].get("output_node")
    ]
    assert output_nodes
    for node_id in output_nodes:
        assert entry["outputs"].get(node_id), (
            f"{path.name}: output node {node_id} ({prompt[node_id]['class_type']}) produced nothing"
        )


def _shown_decimals(options: dict) -> int:
    """Decimals the frontend shows for a FLOAT widget: its ``precision``, else the digits of
    its ``step`` (default 0.5), the rule of both the legacy and the current frontend."""
    if "precision" in options:
        return int(options["precision"])
    return max(0, -math.floor(math.log10(options.get("step", 0.5))))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_shipped_float_shows_its_value_on_the_canvas(path, object_info):
    """A float the canvas shows rounded (0.15 with step 10 reads "0") tells the artist a
    different setting than the one that runs: each shipped value must read within 0.5 %."""
    workflow = wf.load_workflow(path)
    prompt = wf.to_api_prompt(workflow, object_info)
    misread = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            input_spec = declared.get(name)
            if not input_spec or input_spec[0] != "FLOAT" or not isinstance(value, float):
                continue
            options = input_spec[1] if len(input_spec) > 1 else {}
            shown = round(value, _shown_decimals(options))
            if abs(shown - value) > 0.005 * abs(value):
                misread[f"{node_id} {node['class_type']}.{name}"] = (value, shown)
    assert not misread, f"{path.name}: (value, as the canvas shows it) {misread}"
