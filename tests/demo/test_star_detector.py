"""The hand-written star detector (the content measure of the held-out subject)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_dp_adapt.demo import star_detector, world
from comfyui_dp_adapt.demo.style_classifier import augment

SEED = 20261203


@pytest.mark.parametrize("subject", world.TRAINING_SUBJECTS)
def test_detector_calls_stars_stars_in_every_style_and_no_other_subject(subject):
    rng = np.random.default_rng([SEED, world.TRAINING_SUBJECTS.index(subject)])
    specs = world.sample_specs(rng, 120, subjects=(subject,))  # all six styles
    images = torch.from_numpy(world.render_batch(specs, rng)).float() / 255
    perturbed = augment(images, torch.Generator().manual_seed(SEED))
    for label, batch in (("clean", images), ("perturbed", perturbed)):
        fraction = star_detector.star_fraction(batch)
        if subject == world.HELD_OUT_SUBJECT:
            assert fraction >= 0.9, f"{label} stars: {fraction:.2f}"
        else:
            assert fraction <= 0.1, f"{label} {subject}s called stars: {fraction:.2f}"


def test_no_subject_is_no_star():
    blank = torch.full((1, 64, 64, 3), 0.97)
    assert star_detector.star_fraction(blank) == 0.0
