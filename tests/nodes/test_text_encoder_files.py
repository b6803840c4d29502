"""A text encoder saved by transformers 5 (keys without ``text_model.``, as a diffusers
folder made today holds it), loaded through ComfyUI's own text-encoder loader: either this
ComfyUI copy loads it, or the pack's public probe refuses the model before anything is
spent. Both copies checked (March 2024 and 0.3.64) leave such an encoder unloaded ("clip
missing") and give non-finite values: how a release once trained on NaNs without a word."""

from __future__ import annotations

import uuid

import pytest
import torch
from safetensors import safe_open

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.dp.errors import InvalidParameterError

pytestmark = pytest.mark.slow
FC1 = "encoder.layers.3.mlp.fc1.weight"


@pytest.fixture(scope="module")
def saved_text_encoder(comfy, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from comfyui_dp_adapt.nodes.tiny_models import SD15_TEXT

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        **SD15_TEXT, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"
    )
    folder = tmp_path_factory.mktemp("text_encoder")
    transformers.CLIPTextModel(config).save_pretrained(str(folder))
    return folder / "model.safetensors"


def test_transformers5_text_encoder_loads_or_is_refused_before_spending(saved_text_encoder):
    import comfy.sd

    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models
    from comfyui_dp_adapt.nodes.textual_inversion import DPTextualInversionTrainNode
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    with safe_open(str(saved_text_encoder), framework="pt") as handle:
        keys = set(handle.keys())
        key = FC1 if FC1 in keys else "text_model." + FC1
        written = handle.get_tensor(key).float()
    embeddings = comfy_compat.embeddings_directories()[0]
    with torch.inference_mode():
        clip = comfy.sd.load_clip([str(saved_text_encoder)], embedding_directory=[str(embeddings)])
    encoder = clip.cond_stage_model.clip_l.transformer.text_model
    loaded = torch.equal(encoder.encoder.layers[3].mlp.fc1.weight.float().cpu(), written)
    model = tiny_models.build_tiny_model(unet_overrides={"context_dim": 768})
    ledgers = comfy_compat.user_directory() / "dp_adapt" / "ledgers"
    budget = PrivacyBudget(
        epsilon=1.0,
        delta=1e-5,
        total=TotalBudget(epsilon=4.0, delta=1e-5),
        ledger_name=f"tf5-{uuid.uuid4().hex[:8]}",
        ledger_directory=ledgers,
        declared_dataset_size=2,
    )
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    keys = tuple(f"hmac-sha256:tf5-{uuid.uuid4().hex}" for _ in range(2))
    name = f"tf5_{uuid.uuid4().hex[:6]}"

    def release():
        with torch.inference_mode():
            return DPTextualInversionTrainNode().train(
                model=model,
                clip=clip,
                vae=tiny_models.build_tiny_vae(),
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

    path = embeddings / f"{name}.safetensors"
    if loaded:
        release()
        assert torch.isfinite(read_embedding(path)[0]["emb_params"]).all()
        return
    with pytest.raises(InvalidParameterError, match="text encoder") as refused:
        release()
    assert "no budget was spent" in str(refused.value)
    assert not path.exists()
    assert not budget.ledger_path.exists() or budget.ledger().release_count(budget.ledger_name) == 0
