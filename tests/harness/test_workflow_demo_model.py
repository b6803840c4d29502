"""The demo model in a real ComfyUI server: it samples through the executor and the positive
control holds (a named training style is drawn and recognised >= 80%, fixed seeds).

Test order matters here: the shared server must not start before the in-process harness
tests (test_instantiation) import the same ComfyUI copy, so this file sorts after them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dp_adapt.demo import evaluation, world
from comfyui_dp_adapt.demo.style_classifier import load_style_classifier

CONTROL_SEED = 20261201
PROMPTS_PER_STYLE = 4
PICTURES_PER_PROMPT = 6


def _control_prompt() -> tuple[dict, dict[str, str]]:
    """An API prompt: the demo loader, then per training style KSampler -> VAE Decode -> Save."""
    prompt: dict = {
        "model": {"class_type": "DPAdaptDemoModel", "inputs": {}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["model", 1], "text": ""}},
        "latent": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": PICTURES_PER_PROMPT},
        },
    }
    prefixes = {}
    for s, style in enumerate(world.TRAINING_STYLES):
        prompts = evaluation.subject_prompts(
            "{} in the style of " + style, CONTROL_SEED + s, count=PROMPTS_PER_STYLE
        )
        for p, text in enumerate(prompts):
            key = f"{style}_{p}"
            prefixes[key] = style
            prompt[f"text_{key}"] = {
                "class_type": "CLIPTextEncode",
                "inputs": {"clip": ["model", 1], "text": text},
            }
            prompt[f"sample_{key}"] = {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["model", 0],
                    "positive": [f"text_{key}", 0],
                    "negative": ["negative", 0],
                    "latent_image": ["latent", 0],
                    "seed": CONTROL_SEED + p,
                    "steps": evaluation.SAMPLE_STEPS,
                    "cfg": evaluation.CFG,
                    "sampler_name": evaluation.SAMPLER,
                    "scheduler": evaluation.SCHEDULER,
                    "denoise": 1.0,
                },
            }
            prompt[f"decode_{key}"] = {
                "class_type": "VAEDecode",
                "inputs": {"samples": [f"sample_{key}", 0], "vae": ["model", 2]},
            }
            prompt[f"save_{key}"] = {
                "class_type": "SaveImage",
                "inputs": {"images": [f"decode_{key}", 0], "filename_prefix": f"control_{key}"},
            }
    return prompt, prefixes


@pytest.mark.comfy_server
def test_positive_control_through_the_executor(comfy_server):
    """Pictures generated in a real ComfyUI for captions naming each training style are
    classified as that style >= 80% of the time (fixed seeds)."""
    prompt, prefixes = _control_prompt()
    comfy_server.run_prompt(prompt)
    classifier = load_style_classifier()
    per_style: dict[str, list[bool]] = {style: [] for style in world.TRAINING_STYLES}
    for key, style in prefixes.items():
        files = sorted(comfy_server.output_dir.glob(f"control_{key}_*.png"))
        assert len(files) == PICTURES_PER_PROMPT
        pictures = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        assert pictures.shape[1:] == (64, 64, 3)
        images = torch.from_numpy(pictures).float() / 255
        predicted = classifier.predict(images)
        per_style[style] += (predicted == world.STYLES.index(style)).tolist()
    accuracy = {style: float(np.mean(hits)) for style, hits in per_style.items()}
    assert float(np.mean(list(accuracy.values()))) >= 0.8, accuracy
