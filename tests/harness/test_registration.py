"""Level "registration": a real ComfyUI server loads the pack and lists every node."""

from __future__ import annotations

import re

import pytest

from comfyui_dp_adapt.headless.comfy_server import PACK_LINK_NAME
from comfyui_dp_adapt.tests.support.pack import expected_node_types

pytestmark = pytest.mark.comfy_server


def test_object_info_lists_every_node_of_the_pack(comfy_server):
    object_info = comfy_server.get_json("/object_info")
    missing = expected_node_types(include_testing=True) - set(object_info)
    assert not missing, f"ComfyUI does not list {sorted(missing)}; log:\n{comfy_server.log()}"


def test_pack_nodes_report_this_pack_as_their_module(comfy_server):
    object_info = comfy_server.get_json("/object_info")
    for node_type in expected_node_types(include_testing=True):
        module = object_info[node_type].get("python_module", f"custom_nodes.{PACK_LINK_NAME}")
        assert PACK_LINK_NAME in module, f"{node_type} registered by {module}"


def test_log_has_no_import_failure_for_the_pack(comfy_server):
    log = comfy_server.log()
    failures = [
        line
        for line in log.splitlines()
        if PACK_LINK_NAME in line and re.search(r"IMPORT FAILED|Cannot import|Traceback", line)
    ]
    assert "comfyui-dp-adapt failed to register" not in log
    assert not failures, "\n".join(failures)
    assert re.search(rf"custom_nodes[/\\]{re.escape(PACK_LINK_NAME)}", log), (
        "the server log does not show the pack being loaded at all"
    )


def test_server_serves_the_report_extension(comfy_server):
    """WEB_DIRECTORY: the frontend loads web/dp_report.js, which draws each report on its node."""
    import urllib.request

    listed = [e for e in comfy_server.get_json("/extensions") if e.endswith("/dp_report.js")]
    assert listed, "ComfyUI does not list the pack's web extension"
    with urllib.request.urlopen(comfy_server.url + listed[0], timeout=30) as response:
        source = response.read().decode()
    assert "registerExtension" in source and "onExecuted" in source


def test_server_answers_the_ledger_balance_route(comfy_server):
    """The Privacy Budget node's live balance (web/dp_report.js) comes from this route."""
    import urllib.error

    from comfyui_dp_adapt.nodes.ledger_route import ROUTE

    fresh = comfy_server.get_json(f"{ROUTE}?name=route-test&total_epsilon=4&total_delta=1e-5")
    assert fresh["releases"] == 0 and fresh["total_epsilon"] == 4.0
    assert "no release recorded yet" in fresh["line"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        comfy_server.get_json(f"{ROUTE}?name=..%2Fescape&total_epsilon=4&total_delta=1e-5")
    assert refused.value.code == 400
    assert "ledger name" in refused.value.read().decode()


def test_template_browser_lists_each_workflow_with_its_thumbnail(comfy_server):
    """Current ComfyUI's template browser: a card per shipped workflow, titled by its file
    name, with ``<name>.jpg`` as thumbnail (the legacy frontend has no template browser)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from comfyui_dp_adapt.tests.support.pack import shipped_workflows

    try:
        listed = comfy_server.get_json("/workflow_templates")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            pytest.skip("this ComfyUI has no template browser (before mid-2024)")
        raise
    # A set: the in-process tests may have linked the pack into a second custom_nodes
    # folder under the same name, and ComfyUI then lists its workflows twice.
    names = sorted(set(listed.get(PACK_LINK_NAME, [])))
    assert names == sorted(p.stem for p in shipped_workflows())
    for name in names:
        quoted = urllib.parse.quote(f"{name}.jpg")
        url = f"{comfy_server.url}/api/workflow_templates/{PACK_LINK_NAME}/{quoted}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers.get_content_type() == "image/jpeg"
            assert len(response.read()) > 5_000
