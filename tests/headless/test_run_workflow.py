"""The README's first command: the DP textual-inversion workflow, headless, no download."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.comfy_server]

FAST = [
    "DPAdaptLoadPrivateImages.resolution=64",
    "DPAdaptTextualInversionTrain.steps=2",
    "EmptyLatentImage.width=64",
    "EmptyLatentImage.height=64",
    "KSampler.steps=2",
]


def run(out, *extra):
    command = [
        sys.executable,
        str(PACK_ROOT / "run_workflow.py"),
        str(PACK_ROOT / "workflows" / "Private style token (DP textual inversion).json"),
        "--out",
        str(out),
    ]
    for item in FAST:
        command += ["--set", item]
    return subprocess.run(command + list(extra), capture_output=True, text=True, timeout=900)


def test_readme_command_writes_embedding_images_report_and_ledger(tmp_path):
    out = tmp_path / "demo"
    done = run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    embeddings = list((out / "embeddings").glob("*.safetensors"))
    assert [p.name for p in embeddings] == ["dp_style.safetensors"]
    _, metadata = read_embedding(embeddings[0])
    assert "dp_adapt.dp_event" in metadata
    # The demo model's quick-start settings of the workflow: 4 pictures at 64 px.
    pictures = sorted((out / "images").glob("*.png"))
    assert len(pictures) == 4
    assert Image.open(pictures[0]).size == (64, 64)
    assert f"embedding: {embeddings[0]}" in done.stdout
    # The token preview grid (Preview Image): 4 demo prompts of 64 px in a 2 x 2 grid, each
    # shown 4x (nearest neighbour) so that the style is visible at 100 % zoom.
    (grid,) = sorted((out / "previews").glob("*.png"))
    assert Image.open(grid).size == (512, 512) and f"preview: {grid}" in done.stdout
    report = (out / "privacy_report.txt").read_text()
    assert "noise multiplier" in report and "ledger" in report
    ledgers = list((out / "user").rglob("*.json"))
    assert any(json.loads(p.read_text()).get("collections") for p in ledgers)


def test_points_at_a_real_image_folder(tmp_path):
    from comfyui_dp_adapt.demo.synthetic_images import write_synthetic_style_set

    images = tmp_path / "mine"
    write_synthetic_style_set(images, count=3, size=64, seed=5)
    done = run(tmp_path / "out", "--images", str(images))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "privacy_report.txt").read_text()
    # The real count (3) is private: the report states the declared, public n_hat only.
    assert "declared dataset size n_hat = 100" in report and " 3 " not in report


def test_refused_run_ends_with_one_clear_line_and_a_failure_code(tmp_path):
    done = run(
        tmp_path / "out",
        "--set",
        "DPAdaptPrivacyBudget.epsilon=9",
        "--set",
        "DPAdaptPrivacyBudget.total_epsilon=1",
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("run_workflow.py: FAILED: DPAdapt"), done.stderr[-2000:]
    assert "epsilon" in last
    assert "Traceback" not in done.stderr and '"exception_message"' not in done.stderr


def test_a_second_release_into_the_same_folder_keeps_the_first_file(tmp_path):
    out = tmp_path / "demo"
    first = run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(out)  # identical settings: the recorded release, same file, nothing spent
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (out / "embeddings").glob("*.safetensors")] == ["dp_style.safetensors"]
    second = run(out, "--set", "DPAdaptTextualInversionTrain.steps=3")  # a new release
    assert second.returncode == 0, second.stderr[-3000:]
    names = sorted(p.name for p in (out / "embeddings").glob("*.safetensors"))
    assert names == ["dp_style-2.safetensors", "dp_style.safetensors"]
    releases = {read_embedding(out / "embeddings" / n)[1]["dp_adapt.release_id"] for n in names}
    assert len(releases) == 2
