"""The shipped demo CLIP vision tower sees the demo world's styles.

DP universal guidance steers towards a (noisy) mean CLIP image embedding, so it can only work
if the vision tower's embeddings carry the style. A linear probe on its embeddings of clean
renders is the check: if it fails, no guidance setting can help.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_dp_adapt.demo import world

PROBE_SEED = 20261214
TRAIN_PER_STYLE = 40
TEST_PER_STYLE = 20
RIDGE = 1e-3


def _renders(style: str, count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, world.STYLES.index(style)])
    specs = world.sample_specs(rng, count, styles=(style,))
    return torch.from_numpy(world.render_batch(specs, rng)).float() / 255


@pytest.fixture(scope="module")
def embeddings(comfy):
    """Unit-norm CLIP image embeddings (train, test) of clean renders, per style."""
    from comfyui_dp_adapt.nodes import comfy_compat, demo_model

    _, _, _, vision = demo_model.load_demo_model()
    out = {}
    with torch.inference_mode():
        for split, count, seed in (
            ("train", TRAIN_PER_STYLE, PROBE_SEED),
            ("test", TEST_PER_STYLE, PROBE_SEED + 1),
        ):
            for style in world.STYLES:
                embeds = comfy_compat.clip_vision_encode(vision, _renders(style, count, seed))
                unit = torch.nn.functional.normalize(embeds.double(), dim=1)
                out[split, style] = unit.clone()
    return out


def _stack(embeddings, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.cat([embeddings[split, s] for s in world.STYLES])
    labels = torch.cat(
        [torch.full((len(embeddings[split, s]),), i) for i, s in enumerate(world.STYLES)]
    )
    return features, labels


def test_a_linear_probe_on_the_demo_clip_tower_separates_the_six_styles(embeddings):
    train_x, train_y = _stack(embeddings, "train")
    test_x, test_y = _stack(embeddings, "test")
    design = torch.cat([train_x, torch.ones(len(train_x), 1, dtype=train_x.dtype)], dim=1)
    onehot = torch.nn.functional.one_hot(train_y, len(world.STYLES)).double()
    # Ridge least squares onto one-hot labels: a linear classifier in closed form.
    gram = design.T @ design + RIDGE * torch.eye(design.shape[1], dtype=design.dtype)
    weights = torch.linalg.solve(gram, design.T @ onehot)
    test_design = torch.cat([test_x, torch.ones(len(test_x), 1, dtype=test_x.dtype)], dim=1)
    accuracy = float(((test_design @ weights).argmax(dim=1) == test_y).double().mean())
    assert accuracy >= 0.9, f"held-out probe accuracy {accuracy:.3f}"


def test_held_out_renders_sit_closest_to_their_own_styles_mean_embedding(embeddings):
    """What guidance relies on: a style's mean embedding is nearer its own pictures."""
    means = torch.stack(
        [torch.nn.functional.normalize(embeddings["train", s].mean(0), dim=0) for s in world.STYLES]
    )
    for index, style in enumerate(world.STYLES):
        cosines = (embeddings["test", style] @ means.T).mean(dim=0)
        assert int(cosines.argmax()) == index, f"{style}: mean cosines {cosines.tolist()}"
