"""The DP Style Token Preview node in a real (in-process) ComfyUI on tiny models."""

from __future__ import annotations

import uuid

import pytest
import torch

from comfyui_dp_adapt.dp.errors import DpAdaptError

SIDE = 64


@pytest.fixture(scope="module")
def env(comfy):
    from comfyui_dp_adapt.dp.embedding_file import save_embedding
    from comfyui_dp_adapt.nodes.token_preview import StyleTokenPreviewNode
    from comfyui_dp_adapt.tests.support.tiny_components import tiny_sd1_components

    components = tiny_sd1_components()
    clip = components["clip"]
    width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
    tokens = []
    for seed in (1, 2):
        name = f"preview_{uuid.uuid4().hex[:8]}"
        vector = torch.randn(1, width, generator=torch.Generator().manual_seed(seed)) * 5
        save_embedding(components["embeddings"], name, {"emb_params": vector}, {}, overwrite=False)
        tokens.append(f"embedding:{name}")
    return {**components, "node": StyleTokenPreviewNode(), "tokens": tokens}


def preview(env, token, prompts, seed=3):
    with torch.inference_mode():
        return env["node"].preview(
            env["model"],
            env["clip"],
            env["vae"],
            token,
            prompts,
            "",
            SIDE,
            SIDE,
            seed,
            2,
            3.0,
            "euler",
            "normal",
        )


PROMPTS = "a house in the style of {token}\na tree, {token}\n\n{token} boat\n"


def test_one_picture_per_prompt_tiled_near_square(env):
    out = preview(env, env["tokens"][0], PROMPTS)
    (grid,) = out["result"]
    side = grid.shape[1] // 2  # cells are enlarged for display, the layout is unchanged
    assert grid.shape[0] == 1 and grid.shape[1] == grid.shape[2] and grid.shape[-1] == 3
    assert torch.isfinite(grid).all()
    # 3 prompts: a 2 x 2 grid, the fourth cell left white.
    assert torch.equal(grid[0, side:, side:], torch.ones_like(grid[0, side:, side:]))
    assert not torch.equal(grid[0, :side, :side], torch.ones_like(grid[0, :side, :side]))
    text = out["ui"]["text"][0]
    assert "no budget" in text and text.count(env["tokens"][0]) == 4  # header + 3 prompts


def test_the_pictures_are_made_with_the_token(env):
    first, second = env["tokens"]
    a = preview(env, first, PROMPTS)["result"][0]
    again = preview(env, first, PROMPTS)["result"][0]
    b = preview(env, second, PROMPTS)["result"][0]
    assert torch.equal(a, again), "same token, same seed: the same pictures"
    assert not torch.allclose(a, b), "another token must give other pictures"


def test_small_pictures_are_enlarged_pixel_for_pixel_for_display(env):
    from comfyui_dp_adapt.nodes.token_preview import DISPLAY_MIN_CELL, enlarge_for_display

    (grid,) = preview(env, env["tokens"][0], "{token}")["result"]
    factor = -(-DISPLAY_MIN_CELL // SIDE)
    assert grid.shape[1:3] == (SIDE * factor, SIDE * factor)
    # Nearest neighbour: every factor x factor block is one original pixel, no new colours.
    blocks = grid[0].reshape(SIDE, factor, SIDE, factor, 3)
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))
    large = torch.rand(1, 8, 8, 3)
    assert enlarge_for_display(large, cell=DISPLAY_MIN_CELL) is large


def test_tile_places_pictures_row_by_row():
    from comfyui_dp_adapt.nodes.token_preview import tile

    pictures = torch.stack([torch.full((2, 3, 1), float(i) / 10) for i in range(5)])
    grid = tile(pictures)[0]
    assert grid.shape == (2 * 2, 3 * 3, 1)
    for index in range(5):
        r, c = divmod(index, 3)
        assert torch.all(grid[r * 2 : r * 2 + 2, c * 3 : c * 3 + 3] == index / 10)
    assert torch.all(grid[2:, 6:] == 1.0)


@pytest.mark.parametrize(
    ("token", "prompts", "message"),
    [
        ("dp_style", PROMPTS, "embedding:NAME"),
        ("embedding:x", "   \n", "prompts is empty"),
        ("embedding:x", "a tree\n{token} boat", "'a tree'"),
        ("embedding:x", "\n".join(["{token}"] * 17), "at most 16"),
    ],
)
def test_bad_inputs_are_refused_clearly(env, token, prompts, message):
    with pytest.raises(DpAdaptError, match=message):
        preview(env, token, prompts)


def _bad_file(env, kind):
    """An embedding file that ComfyUI would skip with only a console warning."""
    from comfyui_dp_adapt.dp.embedding_file import save_embedding

    name = f"bad_{kind}_{uuid.uuid4().hex[:8]}"
    folder = env["embeddings"]
    width = env["clip"].cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
    if kind == "sdxl":  # an SDXL token on an SD1 CLIP
        tensors = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
        save_embedding(folder, name, tensors, {}, overwrite=False)
    elif kind == "width":
        save_embedding(folder, name, {"emb_params": torch.zeros(1, width + 1)}, {}, overwrite=False)
    elif kind == "junk":
        (folder / f"{name}.safetensors").write_bytes(b"not a safetensors file at all")
    elif kind == "pickle":
        (folder / f"{name}.pt").write_bytes(b"\x80\x04N.")
    return f"embedding:{name}"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no embedding file named 'bad_missing_"),
        (
            "sdxl",
            r"does not fit this CLIP: it needs emb_params \(k, \d+\), the file holds clip_g \(1, 1280\), clip_l",
        ),
        ("width", "does not fit this CLIP"),
        ("junk", "is not a readable safetensors embedding"),
        ("pickle", "is not a .safetensors file"),
    ],
)
def test_a_token_file_that_would_be_skipped_silently_is_refused_by_name(env, kind, message):
    from comfyui_dp_adapt.nodes.style_prompt import DPStylePromptNode

    token = _bad_file(env, kind) if kind != "missing" else f"embedding:bad_missing_{uuid.uuid4()}"
    with pytest.raises(DpAdaptError, match=message):
        preview(env, token, PROMPTS)
    with pytest.raises(DpAdaptError, match=message), torch.inference_mode():
        DPStylePromptNode().encode(env["clip"], token, "a boat, {token}")


def test_the_style_prompt_encodes_a_fitting_token(env):
    from comfyui_dp_adapt.nodes.style_prompt import DPStylePromptNode

    with torch.inference_mode():
        conditioning, prompt = DPStylePromptNode().encode(env["clip"], env["tokens"][0], "{token}")
        other, _ = DPStylePromptNode().encode(env["clip"], env["tokens"][1], "{token}")
    assert prompt == env["tokens"][0]
    assert not torch.equal(conditioning[0][0], other[0][0]), "the token changes the conditioning"


@pytest.mark.parametrize("cfg", [float("nan"), -1.0, 31.0])
def test_cfg_is_validated(env, cfg):
    with pytest.raises(DpAdaptError, match="cfg must be a number from 0 to 30"):
        with torch.inference_mode():
            env["node"].preview(
                env["model"], env["clip"], env["vae"], env["tokens"][0], PROMPTS, "", SIDE,
                SIDE, 0, 2, cfg, "euler", "normal",
            )  # fmt: skip
