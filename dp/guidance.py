"""Forward universal guidance towards a CLIP image embedding (docs/privacy.md §5).

Bansal et al. 2023, "Universal Guidance for Diffusion Models" (arXiv 2302.07121), Algorithm 1,
with the loss of the DP universal-guidance method of arXiv 2411.14639: the target ``y`` is a
unit-norm CLIP image embedding released by mechanism M1, and

    l(z0) = -<normalize(f(D(z0))), y>                                        (per image)

with ``D`` the VAE decoder and ``f`` the CLIP image encoder. Sampling only reads ``y``: it is
post-processing of a DP release and costs no privacy.

Everything here is pure torch; the model pieces (denoiser, decoder, image encoder) arrive as
callables, so the maths is testable without ComfyUI.

The correction in ComfyUI's parametrisation
-------------------------------------------
Paper (DDPM, eps-prediction): ``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps`` and forward
universal guidance replaces the noise prediction by

    eps_hat = eps + s * sqrt(1 - abar) * grad_{z_t} l(z0_hat(z_t)).                   (1)

ComfyUI (k-diffusion) samples the variance-exploding variable ``x = z_t / sqrt(abar)``:
``x = x0 + sigma * eps`` with ``sigma^2 = (1 - abar) / abar`` and ``denoised = x - sigma * eps``.

1. Chain rule: ``x = z_t / sqrt(abar)``, so ``grad_{z_t} l = grad_x l / sqrt(abar)``.
2. Put this in (1): ``eps_hat = eps + s * sqrt(1 - abar) / sqrt(abar) * grad_x l
   = eps + s * sigma * grad_x l``.
3. The denoised prediction the sampler sees: ``denoised' = x - sigma * eps_hat``, so

       denoised' = denoised - s * sigma^2 * grad_x l.                                  (2)

The guidance strength ``s`` is the same number in both forms (tested numerically against
(1) on a tiny model). Every ComfyUI sampler consumes ``denoised``, so correcting it in a
post-CFG hook guides every sampler and scheduler. (2) holds for every model ComfyUI runs
with ``x = x0 + sigma * eps`` (eps- and v-prediction alike: v-models' ``denoised`` has the
same relation to their implied eps); flow models (``x = (1 - sigma) x0 + sigma eps``) differ.

Two modes
---------
``full``: ``grad_x l(denoised(x))`` through the denoiser, as in the paper.
``x0``: the gradient with respect to the predicted clean latent only, ``grad_{denoised} l``,
i.e. (1) with ``eps`` held fixed: ``z0_hat = (z_t - sqrt(1 - abar) eps) / sqrt(abar)`` gives
``grad_{z_t} l = grad_{z0_hat} l / sqrt(abar)`` and (2) becomes
``denoised' = denoised - s * sigma^2 * grad_{denoised} l``. No backward pass through the
denoiser (the cheaper variant of docs/privacy.md §5).

Self-recurrence (Algorithm 1, inner loop)
-----------------------------------------
After a step from ``t`` to ``t-1`` the paper re-noises
``z_t = sqrt(abar_t / abar_{t-1}) z_{t-1} + sqrt(1 - abar_t / abar_{t-1}) eps'`` and repeats the
step. Dividing by ``sqrt(abar_t)`` (and ``1 / abar = 1 + sigma^2``) gives, in ComfyUI's
variable, ``x_t = x_{t-1} + sqrt(sigma_t^2 - sigma_{t-1}^2) eps'``: the variance-exploding
forward step, see :func:`renoise`. ``self_recurrence = k`` runs every step k + 1 times (the
authors' code calls k + 1 "optim_num_steps").

Schedule over the noise levels
------------------------------
``sigma^2`` (the default) is eq. (2) as derived: the push on ``denoised`` is ``s * sigma^2 *
grad``, so at SD's first step (sigma = 14.6) it is 213 times that at sigma = 1 and about 10^5
times the last steps'. On the demo model (8 x 8 latents) this put the whole correction on the
first, blurred predictions: at s = 4 the first step moved the prediction by three times its
own norm and broke the shapes, while each of the last third of the steps moved it by under
1 % (bench/guidance_control.py, results/guidance_sweep.txt). ``constant`` applies
``denoised' = denoised - s * grad`` at every step: the same gradient step on the predicted
clean latent at every noise level, i.e. eq. (1) with the weight ``s / sigma^2`` instead of
``s``. It is not the paper's form. On the demo model with self-recurrence 3 it drew the
proxy style's stripes on rougher but recognisable shapes; on the held-out style it has not
been shown to work.

``normalized`` moves each image's prediction by a fixed fraction ``s`` of its own norm along
the gradient, ``denoised' = denoised - s * |denoised| * grad / |grad|``: the direction of
eq. (2), a step size that no noise level can blow up (a trust-region step, as in normalised
gradient descent). Measured on the demo model (bench/guidance_control.py, results/
guidance_sweep.txt, proxy style "outlined"): with s = 0.15, self-recurrence 2 and 4 views it
draws outlines on 10 of 12 pictures (unguided: 1 of 12) with the subjects kept, while the
``sigma^2`` form's high scores come from noise pictures that only fool the classifier.

Views
-----
``views`` > 1 averages the loss over deterministic crops and flips of the decoded picture
(:func:`augmented_views`), the usual defence of CLIP guidance against gradients that fool the
image encoder with pixel patterns instead of drawing the style. Measured on the same proxy:
4 views instead of 1 raise the fraction from 0.58 to 0.92 at s = 0.15, self-recurrence 4.

Strength
--------
The authors' style-transfer setting (weight 6 on a loss of -100 x cosine, github
arpitbansal297/Universal-Guided-Diffusion, stable-diffusion-guided/scripts/style_transfer.py)
is ``s = 600`` for the loss ``-cosine`` used here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .autograd_alias import autograd_alias
from .autograd_alias import clone_saved_tensors as clone_saved_tensors  # the guided passes
from .errors import InvalidParameterError

MAX_SELF_RECURRENCE = 10
"""Upper bound on the self-recurrence count ``k``: each unit multiplies the sampling cost
(Bansal et al. report gains up to k = 10; beyond, cost grows with little benefit)."""

MAX_GUIDANCE_STRENGTH = 10_000.0

MAX_VIEWS = 16
"""Upper bound on the augmented views per guided step: each view is one more CLIP pass."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Denoiser = Callable[[torch.Tensor], torch.Tensor]
"""``x (B, C, h, w) at a fixed sigma -> denoised (B, C, h, w)``, differentiable."""

GuidanceLoss = Callable[[torch.Tensor], torch.Tensor]
"""``denoised latents (B, C, h, w) -> loss (B,)``, differentiable; one value per image."""


class GuidanceMode(str, Enum):
    """Where the guidance gradient is taken (see the module docstring)."""

    FULL = "full"
    X0 = "x0"


class GuidanceSchedule(str, Enum):
    """How the strength is weighted over noise levels (see "Schedule" in the module docstring)."""

    SIGMA_SQUARED = "sigma^2"
    CONSTANT = "constant"
    NORMALIZED = "normalized"


class DecodeSize(str, Enum):
    """At what size each step's prediction is decoded for CLIP (see :func:`latents_for_clip`)."""

    FULL = "full"
    CLIP = "clip"


class GuidanceError(InvalidParameterError):
    """Bad input to the universal guidance sampler."""


@dataclass(frozen=True)
class GuidanceConfig:
    """Public settings of one guided sampling run."""

    strength: float
    mode: GuidanceMode = GuidanceMode.FULL
    self_recurrence: int = 0
    decode_size: DecodeSize = DecodeSize.FULL
    schedule: GuidanceSchedule = GuidanceSchedule.SIGMA_SQUARED
    views: int = 1

    def __post_init__(self) -> None:
        s = self.strength
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, float))
            or not math.isfinite(s)
            or not 0 <= s <= MAX_GUIDANCE_STRENGTH
        ):
            raise GuidanceError(
                f"guidance_strength must be a finite number in [0, {MAX_GUIDANCE_STRENGTH:g}], "
                f"got guidance_strength={s!r}."
            )
        for name, kind in (
            ("mode", GuidanceMode),
            ("decode_size", DecodeSize),
            ("schedule", GuidanceSchedule),
        ):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(repr(m.value) for m in kind)
                raise GuidanceError(
                    f"{name} must be one of {allowed}, got {name}={value!r}."
                ) from None
        k = self.self_recurrence
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SELF_RECURRENCE:
            raise GuidanceError(
                f"self_recurrence must be an integer in [0, {MAX_SELF_RECURRENCE}], got "
                f"self_recurrence={k!r}. Each repeat re-runs every sampling step; "
                f"{MAX_SELF_RECURRENCE} is the most this node allows."
            )
        v = self.views
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VIEWS:
            raise GuidanceError(
                f"views must be an integer in [1, {MAX_VIEWS}], got views={v!r}. Each view is "
                "one more CLIP pass per step."
            )
        if s > 1 and self.schedule is GuidanceSchedule.NORMALIZED:
            raise GuidanceError(
                f"with schedule 'normalized' the strength is the step's size relative to the "
                f"prediction (0.1 = 10 %), at most 1; got guidance_strength={s!r}."
            )


@dataclass(frozen=True, eq=False)
class ClipTarget:
    """A DP release of a mean CLIP image embedding, as a guidance target (``DP_CLIP_TARGET``).

    ``embedding`` (D,) float32 on CPU, unit norm (renormalising is post-processing). ``event``
    is the release's dp_accounting DpEvent; every other field is a public parameter of the
    release (docs/privacy.md §1). Nothing per image is held.
    """

    embedding: torch.Tensor
    event: Any
    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    declared_dataset_size: int
    clip_norm: float = 1.0
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = self.embedding
        if not isinstance(e, torch.Tensor) or e.dim() != 1 or e.numel() < 1:
            raise GuidanceError(
                "a CLIP target embedding must be one vector (D,), got "
                f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}."
            )
        if not torch.isfinite(e).all():
            raise GuidanceError("the CLIP target embedding holds NaN or infinite values.")
        # A normal tensor even when built inside ComfyUI's inference mode: the guidance loss
        # differentiates through a product with it.
        with torch.inference_mode(False):
            emb = e.detach().to(device="cpu", dtype=torch.float32).clone()
        norm = float(emb.norm())
        if not math.isclose(norm, 1.0, rel_tol=1e-4):
            raise GuidanceError(f"the CLIP target embedding must have unit norm, got {norm:.6g}.")
        object.__setattr__(self, "embedding", emb)

    @property
    def width(self) -> int:
        return int(self.embedding.shape[0])


@dataclass(frozen=True)
class GuidedPrediction:
    """Result of one guidance correction."""

    denoised: torch.Tensor
    """(B, C, h, w) corrected denoised prediction, eq. (2)."""
    loss: torch.Tensor
    """(B,) guidance loss of the uncorrected prediction (detached)."""
    gradient: torch.Tensor
    """(B, C, h, w) grad_x l (``full``) or grad_{denoised} l (``x0``), detached."""


def check_target_width(target: ClipTarget, width: int) -> None:
    """Refuse a target released in another CLIP embedding space."""
    if target.width != width:
        raise GuidanceError(
            f"the DP CLIP target has width {target.width} but the CLIP_VISION model embeds "
            f"images in width {width}. Aggregate the private images with the same CLIP vision "
            "model that guides the sampler."
        )


def preprocess_for_clip(
    images: torch.Tensor,
    *,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop: bool = True,
) -> torch.Tensor:
    """Differentiable twin of ComfyUI's ``clip_preprocess``: (B, 3, H, W) in [0, 1] -> (B, 3, size, size).

    Bicubic antialiased resize of the shortest side to ``size`` (or of both sides when
    ``crop`` is False), centre crop, clamp to [0, 1], then CLIP's normalisation. ComfyUI's version also
    rounds to 8 bits, which makes its gradient zero everywhere; this one does not round.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise GuidanceError(f"expected images (B, 3, H, W), got {tuple(images.shape)}.")
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            target = (round(scale * height), round(scale * width))
        else:
            target = (size, size)
        images = torch.nn.functional.interpolate(
            images, size=target, mode="bicubic", antialias=True, align_corners=False
        )
        top = (images.shape[-2] - size) // 2
        left = (images.shape[-1] - size) // 2
        images = images[:, :, top : top + size, left : left + size]
    images = images.clamp(0.0, 1.0)  # as ComfyUI's (bicubic overshoots)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def latents_for_clip(
    latents: torch.Tensor, *, clip_size: int, downscale_ratio: int
) -> torch.Tensor:
    """Latents (B, C, h, w) resized so that their decoded image's shorter side is CLIP's input
    size (``ceil(clip_size / downscale_ratio)`` latent pixels), aspect ratio kept.

    CLIP only sees the decoded image resized to ``clip_size`` on its shorter side, so decoding
    latents already at about that size costs a fraction of a full decode: at 512 px and CLIP's
    224 px, the decoder runs on (224 / 512)^2 = 19 % of the pixels, and its backward pass too.
    It is an approximation that Bansal et al. do not make (they decode at full size): a VAE
    decoder is not exactly scale-equivariant, so decode(resize(z)) is close to, not equal to,
    resize(decode(z)). The resize is bilinear with antialiasing, differentiable, so the
    gradient comes back at full size. Latents already that small are returned unchanged.
    """
    if latents.dim() != 4:
        raise GuidanceError(f"expected latents (B, C, h, w), got {tuple(latents.shape)}.")
    height, width = latents.shape[-2:]
    shorter = math.ceil(clip_size / downscale_ratio)
    if min(height, width) <= shorter:
        return latents
    scale = shorter / min(height, width)
    size = (max(shorter, round(height * scale)), max(shorter, round(width * scale)))
    return torch.nn.functional.interpolate(
        latents, size=size, mode="bilinear", antialias=True, align_corners=False
    )


def augmented_views(images: torch.Tensor, count: int, call: int = 0) -> torch.Tensor:
    """``count`` deterministic views of each image, (count * B, 3, H, W), view-major.

    View 0 is the image itself; view j >= 1 is a square crop of 70-95 % of the shorter side at
    a position that moves with j and with ``call`` (the guided step's index), flipped left-right
    for odd j, resized back to (H, W) bilinearly. Averaging the CLIP loss over such views is
    the standard defence of CLIP-guided generation against gradients that fool the image
    encoder with pixel patterns instead of drawing the style (Crowson's "cutouts"; measured
    on the demo model in bench/guidance_control.py). Deterministic, so a seed reproduces a
    picture; this randomness is not privacy noise (sampling is post-processing of a release).
    """
    if count < 1:
        raise GuidanceError(f"views must be at least 1, got {count}.")
    if count == 1:
        return images
    height, width = images.shape[-2:]
    side = min(height, width)
    golden = 0.6180339887498949  # additive recurrence: well-spread positions (Weyl sequence)
    out = [images]
    for j in range(1, count):
        k = j + call * (count - 1)
        scale = 0.7 + 0.25 * ((k * golden) % 1.0)
        crop = max(2, round(side * scale))
        top = round(((k * golden * 2.0) % 1.0) * (height - crop))
        left = round(((k * golden * 3.0) % 1.0) * (width - crop))
        view = images[:, :, top : top + crop, left : left + crop]
        if j % 2:
            view = view.flip(-1)
        out.append(
            torch.nn.functional.interpolate(
                view, size=(height, width), mode="bilinear", align_corners=False
            )
        )
    return torch.cat(out)


def clip_guidance_loss(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-<normalize(f), y>`` per image: embeddings (B, D), target (D,) unit norm -> (B,)."""
    if embeddings.dim() != 2 or embeddings.shape[1] != target.shape[-1]:
        raise GuidanceError(
            f"image embeddings {tuple(embeddings.shape)} do not match the target width "
            f"{target.shape[-1]}."
        )
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    return -(unit @ target.to(device=unit.device, dtype=unit.dtype))


def make_guidance_loss(
    *,
    decode: Callable[[torch.Tensor], torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    views: int = 1,
) -> GuidanceLoss:
    """``l(z0) = -<normalize(embed(decode(z0))), y>`` per image, as one callable; with
    ``views`` > 1 the mean of that loss over :func:`augmented_views` of the decoded image.

    ``decode``: denoised latents -> images (B, 3, H, W) in [0, 1]; ``embed``: such images ->
    image embeddings (B, D), both differentiable.
    """
    calls = 0

    def loss(denoised: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        images = decode(denoised)
        batch = images.shape[0]
        pictures = augmented_views(images, views, calls)
        calls += 1
        per_view = clip_guidance_loss(embed(pictures), target)
        return per_view.view(views, batch).mean(dim=0)

    return loss


def _as_batch_view(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.dim() == 0:
        sigma = sigma.expand(like.shape[0])
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def sigma_form_correction(
    denoised: torch.Tensor,
    gradient: torch.Tensor,
    sigma: torch.Tensor | float,
    strength: float,
    schedule: GuidanceSchedule = GuidanceSchedule.SIGMA_SQUARED,
) -> torch.Tensor:
    """Eq. (2): ``denoised - s * sigma^2 * grad`` (``sigma^2``), ``denoised - s * grad``
    (``constant``), or ``denoised - s * |denoised| * grad / |grad|`` per image
    (``normalized``); ``sigma`` scalar or (B,)."""
    schedule = GuidanceSchedule(schedule)
    if schedule is GuidanceSchedule.CONSTANT:
        return denoised - strength * gradient.to(denoised.dtype)
    if schedule is GuidanceSchedule.NORMALIZED:
        # A step of fixed relative size along the descent direction: each image's own norms,
        # so its step depends on that image alone. A zero gradient leaves it unchanged.
        flat_grad = gradient.to(denoised.dtype).flatten(1)
        grad_norm = flat_grad.norm(dim=1)
        scale = denoised.flatten(1).norm(dim=1) / grad_norm.clamp_min(1e-12)
        scale = torch.where(grad_norm > 0, scale, torch.zeros_like(scale))
        return denoised - strength * _as_batch_view(scale, denoised) * gradient.to(denoised.dtype)
    view = _as_batch_view(sigma, denoised)
    return denoised - strength * view.square() * gradient.to(denoised.dtype)


def guided_prediction(
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    denoised: torch.Tensor,
    *,
    loss_fn: GuidanceLoss,
    strength: float,
    mode: GuidanceMode,
    denoiser: Denoiser | None = None,
    schedule: GuidanceSchedule = GuidanceSchedule.SIGMA_SQUARED,
) -> GuidedPrediction:
    """One forward-universal-guidance correction in ComfyUI's sigma form, eq. (2).

    x (B, C, h, w): the sampler's current latent at noise level ``sigma`` (scalar or (B,));
    denoised: the sampler's (CFG-combined) prediction of the clean latent at ``x``.
    ``full`` re-evaluates ``denoiser(x)`` with autograd and differentiates the loss through
    it; ``x0`` differentiates with respect to ``denoised`` only. ``schedule`` weights the
    correction over noise levels (module docstring). The loss is summed over the
    batch, so each image's gradient depends on that image alone. Call with gradients
    enabled (outside ``torch.inference_mode``).
    """
    mode = GuidanceMode(mode)
    if mode is GuidanceMode.FULL:
        if denoiser is None:
            raise GuidanceError("mode 'full' needs the denoiser to differentiate through.")
        leaf = x.detach().clone().requires_grad_(True)
        prediction = denoiser(leaf)
    else:
        leaf = denoised.detach().clone().requires_grad_(True)
        prediction = leaf
    losses = loss_fn(prediction)
    (gradient,) = torch.autograd.grad(losses.sum(), leaf)
    corrected = sigma_form_correction(denoised, gradient, sigma, strength, schedule)
    return GuidedPrediction(
        denoised=corrected.detach(), loss=losses.detach(), gradient=gradient.detach()
    )


def eps_form_prediction(
    z_t: torch.Tensor,
    alpha_bar: float,
    *,
    eps_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: GuidanceLoss,
    strength: float,
    mode: GuidanceMode,
) -> torch.Tensor:
    """The paper's form, eq. (1), as a reference: the guided ``z0_hat`` in DDPM variables.

    ``eps_fn(z_t)`` predicts the noise; ``z0_hat = (z_t - sqrt(1 - abar) eps) / sqrt(abar)``.
    ``full`` takes ``grad_{z_t} l(z0_hat(z_t))`` through ``eps_fn``; ``x0`` holds ``eps`` fixed.
    Returns ``(z_t - sqrt(1 - abar) eps_hat) / sqrt(abar)`` with
    ``eps_hat = eps + s sqrt(1 - abar) grad_{z_t} l``; used by the tests to check eq. (2).
    """
    a = torch.as_tensor(alpha_bar, dtype=z_t.dtype, device=z_t.device)
    root_a, root_1ma = a.sqrt(), (1 - a).sqrt()
    leaf = z_t.detach().clone().requires_grad_(True)
    if GuidanceMode(mode) is GuidanceMode.X0:
        with torch.no_grad():
            eps = eps_fn(leaf)
    else:
        eps = eps_fn(leaf)
    z0_hat = (leaf - root_1ma * eps) / root_a
    (grad_zt,) = torch.autograd.grad(loss_fn(z0_hat).sum(), leaf)
    eps_hat = eps.detach() + strength * root_1ma * grad_zt
    return (z_t - root_1ma * eps_hat) / root_a


def renoise(
    x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor
) -> torch.Tensor:
    """Self-recurrence's re-noising from ``sigma_from`` back up to ``sigma_to >= sigma_from``.

    Algorithm 1 of Bansal et al. in ComfyUI's variable (module docstring):
    ``x + sqrt(sigma_to^2 - sigma_from^2) * noise``.
    """
    if sigma_to < sigma_from:
        raise GuidanceError(
            f"re-noising goes up in noise level, got sigma_from={sigma_from} > sigma_to={sigma_to}."
        )
    return x + math.sqrt(sigma_to**2 - sigma_from**2) * noise.to(x.dtype)


class WeightSwap:
    """Temporarily replaces inference-mode parameters and buffers by equal normal tensors.

    Loader nodes create weights under ``torch.inference_mode()`` and autograd refuses to save
    such tensors for backward. :meth:`swap` gives the modules normal tensors over the same
    memory (``autograd_alias``: frozen, same values, same devices, no copy where DLPack can
    express the tensor); it can be called again and only swaps what is still an inference
    tensor (e.g. weights ComfyUI patched in the meantime). :meth:`restore` puts every original
    object back where the clone still sits, so the caller's model is left as it was.
    """

    def __init__(self) -> None:
        self._swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []

    def swap(self, modules: Sequence[torch.nn.Module]) -> None:
        with torch.inference_mode(False):
            for module in modules:
                for sub in module.modules():
                    for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
                        for name, tensor in list(store.items()):
                            if tensor is None or not tensor.is_inference():
                                continue
                            # Zero-copy where possible (dp/autograd_alias.py): no second
                            # copy of the VAE / CLIP / UNet at every guided step.
                            clone = autograd_alias(tensor)
                            if is_param:
                                clone = torch.nn.Parameter(clone, requires_grad=False)
                            store[name] = clone
                            self._swapped.append((store, name, tensor, clone))

    def restore(self) -> None:
        for store, name, original, clone in reversed(self._swapped):
            if store.get(name) is clone:
                store[name] = original
        self._swapped.clear()

    @property
    def count(self) -> int:
        return len(self._swapped)


@contextmanager
def autograd_weights(modules: Sequence[torch.nn.Module]) -> Iterator[WeightSwap]:
    """``WeightSwap`` of ``modules`` for the duration of the context."""
    swap = WeightSwap()
    try:
        swap.swap(modules)
        yield swap
    finally:
        swap.restore()
