"""ComfyUI's MODEL / CLIP / VAE turned into the callables ``dp.inversion`` trains through.

It relies on facts checked on both supported ComfyUI copies (and pinned by the tests in
tests/nodes/test_inversion_model.py): every node runs under ``torch.inference_mode()`` and
loader weights are inference tensors, so training needs normal clones; the CLIP text
transformer's pieces can be run directly with injected vectors and equal
``encode_from_tokens``; ``apply_model`` returns the denoised prediction in the sigma
parametrisation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..dp.autograd_alias import autograd_alias
from ..dp.errors import InvalidParameterError
from ..dp.inversion import PromptTokens
from ..dp.templates import split_template
from . import comfy_compat
from .lean_training import saved_tensor_clones

PROBE_SEED = 20241122  # public: the probe's latent and noise are not private


class UnsupportedModelError(InvalidParameterError):
    """The checkpoint's family has no textual-inversion support here."""


@dataclass(frozen=True)
class ModelFamily:
    """What differs between supported checkpoint families (docs/privacy.md §3.4).

    A token lives in every text encoder of the family: its vectors are the concatenation of
    one vector per encoder, in the order ComfyUI concatenates the encoders' outputs into the
    UNet's context (SDXL: CLIP-L 768 then OpenCLIP-G 1280, so d = 2048)."""

    name: str
    encoders: tuple[str, ...]  # attributes of the CLIP's cond_stage_model / tokenizer
    file_keys: tuple[str, ...]  # key of each encoder's part in the saved .safetensors
    pooled_encoder: str | None = None  # its pooled output conditions the UNet (SDXL's ADM)


SD1 = ModelFamily("SD1.x", ("clip_l",), ("emb_params",))
SD2 = ModelFamily("SD2.x", ("clip_h",), ("emb_params",))
# SDXL: keys clip_l / clip_g as ComfyUI's SDXL tokenizers and AUTOMATIC1111 read them.
SDXL = ModelFamily("SDXL", ("clip_l", "clip_g"), ("clip_l", "clip_g"), pooled_encoder="clip_g")
_FAMILIES = {
    "SD15": SD1,
    "SD20": SD2,
    "SDXL": SDXL,
    # Distilled SDXL models with SDXL's two text encoders and conditioning.
    "SSD1B": SDXL,
    "Segmind_Vega": SDXL,
    "KOALA_700M": SDXL,
    "KOALA_1B": SDXL,
}
_KNOWN_UNSUPPORTED = {
    "SDXLRefiner": "the SDXL refiner has only the OpenCLIP-G encoder and is not used for "
    "styles; train on the SDXL base model",
    "SDXL_instructpix2pix": "instruct-pix2pix models need an input image at every step",
}


def detect_family(model, clip) -> ModelFamily:
    """The family of the MODEL + CLIP pair, or a clear refusal."""
    config_name = type(model.model.model_config).__name__
    family = _FAMILIES.get(config_name)
    if family is None:
        reason = _KNOWN_UNSUPPORTED.get(
            config_name, "it is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint"
        )
        raise UnsupportedModelError(
            f"DP Textual Inversion cannot train for model family {config_name!r}: {reason}. "
            "Use an SD1.x, SD2.x or SDXL checkpoint."
        )
    missing = [name for name in family.encoders if not hasattr(clip.cond_stage_model, name)]
    if missing:
        raise UnsupportedModelError(
            f"the CLIP input does not match the {family.name} model (no "
            f"{' / '.join(missing)} text encoder); connect the CLIP output of the same "
            "checkpoint loader."
        )
    check_same_checkpoint(model, clip, family)
    return family


def check_same_checkpoint(model, clip, family: ModelFamily) -> None:
    """Refuse a MODEL and CLIP of different checkpoints before any work: the text encoders'
    output width (the sum of their widths, as ComfyUI concatenates them) must be the UNet's
    context width (``unet_config["context_dim"]``, set in both supported ComfyUI copies)."""
    context_dim = model.model.model_config.unet_config.get("context_dim")
    text_width = sum(encoder_widths(clip, family))
    if context_dim is not None and int(context_dim) != text_width:
        raise UnsupportedModelError(
            f"the MODEL and the CLIP come from different checkpoints: the CLIP's text encoder "
            f"gives vectors of width {text_width} but the MODEL's UNet reads context of width "
            f"{int(context_dim)}; connect the MODEL and CLIP outputs of the same checkpoint "
            "loader."
        )


def text_encoders(clip, family: ModelFamily) -> list:
    return [getattr(clip.cond_stage_model, name) for name in family.encoders]


def tokenizers(clip, family: ModelFamily) -> list:
    return [getattr(clip.tokenizer, name) for name in family.encoders]


def _embedding_table(encoder) -> torch.Tensor:
    return encoder.transformer.get_input_embeddings().weight


def encoder_widths(clip, family: ModelFamily) -> tuple[int, ...]:
    """Width of each encoder's token embeddings, in the family's order (they sum to d)."""
    return tuple(int(_embedding_table(e).shape[1]) for e in text_encoders(clip, family))


def split_token(token: torch.Tensor, clip, family: ModelFamily) -> dict[str, torch.Tensor]:
    """The saved file's tensors: the (k, d) token cut into each encoder's (k, width) part."""
    parts = torch.split(token, list(encoder_widths(clip, family)), dim=-1)
    return {key: part.contiguous() for key, part in zip(family.file_keys, parts, strict=True)}


@torch.no_grad()
def token_vectors(clip, family: ModelFamily, word: str) -> torch.Tensor:
    """Token embedding(s) (t, d) of a public word in every encoder, float32 on CPU."""
    parts = []
    for tok, encoder in zip(tokenizers(clip, family), text_encoders(clip, family), strict=True):
        ids = tok.tokenizer(word)["input_ids"][1:-1]
        if not ids:
            raise InvalidParameterError(
                f"initializer word {word!r} has no tokens; use a plain word like 'painting'."
            )
        table = _embedding_table(encoder)
        parts.append(table[torch.tensor(ids, device=table.device)].float().cpu().clone())
    if len({part.shape[0] for part in parts}) != 1:
        raise InvalidParameterError(
            f"initializer word {word!r} splits into different token counts in the "
            f"{family.name} text encoders; use a single plain word like 'painting'."
        )
    return torch.cat(parts, dim=1)


@torch.no_grad()
def mean_token_norms(clip, family: ModelFamily) -> tuple[float, ...]:
    """Mean L2 norm of each encoder's vocabulary embeddings: public target norms for
    docs/privacy.md §2.5, one per encoder part of a token vector."""
    return tuple(
        float(_embedding_table(e).float().norm(dim=1).mean()) for e in text_encoders(clip, family)
    )


def _pad_token(tok) -> int:
    if getattr(tok, "pad_with_end", True):
        return tok.end_token
    return getattr(tok, "pad_token", 0) or 0


def tokenize_templates(clip, family: ModelFamily, templates, num_vectors: int) -> PromptTokens:
    """Ids of every template with ``num_vectors`` placeholder slots where ``{}`` stands, as
    the family's first tokenizer pads them (``make_text_forward`` re-pads for the others:
    SDXL's tokenizers differ only in the padding token)."""
    tok = tokenizers(clip, family)[0]
    length = tok.max_length
    pad = _pad_token(tok)
    rows, masks = [], []
    for template in templates:
        before, after = split_template(template)
        words_before = tok.tokenizer(before)["input_ids"][1:-1] if before else []
        words_after = tok.tokenizer(after)["input_ids"][1:-1] if after else []
        # The placeholder slots hold the start token only as a stand-in; they are replaced.
        ids = [
            tok.start_token,
            *words_before,
            *([tok.start_token] * num_vectors),
            *words_after,
            tok.end_token,
        ]
        if len(ids) > length:
            raise InvalidParameterError(
                f"template {template!r} with {num_vectors} vectors exceeds {length} tokens."
            )
        mask = (
            [False] * (1 + len(words_before))
            + [True] * num_vectors
            + [False] * (len(ids) - 1 - len(words_before) - num_vectors)
        )
        rows.append(ids + [pad] * (length - len(ids)))
        masks.append(mask + [False] * (length - len(mask)))
    return PromptTokens(
        ids=torch.tensor(rows, dtype=torch.long), mask=torch.tensor(masks, dtype=torch.bool)
    )


def _repadded(ids: torch.Tensor, tok) -> torch.Tensor:
    """``ids`` with every position after the first end token set to ``tok``'s padding."""
    is_end = ids == tok.end_token
    after_end = (is_end.long().cumsum(dim=1) - is_end.long()) > 0
    return ids.masked_fill(after_end, _pad_token(tok))


def make_autograd_safe(module: torch.nn.Module) -> None:
    """Replace inference-mode parameters and buffers by normal tensors with the same values.

    Loader nodes create weights under ``torch.inference_mode()``; autograd refuses to save
    such tensors for backward even when they need no gradient. The replacements alias the
    same memory (``dp/autograd_alias.py``: no second copy of the model), so the model keeps
    working everywhere else.
    """
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    alias = autograd_alias(param)
                    sub._parameters[name] = torch.nn.Parameter(alias, requires_grad=False)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = autograd_alias(buffer)
        module.requires_grad_(False)


def _effective_layer(clip, encoder) -> tuple[str, int | None]:
    """Which hidden state the CLIP hands to the UNet, honouring "CLIP Set Last Layer"."""
    if getattr(clip, "layer_idx", None) is not None:
        return "hidden", clip.layer_idx
    layer, layer_idx = getattr(encoder, "options_default", (encoder.layer, encoder.layer_idx))[:2]
    return layer, layer_idx


def make_text_forward(clip, family: ModelFamily):
    """``TextForward`` running the family's CLIP text transformer(s) with injected vectors.

    The transformers' own pieces are run here (token + position embeddings, each layer's
    norms, attention projections and MLP, the final norm) with out-of-place residual adds, so
    a batch of different vectors trains in one pass on both ComfyUI copies; the output equals
    ``encode_from_tokens`` for the same tokens (tested). With several encoders (SDXL) each
    takes its own slice of the vectors and the outputs are concatenated as ComfyUI does; a
    family with a pooled conditioning returns ``(context, pooled)``, the pooled output of
    ``pooled_encoder`` (final norm at the end token, then the text projection).
    """
    widths = encoder_widths(clip, family)
    forwards = [
        _encoder_forward(clip, encoder, tok, pooled=name == family.pooled_encoder)
        for name, encoder, tok in zip(
            family.encoders, text_encoders(clip, family), tokenizers(clip, family), strict=True
        )
    ]

    def forward(ids: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor):
        contexts, pooled = [], None
        for encoder_forward, part in zip(
            forwards, torch.split(vectors, widths, dim=-1), strict=True
        ):
            context, encoder_pooled = encoder_forward(ids, mask, part)
            contexts.append(context)
            pooled = encoder_pooled if encoder_pooled is not None else pooled
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)
        return context if family.pooled_encoder is None else (context, pooled)

    return forward


def _encoder_forward(clip, encoder, tok, *, pooled: bool):
    transformer = encoder.transformer
    text_model = transformer.text_model
    make_autograd_safe(transformer)
    layers = list(text_model.encoder.layers)
    layer, layer_idx = _effective_layer(clip, encoder)
    stop = len(layers) if layer == "last" else (layer_idx % len(layers)) + 1
    final_norm = layer == "last" or getattr(encoder, "layer_norm_hidden_state", True)
    heads = layers[0].self_attn.heads
    # The pooled output always comes from the last layer (comfy/clip_model.py).
    depth = len(layers) if pooled else stop

    def forward(ids: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor):
        device = text_model.embeddings.position_embedding.weight.device
        ids, mask = _repadded(ids, tok).to(device), mask.to(device)
        tokens = text_model.embeddings.token_embedding(ids).float()
        x = tokens.masked_scatter(
            mask.unsqueeze(-1), vectors.to(device=device, dtype=torch.float32)
        )
        length = ids.shape[1]
        x = x + text_model.embeddings.position_embedding.weight[:length].to(torch.float32)
        causal = torch.full((length, length), float("-inf"), device=device).triu(1)
        hidden = None
        for index, block in enumerate(layers[:depth]):
            x = x + _attention(block.self_attn, block.layer_norm1(x), causal, heads)
            x = x + block.mlp(block.layer_norm2(x))
            if index == stop - 1:
                hidden = text_model.final_layer_norm(x) if final_norm else x
        if not pooled:
            return hidden.float(), None
        end = (ids == tok.end_token).int().argmax(dim=1)  # the first end token of each row
        last = text_model.final_layer_norm(x)
        pooled_output = transformer.text_projection(last[torch.arange(ids.shape[0]), end])
        return hidden.float(), pooled_output.float()

    return forward


def _attention(attn, x, mask, heads):
    b, length, width = x.shape
    q, k, v = (
        proj(x).view(b, length, heads, width // heads).transpose(1, 2)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    return attn.out_proj(out.transpose(1, 2).reshape(b, length, width))


CHECKPOINT_FROM_LATENT_POSITIONS = 2 * 64 * 64
"""Block checkpointing from this many latent positions per pass on (two 512 px images).
Measured on an SD1.5-sized UNet (results/bench_ti_sd15_*): at 2 x 512 px it cut the peak
memory from 8.5 to 6.1 GB (fused attention alone: 15.0 to 8.5 GB); at 2 x 256 px, where
activations are small next to the weights, it only cost time."""


def wants_checkpointing(latent_shape, images_per_batch: int) -> bool:
    """Whether a pass of ``images_per_batch`` latents of ``latent_shape`` (..., h, w) is large
    enough for block checkpointing to be worth its extra forward pass."""
    height, width = latent_shape[-2:]
    return images_per_batch * height * width >= CHECKPOINT_FROM_LATENT_POSITIONS


@contextmanager
def training_passes(model, *, checkpoint_blocks: bool = True, precision: str = "model"):
    """The ``DenoiseLoss`` to train with, inside memory-lean UNet passes (fused attention,
    block checkpointing where the ComfyUI copy allows; ``lean_training.py``), in
    ``precision`` (``training_precision.py``). Use it around the whole training loop:
    backward runs inside it too."""
    from .lean_training import lean_unet_passes
    from .training_precision import training_precision

    with (
        lean_unet_passes(model, checkpoint_blocks=checkpoint_blocks) as clone_saved,
        training_precision(precision, model.load_device),
        comfy_compat.cancel_checks(model.model.diffusion_model),
    ):
        yield make_denoise_loss(model, clone_saved=clone_saved)


def make_denoise_loss(model, *, clone_saved: bool | None = None):
    """``DenoiseLoss`` of a ComfyUI MODEL: eps-MSE at a timestep, per row.

    ComfyUI's sigma parametrisation: x_t = x_0 + sigma * eps, and ``apply_model`` returns the
    denoised prediction for every model type, so eps_hat = (x_t - denoised) / sigma.
    ``clone_saved``: clone what autograd saves (needed where ComfyUI's blocks add in place);
    by default, whenever this ComfyUI copy does.
    """
    base = model.model
    make_autograd_safe(base.diffusion_model)
    sampling = base.model_sampling
    if clone_saved is None:
        clone_saved = comfy_compat.transformer_blocks_add_in_place()

    def loss(latents, context, timesteps, noise):
        sigma = sampling.sigma(timesteps).to(latents.device)
        view = sigma.view(-1, 1, 1, 1)
        x_t = sampling.noise_scaling(view, noise, latents)
        context, extra = _unet_conditioning(base, context, latents)
        with saved_tensor_clones(clone_saved, base.diffusion_model):
            denoised = base.apply_model(
                x_t, sigma, c_crossattn=context, transformer_options={}, **extra
            )
        eps = (x_t - denoised.float()) / view
        return ((eps - noise.float()) ** 2).mean(dim=(1, 2, 3))

    return loss


def _unet_conditioning(base, context, latents) -> tuple[torch.Tensor, dict]:
    """The cross-attention context and the UNet's extra inputs for a ``TextForward`` output.

    With a pooled output (SDXL), the ADM vector ``y`` comes from the model's own
    ``encode_adm``, with the size conditioning ComfyUI's samplers give a plain text prompt:
    the latent's size x 8 as original and target size, no crop (``comfy/samplers.py``)."""
    if not isinstance(context, tuple):
        return context.to(latents.device), {}
    context, pooled = context
    height, width = (int(v) * 8 for v in latents.shape[-2:])
    adm = base.encode_adm(
        pooled_output=pooled,
        width=width,
        height=height,
        crop_w=0,
        crop_h=0,
        target_width=width,
        target_height=height,
        device=latents.device,
    )
    return context.to(latents.device), {"y": adm.to(latents.device)}


def probe_public_inputs(model, clip, family, prompts, initial, *, height: int, width: int) -> None:
    """Refuse a model that gives non-finite outputs on PUBLIC inputs, before any private
    image is read or any budget spent: the initializer's vectors in the first template
    through the text encoder, then one denoising loss on a fixed-seed random latent. A
    checkpoint whose text encoder was not loaded (e.g. keys saved without ``text_model.``)
    would otherwise train on NaNs without a word."""
    channels = getattr(getattr(model.model, "latent_format", None), "latent_channels", 4)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    latents = torch.randn(
        (1, channels, max(1, height // 8), max(1, width // 8)), generator=generator
    )
    noise = torch.randn(latents.shape, generator=generator)
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        comfy_compat.cancel_checks(model.model.diffusion_model),
    ):
        text_forward = make_text_forward(clip, family)
        context = text_forward(prompts.ids[:1], prompts.mask[:1], initial)
        parts = context if isinstance(context, tuple) else (context,)
        if not all(bool(torch.isfinite(part).all()) for part in parts):
            raise InvalidParameterError(
                "the CLIP text encoder gives non-finite values on a public prompt: the "
                "checkpoint's text encoder is probably missing or damaged (e.g. its keys were "
                "not recognised on loading). Your images were not used and no budget "
                "was spent."
            )
        # An encoder whose weights were never loaded (left at zero) answers every prompt
        # alike: training would not move the token. A different placeholder must show.
        other = text_forward(prompts.ids[:1], prompts.mask[:1], -initial)
        other = other[0] if isinstance(other, tuple) else other
        if torch.equal(parts[0], other):
            raise InvalidParameterError(
                "the CLIP text encoder gives the same output whatever the prompt: its weights "
                "were probably not loaded (e.g. the checkpoint's text-encoder keys were not "
                "recognised on loading). Your images were not used and no budget was spent."
            )
        loss = make_denoise_loss(model)(latents, context, torch.tensor([500.0]), noise)
        if not torch.isfinite(loss).all():
            raise InvalidParameterError(
                "the model's UNet gives non-finite values on a public input: the checkpoint "
                "is probably damaged or does not match its configuration. Your images were "
                "not used and no budget was spent."
            )


class PhaseText:
    """Where a long run is, shown on the node: ``"encoding 3/13 chunks (n_hat = 100), about
    2 min left"`` (``comfy_compat.progress_text``).

    Only public values go in: the phase, the PUBLIC progress value and total (functions of
    n_hat and the settings, held at the total past n_hat: ``dp.inversion.PublicProgress``)
    and an ETA from the time the public-sized work done so far took. That work is constant
    in n_hat (padded chunks, docs/privacy.md §3.2), so its timing is a function of public
    work too, and no text is sent for work past the public total (the progress value no
    longer moves then), so the run time of the extra images is never turned into a number.
    """

    def __init__(self, node_id: str | None, *, n_hat: int, clock=None):
        import time

        self.node_id = node_id
        self.n_hat = n_hat
        self._clock = clock or time.monotonic
        self._phase: str | None = None
        self._started = 0.0

    def show(self, phase: str, done: int | None = None, total: int | None = None, *, unit=""):
        """Send ``phase`` (with ``done/total unit`` and an ETA when given)."""
        now = self._clock()
        if phase != self._phase:
            self._phase, self._started = phase, now
        if done is None or total is None:
            comfy_compat.progress_text(f"{phase} (n_hat = {self.n_hat})", self.node_id)
            return
        text = f"{phase} {done}/{total} {unit} (n_hat = {self.n_hat})".replace("  ", " ")
        if 0 < done < total:
            text += f", about {duration_text((now - self._started) / done * (total - done))} left"
        comfy_compat.progress_text(text, self.node_id)


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def encode_for_training(model, vae, private, *, public_rows: int, config, phase_text=None):
    """Latents (n, C, h, w) of EVERY picture of ``private`` and the ``on_step`` callback of
    its training.

    The pictures are decoded ``images_per_batch`` at a time (``PrivateImageSet.batches``)
    and encoded as they come, so decoded pixels never take more than one chunk's memory.
    The latents of all n pictures are kept (every training step needs them): n x C x R/8 x
    R/8 floats, 1/48 of the decoded pixels at C = 4, the one memory cost that grows with n.

    Constant work (docs/privacy.md §3.2, §4): the pictures are encoded one per VAE call
    (ComfyUI's VAE.encode may split a batch by free memory, and a split that varies would
    let other pictures change how this one is rounded), padded with a blank image to
    ``padded_chunk_count(n, public_rows, images_per_batch)`` chunks. One progress bar of the
    public total ``public_chunk_count(public_rows) * (steps + 1)`` covers the encoding and
    the training that follows (``config.steps`` passes per chunk); past the declared n_hat
    it holds at its marks (``dp.inversion.PublicProgress``). ``on_step(done, total)``
    advances it and honours Cancel, as does the encoding loop.
    """
    from ..dp.inversion import PublicProgress, chunk_rows, padded_chunk_count, public_chunk_count

    n = private.count
    per_chunk = chunk_rows(config.images_per_batch, public_rows=public_rows)
    chunks = padded_chunk_count(n, public_rows=public_rows, images_per_batch=per_chunk)
    shown = public_chunk_count(public_rows, images_per_batch=per_chunk)
    bar = comfy_compat.progress_bar(shown * (config.steps + 1))
    phase_text = phase_text or PhaseText(None, n_hat=public_rows)

    def report(value: int, total: int) -> None:
        bar.update_absolute(value, total)
        if value <= shown:
            phase_text.show("encoding", value, shown, unit="chunks")
        else:
            passes = shown * config.steps
            phase_text.show("training", value - shown, passes, unit="chunk steps")

    progress = PublicProgress(shown * (config.steps + 1), report)
    resolution = private.resolution
    padding = torch.zeros((1, resolution, resolution, 3), dtype=torch.float32)
    decoded = private.batches(per_chunk, check_cancelled=comfy_compat.raise_if_cancelled)
    latents = []
    phase_text.show("encoding", 0, shown, unit="chunks")
    for chunk in range(chunks):
        comfy_compat.raise_if_cancelled()
        batch = next(decoded, None)
        pixels = batch.pixels if batch is not None else padding[:0]
        for row in range(per_chunk):
            comfy_compat.raise_if_cancelled()
            real = row < pixels.shape[0]
            with comfy_compat.cancel_checks(vae.first_stage_model):
                encoded = comfy_compat.encode_latents(
                    model, vae, pixels[row : row + 1] if real else padding
                )
            if real:
                latents.append(encoded)
        del batch, pixels
        progress.advance_to(min(chunk + 1, shown))

    def on_step(done: int, _total: int) -> None:
        comfy_compat.raise_if_cancelled()
        progress.advance_to(shown + done)

    return torch.cat(latents), on_step
