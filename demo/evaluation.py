"""Measuring the demo world: pictures generated through ComfyUI's KSampler, and their style.

Used by the demo model's training (the positive control), the reproduction bench and the
tests. Sampling settings are fixed here so every measurement is comparable: 20 euler steps,
normal schedule, CFG 3, 64 x 64 pictures (8 x 8 latents), empty negative prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world

CFG = 3.0
SAMPLER = "euler"
SCHEDULER = "normal"
SAMPLE_STEPS = 20
LATENT_SIDE = world.IMAGE_SIZE // 8
CONTROL_PER_STYLE = 24
SUBJECT_PROMPTS = 6  # prompts per measurement, each with ``per_prompt`` pictures


def conditioning(clip, text: str):
    """CONDITIONING for ``text``, exactly as CLIP Text Encode makes it."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@torch.inference_mode()
def generate(
    model, clip, vae, prompts: list[str], *, per_prompt: int, seed: int, cfg: float = CFG
) -> torch.Tensor:
    """IMAGE (N, 64, 64, 3) in [0, 1]: ``per_prompt`` pictures for each prompt, in order;
    prompt i is sampled from ``seed + i``."""
    import nodes as comfy_nodes

    negative = conditioning(clip, "")
    out = []
    for index, prompt in enumerate(prompts):
        latent = {"samples": torch.zeros((per_prompt, 4, LATENT_SIDE, LATENT_SIDE))}
        (samples,) = comfy_nodes.common_ksampler(
            model,
            seed + index,
            SAMPLE_STEPS,
            cfg,
            SAMPLER,
            SCHEDULER,
            conditioning(clip, prompt),
            negative,
            latent,
        )
        out.append(vae.decode(samples["samples"]).float().clone())
    return torch.cat(out)


def subject_prompts(template: str, seed: int, count: int = SUBJECT_PROMPTS) -> list[str]:
    """``count`` prompts "a {colour} {subject} <template rest>" over the world's subjects and
    colours (drawn from ``seed``); ``template`` holds "{}" for the subject phrase."""
    rng = np.random.default_rng(seed)
    colours = tuple(world.COLOURS)
    prompts = []
    for index in range(count):
        subject = world.SUBJECTS[index % len(world.SUBJECTS)]
        colour = colours[int(rng.integers(len(colours)))]
        prompts.append(template.format(f"a {colour} {subject}"))
    return prompts


def style_fraction(classifier, images: torch.Tensor, style: str) -> float:
    """Fraction of ``images`` the style classifier calls ``style``."""
    predicted = classifier.predict(images)
    return float((predicted == world.STYLES.index(style)).float().mean())


def style_counts(classifier, images: torch.Tensor) -> dict[str, int]:
    predicted = classifier.predict(images).tolist()
    return {s: predicted.count(i) for i, s in enumerate(world.STYLES) if predicted.count(i)}


@torch.no_grad()
def feature_similarity(classifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine similarity of the mean classifier features of ``images`` and ``reference``."""
    classifier.eval()
    a = classifier.features(images).mean(dim=0)
    b = classifier.features(reference).mean(dim=0)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def positive_control(
    model, clip, vae, classifier, *, seed: int, per_style: int = CONTROL_PER_STYLE
):
    """Fraction of pictures generated for captions naming a training style that the style
    classifier calls that style (mean over the training styles), with its confusion."""
    per_style_accuracy, confusion = {}, {}
    for offset, style in enumerate(world.TRAINING_STYLES):
        prompts = subject_prompts("{} in the style of " + style, seed + 1000 * offset)
        images = generate(
            model, clip, vae, prompts, per_prompt=per_style // len(prompts), seed=seed
        )
        per_style_accuracy[style] = round(style_fraction(classifier, images, style), 3)
        confusion[style] = style_counts(classifier, images)
    accuracy = float(np.mean(list(per_style_accuracy.values())))
    return {"accuracy": round(accuracy, 4), "per_style": per_style_accuracy, "confusion": confusion}
