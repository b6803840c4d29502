"""The ComfyUI adapters of DPAgg-TI on real (tiny, in-code) ComfyUI models."""

from __future__ import annotations

import pytest
import torch

from comfyui_dp_adapt.dp.embedding_file import save_embedding
from comfyui_dp_adapt.dp.inversion import InversionConfig, train_per_image_embeddings
from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(comfy, request):
    import folder_paths

    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    embeddings = [str(p) for p in folder_paths.get_folder_paths("embeddings")]
    model = tiny_models.build_tiny_model(family=request.param)
    clip = tiny_models.build_tiny_clip(embedding_directory=embeddings, family=request.param)
    vae = tiny_models.build_tiny_vae()
    comfy_compat.load_models([model, clip.patcher])
    return model, clip, vae


@pytest.fixture(scope="module")
def im(comfy):
    from comfyui_dp_adapt.nodes import inversion_model

    return inversion_model


def _encode(clip, text):
    """ComfyUI's conditioning: the context, or (context, pooled) where the family has one."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    if type(clip.cond_stage_model).__name__.endswith("SDXLClipModel"):
        return cond.float().clone(), pooled.float().clone()
    return cond.float().clone()


@pytest.mark.parametrize("clip_skip", [None, -2])
def test_text_forward_equals_comfyui_encoding(tiny, im, clip_skip):
    _, clip, _ = tiny
    clip = clip.clone()
    if clip_skip is not None:
        clip.clip_layer(clip_skip)
    family = im.detect_family(tiny[0], clip)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:1], 2)
    init = im.token_vectors(clip, family, "painting")
    with torch.inference_mode(False):
        ours = im.make_text_forward(clip, family)(
            prompts.ids, prompts.mask, init.repeat(2, 1)[None]
        )
    reference = _encode(clip, STYLE_TEMPLATES[0].format("painting painting"))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    if isinstance(ours, tuple):  # SDXL: the pooled output moves with the trained vectors
        assert ours[1].shape == (1, reference[1].shape[-1])


def test_saved_token_loads_as_embedding_name_and_matches_injection(tiny, im, tmp_path):
    import folder_paths

    _, clip, _ = tiny
    family = im.detect_family(tiny[0], clip)
    width = sum(im.encoder_widths(clip, family))
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 0.1
    directory = folder_paths.get_folder_paths("embeddings")[0]
    import os

    os.makedirs(directory, exist_ok=True)
    tensors = im.split_token(vectors, clip, family)
    assert set(tensors) == set(family.file_keys)
    path = save_embedding(directory, "adapter_test_token", tensors, {}, overwrite=True)
    try:
        via_comfy = _encode(clip, "a painting in the style of embedding:adapter_test_token")
        prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:1], 2)
        with torch.inference_mode(False):
            injected = im.make_text_forward(clip, family)(prompts.ids, prompts.mask, vectors[None])
        torch.testing.assert_close(injected, via_comfy, rtol=1e-4, atol=1e-4)
    finally:
        path.unlink()


def test_real_models_train_without_coupling_bitwise(tiny, im):
    from comfyui_dp_adapt.nodes import comfy_compat

    model, clip, vae = tiny
    family = im.detect_family(model, clip)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latents = comfy_compat.encode_latents(model, vae, images)
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES, 1)
    init = im.token_vectors(clip, family, "painting")
    config = InversionConfig(steps=3, learning_rate=0.01, images_per_batch=3)

    def run(lat):
        with torch.inference_mode(False), torch.enable_grad():
            return train_per_image_embeddings(
                lat,
                initial=init,
                prompts=prompts,
                config=config,
                seeds=[7, 8, 9],
                text_forward=im.make_text_forward(clip, family),
                denoise_loss=im.make_denoise_loss(model),
            )

    first = run(latents)
    changed = latents.clone()
    changed[1] = torch.randn_like(changed[1])
    second = run(changed)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert not torch.equal(first[1], second[1])
    assert (first - init).abs().amax() > 0, "training must move the embeddings"


@pytest.mark.parametrize("per_batch", [2, 4])
def test_real_models_removing_any_image_leaves_the_others_bitwise_identical(tiny, im, per_batch):
    """docs/privacy.md §3.2 on ComfyUI's own kernels (convolutions, attention, norms):
    removing image j re-splits the padded chunks, yet every other result is unchanged."""
    from comfyui_dp_adapt.nodes import comfy_compat

    model, clip, vae = tiny
    family = im.detect_family(model, clip)
    images = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    latents = torch.cat(
        [comfy_compat.encode_latents(model, vae, images[i : i + 1]) for i in range(5)]
    )
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES, 1)
    init = im.token_vectors(clip, family, "painting")
    config = InversionConfig(steps=2, learning_rate=0.01, images_per_batch=per_batch)
    seeds = [31, 32, 33, 34, 35]

    def run(rows):
        with torch.inference_mode(False), torch.enable_grad():
            return train_per_image_embeddings(
                latents[rows],
                initial=init,
                prompts=prompts,
                config=config,
                seeds=[seeds[i] for i in rows],
                text_forward=im.make_text_forward(clip, family),
                denoise_loss=im.make_denoise_loss(model),
                public_rows=6,
            )

    full = run(list(range(5)))
    for removed in range(5):
        keep = [i for i in range(5) if i != removed]
        assert torch.equal(full[keep], run(keep)), f"removing image {removed} moved another"


def test_unsupported_families_are_refused_by_name(tiny, im):
    import comfy.supported_models

    model, clip, _ = tiny
    refiner = model.clone()
    original = refiner.model.model_config
    try:
        refiner.model.model_config = comfy.supported_models.SDXLRefiner(dict(original.unet_config))
        with pytest.raises(im.UnsupportedModelError, match=r"SDXLRefiner.*refiner"):
            im.detect_family(refiner, clip)
    finally:
        refiner.model.model_config = original
    assert im.detect_family(model, clip).name in {"SD1.x", "SD2.x", "SDXL"}


def test_a_clip_of_another_family_is_refused(comfy, im):
    from comfyui_dp_adapt.nodes import tiny_models

    sdxl = tiny_models.build_tiny_model(family="sdxl")
    with pytest.raises(im.UnsupportedModelError, match="clip_g"):
        im.detect_family(sdxl, tiny_models.build_tiny_clip(family="sd1"))


def test_sdxl_token_has_one_part_per_encoder_and_conditions_the_unet_as_comfyui(comfy, im):
    """SDXL: the token is CLIP-L's part then CLIP-G's (d = sum of widths, one mechanism); the
    UNet's ADM input is what ComfyUI's sampler builds from the pooled output of a plain text
    prompt (size = latent x 8, no crop), through the model's own extra_conds."""
    import comfy.samplers

    from comfyui_dp_adapt.nodes import comfy_compat, tiny_models

    model = tiny_models.build_tiny_model(family="sdxl")
    clip = tiny_models.build_tiny_clip(family="sdxl")
    comfy_compat.load_models([model, clip.patcher])
    family = im.detect_family(model, clip)
    assert family.name == "SDXL" and family.file_keys == ("clip_l", "clip_g")
    widths = im.encoder_widths(clip, family)
    assert widths == (tiny_models.TEXT_WIDTH, tiny_models.SDXL_G_WIDTH)
    init = im.token_vectors(clip, family, "painting")
    assert init.shape == (1, sum(widths))
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:1], 1)
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False):
        context, pooled = im.make_text_forward(clip, family)(
            prompts.ids.repeat(2, 1), prompts.mask.repeat(2, 1), init.repeat(2, 1, 1)
        )
        ours = im._unet_conditioning(model.model, (context, pooled), latents)[1]["y"]
    conds = comfy.samplers.encode_model_conds(
        model.model.extra_conds,
        [{"cross_attn": context, "pooled_output": pooled, "model_conds": {}}],
        latents,
        latents.device,
        "positive",
    )
    reference = conds[0]["model_conds"]["y"].cond
    torch.testing.assert_close(ours, reference.to(ours.dtype))
    assert ours.shape == (2, tiny_models.SDXL_G_WIDTH + tiny_models.SDXL_SIZE_EMBEDDING)


def test_dpsgd_per_example_gradients_equal_one_backward_per_example_on_real_models(tiny, im):
    """docs/privacy.md §4: the replicated-leaf backward gives each example's own gradient,
    on ComfyUI's tiny SD models, and changing one example leaves the others bitwise equal."""
    from comfyui_dp_adapt.dp.dpsgd import per_example_gradients
    from comfyui_dp_adapt.nodes import comfy_compat

    model, clip, vae = tiny
    family = im.detect_family(model, clip)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    latents = torch.cat(
        [comfy_compat.encode_latents(model, vae, images[i : i + 1]) for i in range(3)]
    )
    prompts = im.tokenize_templates(clip, family, STYLE_TEMPLATES[:3], 1)
    token = im.token_vectors(clip, family, "painting")
    generator = torch.Generator().manual_seed(5)
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    noise = torch.randn(latents.shape, generator=generator)
    with torch.inference_mode(False), torch.enable_grad():
        text_forward = im.make_text_forward(clip, family)
        denoise_loss = im.make_denoise_loss(model)

        def grads(lat):
            return per_example_gradients(
                lat,
                token,
                prompts.ids,
                prompts.mask,
                timesteps,
                noise,
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )

        together = grads(latents)
        for i in range(3):
            alone = per_example_gradients(
                latents[i : i + 1],
                token,
                prompts.ids[i : i + 1],
                prompts.mask[i : i + 1],
                timesteps[i : i + 1],
                noise[i : i + 1],
                text_forward=text_forward,
                denoise_loss=denoise_loss,
            )
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-6)
        changed = latents.clone()
        changed[1] = torch.randn_like(changed[1])
        after = grads(changed)
    assert torch.equal(together[0], after[0]) and torch.equal(together[2], after[2])
    assert not torch.equal(together[1], after[1])
    assert together.abs().amax() > 0
