"""UI-format workflows (what ComfyUI's editor saves) checked and turned into API prompts.

The conversion follows what the editor's "Save (API format)" does: frontend-only nodes
(notes) are dropped, every link becomes ``[source_node_id, output_index]``, and widget values
are matched, in order, to the node's widget inputs from ``/object_info``. An INT named
``seed``/``noise_seed`` (or declared with ``control_after_generate``) is followed in
``widgets_values`` by the editor's "control after generate" choice, which is skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Inputs whose choices are the files a user has installed: any file name is acceptable in a
# shipped workflow; the tests swap these loaders for the tiny in-code models.
FILE_CHOICE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"), ("CLIPVisionLoader", "clip_name")}
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(AssertionError):
    """A shipped workflow does not fit the nodes ComfyUI reports."""


def load_workflow(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "nodes" not in data or "links" not in data:
        raise WorkflowError(f"{path.name} is not a UI-format workflow (needs 'nodes' and 'links')")
    return data


def _ordered_inputs(spec: dict) -> list[tuple[str, tuple, bool]]:
    """``(name, spec, optional)`` in widget order: required inputs, then optional ones."""
    inputs = spec.get("input", {})
    ordered = []
    for section in ("required", "optional"):
        for name, value in inputs.get(section, {}).items():
            ordered.append((name, tuple(value), section == "optional"))
    return ordered


def _is_widget(input_spec: tuple) -> bool:
    kind = input_spec[0]
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO"


def _has_control_after_generate(name: str, input_spec: tuple) -> bool:
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    return input_spec[0] == "INT" and (
        name in {"seed", "noise_seed"} or bool(options.get("control_after_generate"))
    )


def _check_value(node_type: str, name: str, input_spec: tuple, value) -> None:
    kind = input_spec[0]
    options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    where = f"{node_type}.{name}={value!r}"
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if (node_type, name) in FILE_CHOICE_INPUTS:
            if not isinstance(value, str) or not value:
                raise WorkflowError(f"{where}: expected a file name")
            return
        if value not in choices:
            raise WorkflowError(f"{where}: not one of {choices}")
        return
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise WorkflowError(f"{where}: expected a boolean")
        return
    if kind == "STRING":
        if not isinstance(value, str):
            raise WorkflowError(f"{where}: expected a string")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkflowError(f"{where}: expected a finite number")
    if kind == "INT" and int(value) != value:
        raise WorkflowError(f"{where}: expected an integer")
    if "min" in options and value < options["min"]:
        raise WorkflowError(f"{where}: below min {options['min']}")
    if "max" in options and value > options["max"]:
        raise WorkflowError(f"{where}: above max {options['max']}")


def to_api_prompt(
    workflow: dict,
    object_info: dict,
    replace: dict | None = None,
    overrides: dict | None = None,
) -> dict:
    """Validate ``workflow`` against ``object_info`` and return the API-format prompt.

    ``replace`` maps a node type to another with the same outputs (e.g. the checkpoint
    loader to the tiny in-code one), or to ``(type, {old_output: new_output})`` when the
    replacement's outputs sit elsewhere (e.g. CLIP vision as output 3 of the demo model
    loader); replaced nodes keep their links and get the replacement's default widget
    values. ``overrides`` maps ``(node_type, input_name)`` to a value that replaces the
    workflow's widget value (e.g. fewer steps on tiny models); a node id in place of the
    type (``("6", "text")``) sets that one node only.
    """
    replace = {
        k: (v, {}) if isinstance(v, str) else (v[0], dict(v[1])) for k, v in (replace or {}).items()
    }
    overrides = overrides or {}
    links = {link[0]: link for link in workflow["links"]}
    output_moves = {
        node["id"]: replace[node["type"]][1]
        for node in workflow["nodes"]
        if node["type"] in replace
    }
    prompt: dict = {}
    for node in workflow["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_TYPES:
            continue
        if node_type not in object_info:
            raise WorkflowError(f"node {node['id']} has type {node_type!r}, unknown to ComfyUI")
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes are not executed
            continue
        spec = object_info[node_type]
        linked = {}
        for socket in node.get("inputs", []) or []:
            if socket.get("link") is not None:
                link = links.get(socket["link"])
                if link is None:
                    raise WorkflowError(
                        f"node {node['id']} input {socket['name']} has a dangling link"
                    )
                slot = output_moves.get(link[1], {}).get(link[2], link[2])
                linked[socket["name"]] = [str(link[1]), slot]
        values = list(node.get("widgets_values", []) or [])
        inputs: dict = {}
        position = 0
        for name, input_spec, optional in _ordered_inputs(spec):
            if name in linked:
                inputs[name] = linked[name]
                if _is_widget(input_spec):  # a widget turned into a socket keeps its value
                    position += 1 + _has_control_after_generate(name, input_spec)
                continue
            if not _is_widget(input_spec):
                continue
            if position >= len(values):
                if optional:
                    # Saved before the node had this optional widget: the node's default
                    # applies, as when ComfyUI's frontend loads such a workflow.
                    continue
                raise WorkflowError(
                    f"{node_type} (node {node['id']}) has no widget value for {name}"
                )
            value = values[position]
            _check_value(node_type, name, input_spec, value)
            inputs[name] = value
            position += 1
            if _has_control_after_generate(name, input_spec):
                if position < len(values) and values[position] in CONTROL_AFTER_GENERATE:
                    position += 1
        required_sockets = [
            n
            for n, s in spec.get("input", {}).get("required", {}).items()
            if not _is_widget(tuple(s))
        ]
        for name in required_sockets:
            if name not in linked:
                raise WorkflowError(
                    f"{node_type} (node {node['id']}) required input {name} is not linked"
                )
        if node_type in replace:
            replacement = replace[node_type][0]
            defaults = {
                n: s[1]["default"]
                for n, s in object_info[replacement]["input"].get("required", {}).items()
                if len(s) > 1 and isinstance(s[1], dict) and "default" in s[1]
            }
            prompt[str(node["id"])] = {"class_type": replacement, "inputs": defaults}
        else:
            for (override_type, name), value in overrides.items():
                if override_type in (node_type, str(node["id"])) and name not in linked:
                    inputs[name] = value
            prompt[str(node["id"])] = {"class_type": node_type, "inputs": inputs}
    return prompt


def check_overrides(
    workflow: dict, object_info: dict, overrides: dict, *, replaced: frozenset | set = frozenset()
) -> None:
    """Refuse a ``--set`` that would not take effect, instead of ignoring it.

    ``overrides`` maps ``(node type or node id, input name)`` to a value (see
    ``to_api_prompt``). Each target must be a node of the workflow that runs (not a note, not
    swapped for the demo model: ``replaced``), the input one of that node's widget inputs
    and not fed by a link, and the value one the widget accepts (its type, min and max).
    """
    nodes = [n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY_TYPES]
    for (target, name), value in overrides.items():
        setting = f"--set {target}.{name}"
        matches = [n for n in nodes if target in (n["type"], str(n["id"]))]
        if not matches:
            present = ", ".join(sorted({n["type"] for n in nodes}))
            raise WorkflowError(
                f"{setting}: the workflow has no node of type or id {target!r} (its nodes: "
                f"{present})."
            )
        for node in matches:
            node_type = node["type"]
            if node_type in replaced:
                raise WorkflowError(
                    f"{setting}: {node_type} is replaced by the demo model in this run; give "
                    "--checkpoint / --clip-vision to use a real file."
                )
            specs = {n: s for n, s, _ in _ordered_inputs(object_info.get(node_type, {}))}
            widgets = sorted(n for n, s in specs.items() if _is_widget(s))
            if name not in specs or name not in widgets:
                raise WorkflowError(
                    f"{setting}: {node_type} has no widget input {name!r} (its widget inputs: "
                    f"{', '.join(widgets) or 'none'})."
                )
            if any(
                s.get("name") == name and s.get("link") is not None
                for s in node.get("inputs", []) or []
            ):
                raise WorkflowError(
                    f"{setting}: {node_type} (node {node['id']}) takes {name} from a link in "
                    "this workflow, so a value set here would be ignored."
                )
            try:
                _check_value(node_type, name, tuple(specs[name]), value)
            except WorkflowError as error:
                raise WorkflowError(f"--set {error}.") from None


def node_types(workflow: dict) -> set[str]:
    return {node["type"] for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY_TYPES}
