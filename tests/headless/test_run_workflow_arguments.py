"""run_workflow.py says what is wrong with its arguments, in one line, before anything runs:
help without a set-up, unknown --set targets, values ComfyUI would misread, file flags the
workflow cannot use, Ctrl-C and a ComfyUI that fails to start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from comfyui_dp_adapt.headless import runner
from comfyui_dp_adapt.headless import workflows as wf
from comfyui_dp_adapt.headless.comfy_server import ComfyServer, ServerStartFailed
from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

SCRIPT = PACK_ROOT / "run_workflow.py"
TOKEN_WORKFLOW = PACK_ROOT / "workflows" / "Private style token (DP textual inversion).json"
QUICK_START = PACK_ROOT / "workflows" / "Quick start on the demo model.json"


def test_help_comes_before_any_setup_on_a_python_without_torch(tmp_path):
    # -S: no site-packages, so no torch: the old script started creating a venv first.
    venv = tmp_path / "would-be-venv"
    env = {**os.environ, "DP_ADAPT_VENV": str(venv)}
    env.pop("DP_ADAPT_BOOTSTRAPPED", None)
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--set" in done.stdout
    assert not venv.exists() and "[setup]" not in done.stdout + done.stderr


@pytest.mark.parametrize("value", ["[1, 2]", '{"a": 1}', "null"])
def test_a_value_comfyui_would_read_as_a_link_is_refused(value, capsys):
    sys.path.insert(0, str(PACK_ROOT))
    try:
        import run_workflow
    finally:
        sys.path.remove(str(PACK_ROOT))
    with pytest.raises(SystemExit) as stopped:
        run_workflow.main(
            [str(TOKEN_WORKFLOW), "--set", f"DPAdaptPrivacyBudget.declared_dataset_size={value}"]
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "declared_dataset_size" in err and "number, true/false or text" in err


def test_a_file_flag_the_workflow_cannot_use_is_refused_before_anything_runs(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    # The quick start loads the demo model itself: --checkpoint used to be dropped silently.
    with pytest.raises(wf.WorkflowError) as refused:
        runner._check_files_apply(wf.load_workflow(QUICK_START), checkpoint=checkpoint)
    assert "--checkpoint: this workflow has no Load Checkpoint node" in str(refused.value)
    planner = wf.load_workflow(PACK_ROOT / "workflows" / "Privacy budget planner.json")
    with pytest.raises(wf.WorkflowError, match="--images: this workflow has no DP Load Private"):
        runner._check_files_apply(planner, images=tmp_path)


def test_a_missing_file_is_refused(tmp_path):
    workflow = wf.load_workflow(TOKEN_WORKFLOW)
    with pytest.raises(wf.WorkflowError, match="no such file"):
        runner._check_files_apply(workflow, checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(wf.WorkflowError, match="no such folder"):
        runner._check_files_apply(workflow, images=tmp_path / "nope")


def test_comfyui_failing_at_start_up_is_one_line_with_its_reason_and_log(tmp_path):
    broken = tmp_path / "ComfyUI"
    (broken / "comfy").mkdir(parents=True)
    (broken / "comfy" / "cli_args.py").write_text("")
    (broken / "main.py").write_text("import a_module_nobody_installed_42\n")
    server = ComfyServer(comfy_dir=broken, pack_dir=PACK_ROOT, work_dir=tmp_path / "work")
    with pytest.raises(ServerStartFailed) as failed:
        runner._start(server, tmp_path)
    line = runner.failure_line(failed.value)
    assert "\n" not in line
    assert line.startswith("ComfyUI exited at start-up: ModuleNotFoundError")
    assert "a_module_nobody_installed_42" in line
    kept = tmp_path / "comfyui.log"
    assert f"(ComfyUI's log: {kept})" in line and "a_module_nobody_installed_42" in kept.read_text()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")


@pytest.mark.comfy_server
class TestOverridesAgainstTheNodes:
    def check(self, object_info, overrides, **kwargs):
        wf.check_overrides(wf.load_workflow(TOKEN_WORKFLOW), object_info, overrides, **kwargs)

    def test_known_settings_pass(self, object_info):
        self.check(
            object_info,
            {("DPAdaptPrivacyBudget", "epsilon"): 2.0, ("KSampler", "steps"): 3},
        )

    def test_an_unknown_node_type_is_refused(self, object_info):
        with pytest.raises(wf.WorkflowError, match=r"no node of type or id 'NoSuchNode'"):
            self.check(object_info, {("NoSuchNode", "x"): 1})

    def test_an_unknown_input_is_refused_with_the_inputs_it_has(self, object_info):
        with pytest.raises(wf.WorkflowError) as refused:
            self.check(object_info, {("DPAdaptPrivacyBudget", "nonexistent"): 1})
        message = str(refused.value)
        assert "has no widget input 'nonexistent'" in message and "epsilon" in message

    def test_a_value_out_of_range_names_the_rule(self, object_info):
        maximum = object_info["DPAdaptPrivacyBudget"]["input"]["required"]["epsilon"][1]["max"]
        with pytest.raises(wf.WorkflowError) as refused:
            self.check(object_info, {("DPAdaptPrivacyBudget", "epsilon"): 1e300})
        assert f"above max {maximum}" in str(refused.value)
        assert "DPAdaptPrivacyBudget.epsilon" in str(refused.value)

    def test_a_replaced_loader_is_refused(self, object_info):
        with pytest.raises(wf.WorkflowError, match="replaced by the demo model"):
            self.check(
                object_info,
                {("CheckpointLoaderSimple", "ckpt_name"): "x.safetensors"},
                replaced={"CheckpointLoaderSimple"},
            )


@pytest.mark.slow
@pytest.mark.comfy_server
def test_an_unknown_set_target_fails_the_command_in_one_line(tmp_path):
    done = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), str(TOKEN_WORKFLOW), "--out", str(tmp_path)),
            *("--set", "DPAdaptPrivacyBudget.nonexistent=1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("run_workflow.py: FAILED: --set DPAdaptPrivacyBudget.nonexistent")
    assert "Traceback" not in done.stderr


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.comfy_server
def test_ctrl_c_stops_with_one_line_and_no_traceback(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(TOKEN_WORKFLOW), "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a suite started in the background (``cmd &`` in a script)
        # passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=_interruptible,
    )
    deadline = time.monotonic() + 300
    seen = ""
    while time.monotonic() < deadline:  # progress lines go to stderr (logging)
        line = process.stderr.readline()
        seen += line
        if "Starting ComfyUI" in line or not line:
            break
    assert "Starting ComfyUI" in seen, seen[-2000:]
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "run_workflow.py: INTERRUPTED (Ctrl-C): stopped."
