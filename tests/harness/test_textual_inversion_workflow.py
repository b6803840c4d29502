"""The shipped DP textual-inversion workflow in a real ComfyUI server: file, ledger, images."""

from __future__ import annotations

import json
import uuid

import pytest

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.headless import workflows as wf
from comfyui_dp_adapt.tests.support.pack import WORKFLOWS_DIR
from comfyui_dp_adapt.tests.support.workflow_inputs import TINY_MODEL_OVERRIDES, prepare_inputs

pytestmark = pytest.mark.comfy_server


SD_WORKFLOW = "Private style token (DP textual inversion).json"
SDXL_WORKFLOW = "Private style token on SDXL (DP textual inversion).json"
FILE_KEYS = {SD_WORKFLOW: {"emb_params"}, SDXL_WORKFLOW: {"clip_l", "clip_g"}}


@pytest.mark.parametrize(
    ("workflow_name", "method"),
    [(SD_WORKFLOW, "DPAgg-TI"), (SD_WORKFLOW, "DP-SGD"), (SDXL_WORKFLOW, "DPAgg-TI")],
)
def test_workflow_produces_embedding_ledger_entry_and_images(comfy_server, workflow_name, method):
    from comfyui_dp_adapt.nodes.tiny_loaders import replacements_for

    workflow = wf.load_workflow(WORKFLOWS_DIR / workflow_name)
    prepare_inputs(workflow, comfy_server)
    name = f"wf_{uuid.uuid4().hex[:8]}"
    ledger = f"ledger-{uuid.uuid4().hex[:8]}"
    overrides = {
        **TINY_MODEL_OVERRIDES,
        ("DPAdaptTextualInversionTrain", "embedding_name"): name,
        ("DPAdaptPrivacyBudget", "ledger_name"): ledger,
        ("SaveImage", "filename_prefix"): name,
        ("DPAdaptTextualInversionTrain", "method"): method,
        ("DPAdaptTextualInversionTrain", "sampling_rate"): 0.5,
    }
    object_info = comfy_server.get_json("/object_info")
    prompt = wf.to_api_prompt(
        workflow, object_info, replace=replacements_for(workflow), overrides=overrides
    )
    before = set(comfy_server.output_dir.glob(f"{name}*.png"))
    entry = comfy_server.run_prompt(prompt)

    tensors, metadata = read_embedding(comfy_server.default_embeddings_dir / f"{name}.safetensors")
    assert set(tensors) == FILE_KEYS[workflow_name]
    assert float(metadata["dp_adapt.epsilon"]) <= 1.0
    assert metadata["dp_adapt.method"] == method
    ledgers = list(comfy_server.user_dir.rglob("ledger.json"))
    assert len(ledgers) == 1
    collections = json.loads(ledgers[0].read_text())["collections"]
    assert len(collections[ledger]["releases"]) == 1
    images = set(comfy_server.output_dir.glob(f"{name}*.png")) - before
    assert len(images) == 1
    texts = [t for output in entry["outputs"].values() for t in output.get("text", [])]
    assert any(f"embedding:{name}" in t for t in texts)
