"""The "DP Style Prompt" node: a prompt that uses the style token a DP node just released.

It exists so that changing the prompt never re-runs (and re-spends) the training node: the
token arrives as an input and only this cheap node re-executes when the text changes.
"""

from __future__ import annotations

from pathlib import Path

TOKEN_FIELD = "{token}"
TOKEN_PREFIX = "embedding:"
# Text encoders a CLIP may hold, in ComfyUI's attribute names (SD1: L, SD2: H, SDXL: L + G).
ENCODERS = ("clip_l", "clip_h", "clip_g")
SINGLE_ENCODER_KEY = "emb_params"


class DPStylePromptNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "prompt")
    OUTPUT_TOOLTIPS = ("Text conditioning for a sampler.", "The prompt with the token filled in.")
    FUNCTION = "encode"
    DESCRIPTION = "Writes the DP style token into your prompt where {token} stands and encodes it."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": (
                    "CLIP",
                    {"tooltip": "The CLIP of the checkpoint the token was trained on."},
                ),
                "token": (
                    "STRING",
                    {
                        "default": "embedding:dp_style",
                        # Not forceInput: typing the name of a token saved earlier is a real use.
                        "tooltip": "embedding:NAME: link it from DP Textual Inversion Train (so the "
                        "prompt runs after the token is saved) or type the name of a token saved "
                        "earlier.",
                    },
                ),
                "text": (
                    "STRING",
                    {
                        "default": "a lighthouse on a cliff at dusk, in the style of {token}",
                        "multiline": True,
                        # The frontend's "dynamic prompts" would read {token} as a choice
                        # among {a|b} alternatives and send the word "token" instead.
                        "dynamicPrompts": False,
                        "tooltip": "Your prompt; {token} is replaced by the style token.",
                    },
                ),
            }
        }

    def encode(self, clip, token, text):
        import nodes as comfy_nodes

        from ..dp.errors import InvalidParameterError

        check_token_file(clip, token)
        if TOKEN_FIELD not in text:
            raise InvalidParameterError(
                f"the prompt text has no {TOKEN_FIELD} field to put the style token in; add "
                f"{TOKEN_FIELD} where the style should apply, e.g. 'a castle in the style of {TOKEN_FIELD}'."
            )
        prompt = text.replace(TOKEN_FIELD, token)
        conditioning = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        return (conditioning, prompt)


def check_token(token: str) -> str:
    """A token reference as DP Textual Inversion Train returns it: ``embedding:NAME``."""
    from ..dp.errors import InvalidParameterError

    if not token.startswith(TOKEN_PREFIX) or len(token) <= len(TOKEN_PREFIX):
        raise InvalidParameterError(f"token must look like 'embedding:NAME', got token={token!r}.")
    return token


def check_token_file(clip, token: str) -> Path:
    """The token's embedding file, checked against ``clip`` before anything is generated.

    ComfyUI renders a prompt whose embedding is missing or does not fit its text encoders
    without the token, with only a console warning: a preview would then silently show the
    model's default style. Refused here by name: a missing file, a file that is not
    safetensors (the pack never unpickles), junk, keys of another model family, or a width
    other than the encoders'.
    """
    from ..dp.embedding_file import read_embedding
    from ..dp.errors import InvalidParameterError

    name = check_token(token)[len(TOKEN_PREFIX) :].strip()
    directories = _embedding_directories(clip)
    path = _find_embedding(name, directories)
    if path is None:
        shown = ", ".join(str(d) for d in directories) or "none configured"
        raise InvalidParameterError(
            f"no embedding file named {name!r} in the embeddings folder ({shown}): train it "
            "with DP Textual Inversion Train, or correct the name."
        )
    if path.suffix.lower() != ".safetensors":
        raise InvalidParameterError(
            f"{path.name} is not a .safetensors file; DP nodes read tokens only as safetensors "
            "(as DP Textual Inversion Train saves them), never by unpickling."
        )
    try:
        tensors, _ = read_embedding(path)
    except Exception as error:
        raise InvalidParameterError(
            f"{path.name} is not a readable safetensors embedding ({type(error).__name__})."
        ) from None
    expected = _expected_parts(clip)
    keys = [SINGLE_ENCODER_KEY] if len(expected) == 1 else list(expected)
    wanted = ", ".join(f"{k} (k, {w})" for k, w in zip(keys, expected.values(), strict=True))
    for key, width in zip(keys, expected.values(), strict=True):
        tensor = tensors.get(key)
        if tensor is None and len(tensors) == 1 and len(keys) == 1:
            (tensor,) = tensors.values()  # ComfyUI reads a lone tensor under any key
        if tensor is None or tensor.dim() not in (1, 2) or tensor.shape[-1] != width:
            found = ", ".join(f"{k} {tuple(t.shape)}" for k, t in tensors.items()) or "nothing"
            raise InvalidParameterError(
                f"{path.name} does not fit this CLIP: it needs {wanted}, the file holds "
                f"{found}. Was the token trained on another model family?"
            )
        if not bool(tensor.float().isfinite().all()):
            raise InvalidParameterError(f"{path.name} holds NaN or infinite values.")
    return path


def _embedding_directories(clip) -> list[Path]:
    """Where ComfyUI's tokenizer looks for ``embedding:NAME``: its own directory setting,
    else the embeddings folders."""
    from . import comfy_compat

    for encoder in ENCODERS:
        tokenizer = getattr(clip.tokenizer, encoder, None)
        found = getattr(tokenizer, "embedding_directory", None)
        if found:
            return [Path(d) for d in ([found] if isinstance(found, (str, Path)) else found)]
    return comfy_compat.embeddings_directories()


def _find_embedding(name: str, directories: list[Path]) -> Path | None:
    """``name`` (with or without its extension) inside one of ``directories``, never outside."""
    for directory in directories:
        base = directory.resolve()
        for candidate in (name, *(name + ext for ext in (".safetensors", ".pt", ".bin"))):
            path = (base / candidate).resolve()
            if base in path.parents and path.is_file():
                return path
    return None


def _expected_parts(clip) -> dict[str, int]:
    """Each text encoder of ``clip`` and the width of its token embeddings."""
    encoders = {e: getattr(clip.cond_stage_model, e, None) for e in ENCODERS}
    return {
        name: int(encoder.transformer.get_input_embeddings().weight.shape[1])
        for name, encoder in encoders.items()
        if encoder is not None
    }


NODE_CLASS_MAPPINGS = {"DPAdaptStylePrompt": DPStylePromptNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptStylePrompt": "DP Style Prompt"}
