"""The "DP Style Prompt" node: a prompt that uses the style token a DP node just released.

It exists so that changing the prompt never re-runs (and re-spends) the training node: the
token arrives as an input and only this cheap node re-executes when the text changes.
"""

from __future__ import annotations

TOKEN_FIELD = "{token}"


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

        check_token(token)
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

    if not token.startswith("embedding:") or len(token) <= len("embedding:"):
        raise InvalidParameterError(f"token must look like 'embedding:NAME', got token={token!r}.")
    return token


NODE_CLASS_MAPPINGS = {"DPAdaptStylePrompt": DPStylePromptNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptStylePrompt": "DP Style Prompt"}
