"""The shipped demo model's files and its style classifier (the executor and positive-control
test is tests/harness/test_workflow_demo_model.py)."""

from __future__ import annotations

import numpy as np
import torch

from comfyui_dp_adapt.demo import world
from comfyui_dp_adapt.demo.style_classifier import load_style_classifier
from comfyui_dp_adapt.tests.support.pack import PACK_ROOT

WEIGHTS = PACK_ROOT / "demo" / "weights"
CONTROL_SEED = 20261201


def test_shipped_weights_are_safetensors_within_20_mb():
    files = sorted(WEIGHTS.glob("*"))
    files = [f for f in files if f.is_file()]
    assert {f.name for f in files} >= {
        "dp_adapt_demo.safetensors",
        "style_classifier.safetensors",
        "training_record.json",
    }
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert all(f.read_bytes()[:8] != b"\x80\x02\x8a\x0a" for f in weights)  # no pickle
    assert sum(f.stat().st_size for f in weights) <= 20_000_000


def test_style_classifier_recognises_fresh_renders_of_every_style():
    classifier = load_style_classifier()
    rng = np.random.default_rng(CONTROL_SEED)
    specs = world.sample_specs(rng, 300)
    images = torch.from_numpy(world.render_batch(specs, rng)).float() / 255
    truth = torch.tensor([world.STYLES.index(s.style) for s in specs])
    assert (classifier.predict(images) == truth).float().mean() >= 0.95
