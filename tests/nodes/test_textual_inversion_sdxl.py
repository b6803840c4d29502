"""DP Textual Inversion Train on SDXL (tiny in-code SDXL: CLIP-L and CLIP-G, ADM input)."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.embedding_file import read_embedding
from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES

N_IMAGES = 3
K = 2


@pytest.fixture(scope="module")
def env(comfy):
    from comfyui_dp_adapt.nodes import comfy_compat
    from comfyui_dp_adapt.nodes.textual_inversion import DPTextualInversionTrainNode
    from comfyui_dp_adapt.tests.support.tiny_components import tiny_sd1_components

    images = torch.rand(N_IMAGES, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    return {
        **tiny_sd1_components(family="sdxl"),
        "node": DPTextualInversionTrainNode(),
        "images": images,
        "ledgers": comfy_compat.user_directory() / "dp_adapt" / "ledgers",
    }


def release(env, method):
    from comfyui_dp_adapt.dp.budget import PrivacyBudget
    from comfyui_dp_adapt.dp.ledger import TotalBudget
    from comfyui_dp_adapt.tests.support.private_sets import private_image_set

    budget = PrivacyBudget(
        epsilon=2.0,
        delta=1e-5,
        total=TotalBudget(epsilon=8.0, delta=1e-5),
        ledger_name=f"sdxl-{uuid.uuid4().hex[:8]}",
        ledger_directory=env["ledgers"],
        declared_dataset_size=4,
    )
    keys = tuple(f"hmac-sha256:sdxl-{uuid.uuid4().hex}" for _ in range(N_IMAGES))
    name = f"sdxl_{method.replace('-', '').lower()}_{uuid.uuid4().hex[:6]}"
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = env["node"].train(
            model=env["model"],
            clip=env["clip"],
            vae=env["vae"],
            private_images=private_image_set(env["images"], keys),
            budget=budget,
            embedding_name=name,
            num_vectors=K,
            initializer_word="painting",
            template_set="style",
            steps=2,
            learning_rate=0.01,
            images_per_batch=2,
            sampling_rate=1.0,
            clip_norm=0.5,
            bound_mode="clip",
            overwrite=False,
            method=method,
        )
    return name, out


@pytest.mark.parametrize("method", ["DPAgg-TI", "DP-SGD"])
def test_sdxl_release_saves_clip_l_and_clip_g_parts_of_one_mechanism(env, method):
    from comfyui_dp_adapt.nodes import inversion_model as im
    from comfyui_dp_adapt.nodes import tiny_models

    name, out = release(env, method)
    token, report = out["result"]
    assert token == f"embedding:{name}"
    tensors, metadata = read_embedding(env["embeddings"] / f"{name}.safetensors")
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (K, tiny_models.TEXT_WIDTH)
    assert tensors["clip_g"].shape == (K, tiny_models.SDXL_G_WIDTH)
    # Post-processing gives every part of every vector its own encoder's typical norm.
    family = im.detect_family(env["model"], env["clip"])
    for key, target in zip(family.file_keys, im.mean_token_norms(env["clip"], family), strict=True):
        norms = torch.linalg.vector_norm(tensors[key].double(), dim=1)
        torch.testing.assert_close(norms, torch.full((K,), target, dtype=torch.float64))
    assert metadata["dp_adapt.model_family"] == "SDXL"
    # One mechanism over the concatenation: the DpEvent and the report use D = k * (l + g).
    width = tiny_models.TEXT_WIDTH + tiny_models.SDXL_G_WIDTH
    assert f"vectors: {K} x {width}" in report
    assert json.loads(metadata["dp_adapt.dp_event"])


def test_sdxl_token_loads_in_an_sdxl_prompt_as_its_injected_vectors(env):
    from comfyui_dp_adapt.nodes import inversion_model as im

    name, _ = release(env, "DPAgg-TI")
    tensors, _ = read_embedding(env["embeddings"] / f"{name}.safetensors")
    clip = env["clip"]
    family = im.detect_family(env["model"], clip)
    token = torch.cat([tensors["clip_l"], tensors["clip_g"]], dim=1)
    with torch.inference_mode():
        text = STYLE_TEMPLATES[0].format(f"embedding:{name}")
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:1], K)
    with torch.inference_mode(False):
        context, injected_pooled = im.make_text_forward(clip, family)(
            prompts.ids, prompts.mask, token[None]
        )
    torch.testing.assert_close(context, cond.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(injected_pooled, pooled.float(), rtol=1e-4, atol=1e-4)


def test_sdxl_released_token_samples_through_comfyui(env):
    import nodes

    name, _ = release(env, "DPAgg-TI")
    with torch.inference_mode():
        (positive,) = nodes.CLIPTextEncode().encode(env["clip"], f"a cat, embedding:{name}")
        (negative,) = nodes.CLIPTextEncode().encode(env["clip"], "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (samples,) = nodes.common_ksampler(
            env["model"], 0, 2, 4.0, "euler", "normal", positive, negative, latent
        )
        (images,) = nodes.VAEDecode().decode(env["vae"], samples)
    assert (
        positive[0][1]["pooled_output"].shape[-1]
        == env["clip"].cond_stage_model.clip_g.transformer.text_projection.weight.shape[0]
    )
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
