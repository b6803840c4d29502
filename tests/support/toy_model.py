"""A small differentiable stand-in for a text encoder and a denoiser, for trainer tests.

The toy "text encoder" mixes the placeholder vectors into every position and the toy
"denoiser" is a nonlinear function of latents, context, timestep and noise, so gradients
really flow through both; the real ComfyUI models are covered in tests/nodes.
"""

from __future__ import annotations

import torch

from comfyui_dp_adapt.dp.inversion import PromptTokens

K, D, L, CTX = 2, 8, 6, 8


def toy_prompts(templates: int = 3) -> PromptTokens:
    ids = torch.arange(templates * L).reshape(templates, L) % 11
    mask = torch.zeros(templates, L, dtype=torch.bool)
    mask[:, 2 : 2 + K] = True
    return PromptTokens(ids=ids, mask=mask)


def toy_model(seed: int = 0):
    """``(text_forward, denoise_loss, calls)``; ``calls["rows"]`` logs each pass's rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(11, D, generator=g)
    mix = torch.randn(D, CTX, generator=g) / D**0.5
    proj = torch.randn(CTX, 4, generator=g) / CTX**0.5
    calls = {"rows": []}

    def text_forward(ids, mask, vectors):
        x = table[ids].masked_scatter(mask.unsqueeze(-1), vectors)
        return torch.tanh(x @ mix)

    def denoise_loss(latents, context, timesteps, noise):
        calls["rows"].append(latents.shape[0])
        pooled = context.mean(dim=1) @ proj  # (B, 4)
        scale = (timesteps / 1000.0).view(-1, 1, 1, 1)
        pred = torch.sin(latents * pooled.view(-1, 4, 1, 1)) + scale * noise
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3))

    return text_forward, denoise_loss, calls
