"""The style classifier that measures style fidelity in the demo world.

A small CNN trained on renders of ``demo.world`` with augmentations that mimic generated
pictures (tinted backgrounds, pixel noise, blur, colour and brightness shifts), because a
classifier trained on clean renders misreads slightly noisy samples. It names one of
``world.STYLES`` per picture and gives a feature vector (its penultimate layer) for the
feature-space similarity of the reproduction bench.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from . import world

FEATURES = 64


class StyleClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(64, FEATURES, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, len(world.STYLES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of (N, H, W, 3) pictures in [0, 1] (ComfyUI's IMAGE layout)."""
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        if x.shape[-1] != world.IMAGE_SIZE or x.shape[-2] != world.IMAGE_SIZE:
            x = nn.functional.interpolate(
                x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="bilinear", antialias=True
            )
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Index into ``world.STYLES`` of each picture."""
        self.eval()
        return torch.cat(
            [self(images[i : i + batch]).argmax(dim=1) for i in range(0, len(images), batch)]
        )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturbations generated pictures show: tint, noise, blur, brightness (N, H, W, 3)."""
    n = images.shape[0]

    def uniform(low, high, *shape):
        return torch.rand((n, *shape), generator=generator) * (high - low) + low

    x = images.permute(0, 3, 1, 2)
    x = x * uniform(0.8, 1.15, 1, 1, 1) + uniform(-0.08, 0.08, 3, 1, 1)
    blur = uniform(0, 1, 1, 1, 1) < 0.4
    smooth = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = torch.where(blur, 0.5 * x + 0.5 * smooth, x)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, 0.08, 1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def train_style_classifier(
    seed: int, steps: int = 1500, batch: int = 64, log=print
) -> tuple[StyleClassifier, dict]:
    """Train on fresh augmented renders; report accuracy on held-out clean and augmented ones."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed)
    classifier = StyleClassifier()
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    start = time.monotonic()
    for step in range(steps):
        specs = world.sample_specs(rng, batch)
        images = torch.from_numpy(world.render_batch(specs, rng)).float() / 255
        labels = torch.tensor([world.STYLES.index(s.style) for s in specs])
        classifier.train()
        loss = nn.functional.cross_entropy(classifier(augment(images, generator)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            log(f"  classifier step {step + 1}/{steps} loss {loss.item():.3f}")
    test_rng = np.random.default_rng([seed, 2])
    specs = world.sample_specs(test_rng, 1200)
    images = torch.from_numpy(world.render_batch(specs, test_rng)).float() / 255
    labels = torch.tensor([world.STYLES.index(s.style) for s in specs])
    clean = (classifier.predict(images) == labels).float().mean().item()
    augmented = (classifier.predict(augment(images, generator)) == labels).float().mean().item()
    metrics = {
        "held_out_clean_accuracy": clean,
        "held_out_augmented_accuracy": augmented,
        "test_images": len(specs),
        "steps": steps,
        "seconds": round(time.monotonic() - start, 1),
    }
    return classifier, metrics


def classifier_path():
    from pathlib import Path

    return Path(__file__).resolve().parent / "weights" / "style_classifier.safetensors"


def load_style_classifier(path=None) -> StyleClassifier:
    """The shipped (or given) trained classifier, in eval mode."""
    from safetensors.torch import load_file

    classifier = StyleClassifier()
    classifier.load_state_dict(load_file(str(path or classifier_path())))
    return classifier.eval()
