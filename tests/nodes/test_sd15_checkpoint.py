"""The real loader path: an SD1.5-format single-file checkpoint at SD1.5's real sizes
(random weights, written by ``tiny_models.write_sd15_checkpoint``) through ComfyUI's own
Load Checkpoint node, then a DP Textual Inversion release on it."""

from __future__ import annotations

import gc
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.dp.errors import InvalidParameterError

pytestmark = pytest.mark.slow
TEXT_KEY = "cond_stage_model.transformer.{}encoder.layers.3.mlp.fc1.weight"


@pytest.fixture(scope="module")
def checkpoints(comfy):
    """The checkpoint in ComfyUI's checkpoints folder, in both text-key layouts."""
    import folder_paths

    from comfyui_dp_adapt.nodes import tiny_models

    folder = Path(folder_paths.get_folder_paths("checkpoints")[0])
    folder.mkdir(parents=True, exist_ok=True)
    names = {"standard": "dp_adapt_sd15_random.safetensors"}
    names["no text_model prefix"] = "dp_adapt_sd15_random_tf5.safetensors"
    for layout, name in names.items():
        if not (folder / name).exists():
            prefix = "text_model." if layout == "standard" else ""
            tiny_models.write_sd15_checkpoint(folder / name, seed=0, text_key_prefix=prefix)
            gc.collect()
    yield {layout: (folder / name, name) for layout, name in names.items()}
    for name in names.values():
        (folder / name).unlink(missing_ok=True)


def load_checkpoint(name):
    import comfy.model_management
    import nodes

    # One SD1.5 in memory at a time (4.3 GB in fp32 on a CPU).
    comfy.model_management.unload_all_models()
    gc.collect()
    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


def release(model, clip, vae):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.textual_inversion import DPTextualInversionTrainNode
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    budget = PrivacyBudget(
        epsilon=1.0,
        delta=1e-5,
        total=TotalBudget(epsilon=4.0, delta=1e-5),
        ledger_name=f"sd15-{uuid.uuid4().hex[:8]}",
        ledger_directory=comfy_compat.user_directory() / "dp_adapt" / "ledgers",
        declared_dataset_size=2,
    )
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    keys = tuple(f"hmac-sha256:sd15-{uuid.uuid4().hex}" for _ in range(2))
    name = f"sd15_{uuid.uuid4().hex[:6]}"
    with torch.inference_mode():
        out = DPTextualInversionTrainNode().train(
            model=model,
            clip=clip,
            vae=vae,
            private_images=private_image_set(images, keys),
            budget=budget,
            embedding_name=name,
            num_vectors=1,
            initializer_word="painting",
            template_set="style",
            steps=1,
            learning_rate=0.005,
            images_per_batch=2,
            sampling_rate=1.0,
            clip_norm=0.5,
            bound_mode="clip",
            overwrite=False,
        )
    return name, out, budget


def text_weights_match_the_file(clip, path, prefix) -> bool:
    with safe_open(str(path), framework="pt") as handle:
        written = handle.get_tensor(TEXT_KEY.format(prefix)).float()
    loaded = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[3].mlp.fc1.weight
    return torch.equal(loaded.float().cpu(), written)


def test_sd15_single_file_checkpoint_loads_as_sd15_and_trains_a_token(checkpoints):
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes import inversion_model as im

    path, name = checkpoints["standard"]
    model, clip, vae = load_checkpoint(name)
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_config.unet_config["model_channels"] == 320
    family = im.detect_family(model, clip)
    assert im.encoder_widths(clip, family) == (768,)
    assert text_weights_match_the_file(clip, path, "text_model.")
    token_name, out, _ = release(model, clip, vae)
    tensors, _ = read_embedding(
        comfy_compat.embeddings_directories()[0] / f"{token_name}.safetensors"
    )
    assert tensors["emb_params"].shape == (1, 768)
    assert torch.isfinite(tensors["emb_params"]).all()
    assert out["result"][0] == f"embedding:{token_name}"


def test_text_keys_without_text_model_prefix_load_or_are_refused_before_spending(checkpoints):
    """A checkpoint saved by transformers 5 (text-encoder keys without ``text_model.``):
    either this ComfyUI copy loads the encoder (then the release works), or the public
    probe refuses the model with a clear message and nothing is spent."""
    from comfyui_dp_adapt.nodes import comfy_compat

    path, name = checkpoints["no text_model prefix"]
    model, clip, vae = load_checkpoint(name)
    if text_weights_match_the_file(clip, path, ""):
        print("this ComfyUI copy loads text-encoder keys without text_model.")
        token_name, _, _ = release(model, clip, vae)
        file = comfy_compat.embeddings_directories()[0] / f"{token_name}.safetensors"
        assert torch.isfinite(read_embedding(file)[0]["emb_params"]).all()
        return
    with pytest.raises(InvalidParameterError, match="text encoder") as refused:
        release(model, clip, vae)
    assert "no budget was spent" in str(refused.value)
