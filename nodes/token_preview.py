"""The "DP Style Token Preview" node: a contact sheet of a released style token across subjects.

Generating from a released token is post-processing of a DP output, so it spends no privacy
budget (Dwork & Roth 2014, Prop. 2.1). The node never sees a private image: its inputs are the
checkpoint, the token name a DP node returned and the user's prompts.
"""

from __future__ import annotations

import math

from .style_prompt import TOKEN_FIELD, check_token, check_token_file

DEFAULT_PROMPTS = "\n".join(
    (
        "a lighthouse on a cliff, in the style of {token}",
        "a portrait of an old fisherman, in the style of {token}",
        "a bowl of fruit on a table, in the style of {token}",
        "a city street at night, in the style of {token}",
    )
)
MAX_PROMPTS = 16
# Small pictures (the demo model's 64 px) are shown enlarged, by whole pixels (nearest
# neighbour: no new colours, a 4-px dot pattern stays a dot pattern) so that each cell is at
# least this wide at 100 % zoom.
DISPLAY_MIN_CELL = 256
MAX_CFG = 30.0


class StyleTokenPreviewNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One picture per prompt, tiled into a single image.",)
    FUNCTION = "preview"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "After a release: one picture per prompt with the new style token, tiled into one grid, "
        f"to see whether the style carries across subjects (pictures under {DISPLAY_MIN_CELL} "
        "px are shown enlarged, pixel for pixel). Post-processing of the released "
        "token: it reads no private image and spends no privacy budget."
    )

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint the token was trained on."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP."}),
                "vae": ("VAE", {"tooltip": "Its VAE."}),
                "token": (
                    "STRING",
                    {
                        "default": "embedding:dp_style",
                        "tooltip": "embedding:NAME, linked from DP Textual Inversion Train or typed.",
                    },
                ),
                "prompts": (
                    "STRING",
                    {
                        "default": DEFAULT_PROMPTS,
                        "multiline": True,
                        "dynamicPrompts": False,
                        "tooltip": f"One prompt per line (at most {MAX_PROMPTS}); {TOKEN_FIELD} "
                        "is replaced by the token.",
                    },
                ),
                "negative": (
                    "STRING",
                    {
                        "default": "blurry, low quality",
                        "tooltip": "Negative prompt for every picture.",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "Picture width.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "Picture height.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seed of the first picture; picture i uses seed + i. Only the "
                        "pictures' own noise: the token's DP noise came from OS entropy.",
                    },
                ),
                "steps": (
                    "INT",
                    {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps."},
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.0,
                        "min": 0.0,
                        "max": MAX_CFG,
                        "step": 0.1,
                        "tooltip": "Classifier-free guidance scale.",
                    },
                ),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Scheduler."}),
            }
        }

    def preview(
        self,
        model,
        clip,
        vae,
        token,
        prompts,
        negative,
        width,
        height,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
    ):
        import nodes as comfy_nodes
        import torch

        from ..dp.errors import InvalidParameterError

        texts = preview_prompts(prompts, token)
        check_token_file(clip, token)
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG:
            raise InvalidParameterError(
                f"cfg must be a number from 0 to {MAX_CFG:g}, got cfg={cfg!r}."
            )
        negative_conditioning = comfy_nodes.CLIPTextEncode().encode(clip, negative)[0]
        (latent,) = comfy_nodes.EmptyLatentImage().generate(width, height, 1)
        pictures = []
        for index, text in enumerate(texts):
            positive = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
            (samples,) = comfy_nodes.common_ksampler(
                model,
                seed + index,
                steps,
                cfg,
                sampler_name,
                scheduler,
                positive,
                negative_conditioning,
                latent,
            )
            pictures.append(vae.decode(samples["samples"]).float().clone())
        grid = enlarge_for_display(tile(torch.cat(pictures)), cell=max(height, width))
        listing = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
        return {
            "ui": {"text": [f"preview of {token} (post-processing, no budget):\n{listing}"]},
            "result": (grid,),
        }


def preview_prompts(prompts: str, token: str) -> list[str]:
    """The non-empty lines of ``prompts`` with the token filled in; clear errors otherwise."""
    from ..dp.errors import InvalidParameterError

    check_token(token)
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise InvalidParameterError("prompts is empty: write one prompt per line.")
    if len(lines) > MAX_PROMPTS:
        raise InvalidParameterError(
            f"prompts has {len(lines)} lines; at most {MAX_PROMPTS} fit in one preview grid."
        )
    without = [line for line in lines if TOKEN_FIELD not in line]
    if without:
        raise InvalidParameterError(
            f"every prompt needs {TOKEN_FIELD} where the style token goes; these have none: "
            + "; ".join(repr(line) for line in without)
        )
    return [line.replace(TOKEN_FIELD, token) for line in lines]


def enlarge_for_display(grid, *, cell: int):
    """``grid`` (1, H, W, C) enlarged by the whole factor that makes a ``cell``-pixel picture
    at least DISPLAY_MIN_CELL pixels (factor 1 for pictures that already are)."""
    factor = max(1, math.ceil(DISPLAY_MIN_CELL / cell))
    if factor == 1:
        return grid
    return grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def tile(pictures):
    """(N, H, W, C) pictures as one (1, rows*H, cols*W, C) grid, row by row, near-square;
    empty cells are white."""
    import torch

    count, height, width, channels = pictures.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.ones((rows * height, columns * width, channels), dtype=pictures.dtype)
    for index in range(count):
        r, c = divmod(index, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = pictures[index]
    return grid.unsqueeze(0)


NODE_CLASS_MAPPINGS = {"DPAdaptStyleTokenPreview": StyleTokenPreviewNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptStyleTokenPreview": "DP Style Token Preview"}
