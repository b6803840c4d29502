"""The hand-written dot detector (the second fidelity measure) and the world's held-out words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_dp_adapt.demo import dot_detector, world
from comfyui_dp_adapt.demo.style_classifier import augment

SEED = 20261203


def _renders(style: str, count: int = 120) -> torch.Tensor:
    rng = np.random.default_rng([SEED, world.STYLES.index(style)])
    specs = world.sample_specs(rng, count, styles=(style,), subjects=world.TRAINING_SUBJECTS)
    return torch.from_numpy(world.render_batch(specs, rng)).float() / 255


@pytest.mark.parametrize("style", world.STYLES)
def test_detector_calls_dotted_renders_dotted_and_no_other_style(style):
    images = _renders(style)
    perturbed = augment(images, torch.Generator().manual_seed(SEED))  # as generated pictures
    for label, batch in (("clean", images), ("perturbed", perturbed)):
        fraction = dot_detector.dotted_fraction(batch)
        if style == world.HELD_OUT_STYLE:
            assert fraction >= 0.9, f"{label} dotted renders: {fraction:.2f}"
        else:
            assert fraction <= 0.1, f"{label} {style} renders called dotted: {fraction:.2f}"


def test_detector_sees_no_dots_on_a_blank_or_noisy_picture():
    blank = torch.full((1, 64, 64, 3), 0.97)
    noise = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(SEED))
    assert dot_detector.dotted_fraction(torch.cat([blank, noise])) == 0.0


def test_held_out_words_are_single_tokens_of_the_bundled_tokenizer(comfy):
    """The training script erases each held-out word's one row of the token embedding."""
    from comfyui_dp_adapt.nodes import inversion_model, tiny_models

    clip = tiny_models.build_tiny_clip(seed=0)
    tok = inversion_model.tokenizers(clip, inversion_model.SD1)[0]
    for word in world.ERASED_WORDS:
        assert len(tok.tokenizer(word)["input_ids"]) == 3, word  # start, the word, end
