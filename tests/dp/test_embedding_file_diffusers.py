"""A released token file loads in diffusers' ``load_textual_inversion`` too (docs/privacy.md §3.4).

The pipeline is built from tiny random "dummy components" the way diffusers' own tests do;
its tokenizer is ComfyUI's bundled SD1 CLIP tokenizer (local files, no download).
"""

from __future__ import annotations

import pytest
import torch

from comfyui_dp_adapt.dp.embedding_file import save_embedding

WIDTH = 32


@pytest.fixture(scope="module")
def pipeline(comfy_dir):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=32,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=WIDTH,
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(comfy_dir / "comfy" / "sd1_tokenizer")
    )
    return diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_released_file_loads_with_diffusers_load_textual_inversion(pipeline, tmp_path):
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))
    path = save_embedding(
        tmp_path, "dp_style", {"emb_params": vectors}, {"dp_adapt.epsilon": "1.0"}, overwrite=False
    )
    pipeline.load_textual_inversion(str(path), token="<dp-style>")
    tokens = ["<dp-style>", "<dp-style>_1"]
    ids = pipeline.tokenizer.convert_tokens_to_ids(tokens)
    assert all(i != pipeline.tokenizer.unk_token_id for i in ids)
    table = pipeline.text_encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(table[ids], vectors)


L_WIDTH, G_WIDTH, TIME_WIDTH = 32, 48, 8


@pytest.fixture(scope="module")
def sdxl_pipeline(comfy_dir):
    """An SDXL pipeline of tiny dummy components (two text encoders, text_time ADM)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_WIDTH + G_WIDTH,
        cross_attention_dim=L_WIDTH + G_WIDTH,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=32,
    )

    def text_config(width):
        return transformers.CLIPTextConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=width,
        )

    tokenizer_path = str(comfy_dir / "comfy" / "sd1_tokenizer")
    return diffusers.StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=transformers.CLIPTextModel(text_config(L_WIDTH)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(text_config(G_WIDTH)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_path),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_path, pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler(),
    )


def test_sdxl_file_loads_in_both_diffusers_text_encoders(sdxl_pipeline, tmp_path):
    """The documented diffusers route for SDXL embeddings: ``clip_l`` into text_encoder and
    ``clip_g`` into text_encoder_2, under the same token."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(2)
    parts = {"clip_l": torch.randn(2, L_WIDTH, generator=generator)}
    parts["clip_g"] = torch.randn(2, G_WIDTH, generator=generator)
    path = save_embedding(tmp_path, "dp_style_xl", parts, {}, overwrite=False)
    state = load_file(str(path))
    pipe = sdxl_pipeline
    pipe.load_textual_inversion(
        state["clip_l"], token="<dp-xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"],
        token="<dp-xl>",
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    for key, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<dp-xl>", "<dp-xl>_1"])
        assert all(i != tokenizer.unk_token_id for i in ids)
        table = encoder.get_input_embeddings().weight.detach()
        torch.testing.assert_close(table[ids], parts[key])
    # The token then conditions a prompt in both encoders.
    embeds = pipe.encode_prompt(
        "a house in the style of <dp-xl>", do_classifier_free_guidance=False
    )
    assert embeds[0].shape[-1] == L_WIDTH + G_WIDTH and embeds[2].shape[-1] == G_WIDTH
