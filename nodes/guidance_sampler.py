"""The "Universal Guidance Sampler" node: ComfyUI's own sampling, guided towards a DP CLIP target.

The maths (forward universal guidance in ComfyUI's sigma form, self-recurrence) is in
``dp/guidance.py``; this module only wires ComfyUI's pieces into it:

- Guidance is a post-CFG hook on a clone of the MODEL (``set_model_sampler_post_cfg_function``):
  every sampler and scheduler ComfyUI has consumes the corrected ``denoised``, and the user's
  MODEL is not changed.
- The hook runs under the executor's inference mode; it leaves it, swaps inference weights of
  the VAE, the CLIP vision model (and, in mode ``full``, the diffusion model) for normal
  clones while the node runs (``dp.guidance.WeightSwap``) and puts the originals back after.
- Decoding calls ``vae.first_stage_model.decode`` after ``process_latent_out``; CLIP's
  preprocessing is ``dp.guidance.preprocess_for_clip`` because ComfyUI's rounds to 8 bits
  and has zero gradient.

Self-recurrence on top of arbitrary samplers: with ``self_recurrence = k > 0`` the node runs
ComfyUI's sampler one step at a time (``comfy.sample.sample`` with ``start_step = i``,
``last_step = i + 1``), and after each step re-noises from ``sigma_{i+1}`` back to
``sigma_i`` (``dp.guidance.renoise``) and repeats the step, k times, before moving on: Algorithm
1 of Bansal et al. 2023. Samplers that keep a history between steps (dpmpp_2m, uni_pc, ...)
then restart it at every step, i.e. run as their one-step form; ancestral samplers draw new
noise at every call. With k = 0 the whole schedule runs in one call, exactly as KSampler.

The target is only read: sampling is post-processing of a DP release and never touches the
privacy ledger.
"""

from __future__ import annotations

import logging

import torch

from . import comfy_compat

logger = logging.getLogger(__name__)

TARGET_TYPE = "DP_CLIP_TARGET"
MODES = ["full", "x0"]
DECODE_SIZES = ["full", "clip"]
SCHEDULES = ["sigma^2", "constant", "normalized"]
SEED_MODULUS = 2**64
# Guided steps cost 2-6 plain steps each (docs/performance.md): 1,000 is already hours at
# 512 px on a CPU, and no schedule gains from more. KSampler's 10,000 would allow days.
MAX_STEPS = 1000
MAX_CFG = 100.0
DEFAULT_STRENGTH = 600.0
"""Bansal et al.'s style transfer (weight 6 on a loss of -100 x cosine) in this node's units."""


class UniversalGuidanceSamplerNode:
    CATEGORY = "DP Adapt"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The guided latent: decode it with VAE Decode.",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "KSampler with universal guidance (Bansal et al. 2023): at every step the predicted "
        "image is decoded, embedded with CLIP vision and nudged towards the DP style target from "
        "DP Aggregate CLIP Embeddings. Works with every sampler and scheduler. Reads the target "
        "only: no privacy budget is spent here."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ..dp.guidance import MAX_GUIDANCE_STRENGTH, MAX_SELF_RECURRENCE, MAX_VIEWS

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x / SD2.x / SDXL)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw (CLIP Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "What to avoid (CLIP Text Encode)."}),
                "latent_image": (
                    "LATENT",
                    {"tooltip": "The latent to denoise, e.g. from Empty Latent Image."},
                ),
                "vae": (
                    "VAE",
                    {"tooltip": "The checkpoint's VAE: decodes each step's prediction for CLIP."},
                ),
                "clip_vision": (
                    "CLIP_VISION",
                    {
                        "tooltip": "The CLIP vision model the target was made with (Load CLIP Vision)."
                    },
                ),
                "target": (
                    TARGET_TYPE,
                    {"tooltip": "The DP style target, from DP Aggregate CLIP Embeddings."},
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seed of the sampling noise (public; not the DP noise).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 30,
                        "min": 1,
                        "max": MAX_STEPS,
                        "tooltip": "Sampling steps. Each guided step costs 2-6 plain ones "
                        "(decode + CLIP + gradient).",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.0,
                        "min": 0.0,
                        "max": MAX_CFG,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale, as in KSampler.",
                    },
                ),
                "sampler_name": (
                    comfy_compat.sampler_names(),
                    {"tooltip": "ComfyUI's samplers; all of them work with guidance."},
                ),
                "scheduler": (comfy_compat.scheduler_names(), {"tooltip": "Noise schedule."}),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How much of the schedule to run (below 1 for image-to-image).",
                    },
                ),
                "guidance_strength": (
                    "FLOAT",
                    {
                        "default": DEFAULT_STRENGTH,
                        "min": 0.0,
                        "max": MAX_GUIDANCE_STRENGTH,
                        # Two decimals on the canvas (the frontend shows the digits of the
                        # step): 0.15 under step 10 read "0" while 0.15 ran.
                        "step": 0.05,
                        "round": False,
                        "tooltip": "How hard each step is pushed towards the style target. "
                        "schedule 'sigma^2': s in denoised - s * sigma^2 * grad(-cosine) (Bansal "
                        "et al.'s style setting equals about 600 here). schedule 'normalized': "
                        "the fraction of the prediction's own size each step moves, at most 1 "
                        "(0.15 on the demo model). 0 = plain KSampler. Too high breaks the image.",
                    },
                ),
                "self_recurrence": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SELF_RECURRENCE,
                        "tooltip": "Repeat each step k more times after re-noising (Bansal et al.; their "
                        "'recurrent steps' = k + 1). "
                        "Stronger style, k+1 times the cost. Multistep samplers (dpmpp_2m, uni_pc) run "
                        "one step at a time then; euler or ddim suit recurrence best.",
                    },
                ),
                "mode": (
                    MODES,
                    {
                        "default": "full",
                        "tooltip": "full: gradient through the diffusion model, as in the paper. "
                        "x0: gradient on the predicted clean image only, no backward pass through the model: "
                        "several times cheaper in time and GPU memory.",
                    },
                ),
            },
            "optional": {
                "decode_size": (
                    DECODE_SIZES,
                    {
                        "default": "full",
                        "tooltip": "full: decode each step's prediction at full size for CLIP, as "
                        "in the paper. clip: resize the latent first so the decoded image is CLIP's "
                        "input size (224 px for ViT-L/14): an approximation, much cheaper at "
                        "512 px and above (x0 mode at 512 px, CPU: 1.7x a plain step instead of "
                        "3.6x).",
                    },
                ),
                "schedule": (
                    SCHEDULES,
                    {
                        "default": "sigma^2",
                        "tooltip": "How the strength is spread over the steps. sigma^2: the "
                        "paper's denoised - s * sigma^2 * grad, almost all of the push in the "
                        "first, noisiest steps. constant: denoised - s * grad at every step, "
                        "the same push where details form; strengths are then far larger "
                        "(tens, not the paper's 600); use self_recurrence 2-3 with it. "
                        "normalized: every step moves the prediction by the same fraction "
                        "of its size (guidance_strength 0.15 = 15 %) along the gradient, so "
                        "no step overwhelms the picture; strengths 0.05-0.3, with "
                        "self_recurrence 2-4 and views 4.",
                    },
                ),
                "views": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_VIEWS,
                        "tooltip": "CLIP looks at this many crops and flips of each step's "
                        "picture and the push follows their mean: a style the picture really "
                        "shows, not pixel patterns that only fool CLIP. 1 = the picture "
                        "alone, as in the paper; each view adds one CLIP pass per step.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(
        self,
        model,
        positive,
        negative,
        latent_image,
        vae,
        clip_vision,
        target,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        guidance_strength,
        self_recurrence,
        mode,
        decode_size="full",
        schedule="sigma^2",
        views=1,
        unique_id=None,
    ):
        from ..dp.guidance import GuidanceConfig, GuidanceError, WeightSwap

        config = GuidanceConfig(
            strength=guidance_strength,
            mode=mode,
            self_recurrence=self_recurrence,
            decode_size=decode_size,
            schedule=schedule,
            views=views,
        )
        _validate(model, latent_image, vae, clip_vision, target, steps, sampler_name, scheduler)
        _check_cfg(cfg)
        if (
            isinstance(denoise, bool)
            or not isinstance(denoise, (int, float))
            or not 0 <= denoise <= 1
        ):
            raise GuidanceError(f"denoise must be a number in [0, 1], got denoise={denoise!r}.")
        if denoise == 0:  # nothing to denoise (new ComfyUI's KSampler returns the input too)
            return (latent_image.copy(),)
        if self_recurrence > 0 and "noise_mask" in latent_image:
            raise GuidanceError(
                "self_recurrence > 0 does not support a latent with a noise mask (inpainting): "
                "set self_recurrence to 0."
            )

        weights = WeightSwap()
        guide = _GuidanceHook(model, vae, clip_vision, target, config, cfg, weights)
        guided = model.clone()
        guided.set_model_sampler_post_cfg_function(guide)
        # One load for all three, so that sampling's own load of the MODEL evicts neither the
        # VAE nor CLIP vision, which the hook calls directly at every step.
        comfy_compat.load_models([guided, vae.patcher, clip_vision.patcher])
        try:
            samples = _run_sampler(
                guided,
                positive,
                negative,
                latent_image,
                seed=seed,
                steps=steps,
                cfg=cfg,
                sampler_name=sampler_name,
                scheduler=scheduler,
                denoise=denoise,
                recurrence=config.self_recurrence,
                after_each_call=weights.restore,
                node_id=unique_id,
            )
        finally:
            weights.restore()
        logger.info(
            "Universal guidance: %d guided model evaluations, mode %s, decode %s, schedule %s, "
            "strength %g, views %d, loss %s",
            guide.calls,
            config.mode.value,
            config.decode_size.value,
            config.schedule.value,
            config.strength,
            config.views,
            guide.loss_summary(),
        )
        out = latent_image.copy()
        out["samples"] = samples
        return (out,)


ADAPTIVE_SAMPLERS = frozenset({"dpm_adaptive"})
"""Samplers whose number of model calls is not set by ``steps`` (ComfyUI's k-diffusion
``dpm_adaptive`` keeps stepping until its error estimate is met)."""


def _check_cfg(cfg) -> None:
    from ..dp.guidance import GuidanceError

    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG:
        # NaN fails the range test too: it would make every prediction NaN, and the picture
        # black, long before any overflow.
        raise GuidanceError(f"cfg must be a number from 0 to {MAX_CFG:g}, got cfg={cfg!r}.")


def _validate(model, latent, vae, clip_vision, target, steps, sampler_name, scheduler) -> None:
    from ..dp.guidance import ClipTarget, GuidanceError, check_target_width

    if clip_vision is None:
        raise GuidanceError(
            "clip_vision is missing: connect Load CLIP Vision, the same CLIP vision model that "
            "made the target in DP Aggregate CLIP Embeddings."
        )
    if not comfy_compat.is_clip_vision(clip_vision):
        raise GuidanceError(
            f"clip_vision must be a CLIP vision model (Load CLIP Vision, or the demo model's "
            f"clip_vision output), got a {comfy_compat.socket_kind(clip_vision)}."
        )
    if vae is None:
        raise GuidanceError("vae is missing: connect the checkpoint's VAE.")
    if not comfy_compat.is_vae(vae):
        raise GuidanceError(
            f"vae must be a VAE (the checkpoint's VAE output), got a "
            f"{comfy_compat.socket_kind(vae)}."
        )
    if not isinstance(target, ClipTarget):
        raise GuidanceError(
            f"target must be the DP_CLIP_TARGET output of DP Aggregate CLIP Embeddings, got "
            f"{type(target).__name__}."
        )
    check_target_width(target, comfy_compat.clip_vision_width(clip_vision))
    if not comfy_compat.has_sigma_parametrisation(model):
        raise GuidanceError(
            "this model does not sample with x = x0 + sigma * eps (a flow-matching model such as "
            "SD3 or Flux); universal guidance here supports SD1.x, SD2.x and SDXL models."
        )
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise GuidanceError("latent_image must be a LATENT (e.g. from Empty Latent Image).")
    if latent["samples"].dim() != 4 or latent["samples"].shape[0] < 1:
        raise GuidanceError(
            f"latent_image must hold a batch of image latents (B, C, h, w), got shape "
            f"{tuple(latent['samples'].shape)}."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise GuidanceError(f"steps must be an integer from 1 to {MAX_STEPS}, got steps={steps!r}.")
    if sampler_name not in comfy_compat.sampler_names():
        raise GuidanceError(f"unknown sampler_name={sampler_name!r}.")
    if sampler_name in ADAPTIVE_SAMPLERS:
        raise GuidanceError(
            f"sampler {sampler_name!r} chooses its own number of steps, so guidance (a few "
            "model, VAE and CLIP passes per step) would have no bound on its time; choose a "
            "fixed-step sampler such as euler or dpmpp_2m."
        )
    if scheduler not in comfy_compat.scheduler_names():
        raise GuidanceError(f"unknown scheduler={scheduler!r}.")


class _GuidanceHook:
    """The post-CFG function: corrects ``denoised`` by eq. (2) of ``dp/guidance.py``."""

    def __init__(self, model, vae, clip_vision, target, config, cfg, weights) -> None:
        from ..dp.guidance import DecodeSize, latents_for_clip, make_guidance_loss

        self.config = config
        self.cfg = cfg
        self.weights = weights
        self.vae = vae
        self.clip_vision = clip_vision
        self.unet_in_place = comfy_compat.transformer_blocks_add_in_place()
        self.calls = 0
        self.losses: list[float] = []
        size, mean, std = comfy_compat.clip_vision_settings(clip_vision)
        latent_out = model.model.process_latent_out
        device = clip_vision.load_device

        # SD1.x/2.x/SDXL VAEs downscale by 8; a VAE without one integer ratio decodes at full size.
        ratio = getattr(vae, "downscale_ratio", None)
        shrink = config.decode_size is DecodeSize.CLIP and isinstance(ratio, int)

        def decode(denoised: torch.Tensor) -> torch.Tensor:
            if shrink:
                denoised = latents_for_clip(denoised, clip_size=size, downscale_ratio=ratio)
            return comfy_compat.vae_decode_differentiable(vae, latent_out(denoised))

        def embed(images: torch.Tensor) -> torch.Tensor:
            from ..dp.guidance import clone_saved_tensors, preprocess_for_clip

            pixels = preprocess_for_clip(
                images.to(device=device, dtype=torch.float32), size=size, mean=mean, std=std
            )
            # CLIP layers add residuals in place (both ComfyUI versions).
            with clone_saved_tensors(keep=(clip_vision.model,)):
                return comfy_compat.clip_vision_image_embeds(clip_vision, pixels)

        with torch.inference_mode(False):  # autograd saves the target in the loss's product
            direction = target.embedding.clone()
        self.loss_fn = make_guidance_loss(
            decode=decode, embed=embed, target=direction, views=config.views
        )

    def __call__(self, args: dict) -> torch.Tensor:
        from ..dp.guidance import (
            GuidanceError,
            GuidanceMode,
            clone_saved_tensors,
            guided_prediction,
        )

        comfy_compat.raise_if_cancelled()
        denoised = args["denoised"]
        if self.config.strength == 0:
            return denoised
        full = self.config.mode is GuidanceMode.FULL
        with torch.inference_mode(False), torch.enable_grad():
            modules = [self.vae.first_stage_model, self.clip_vision.model]
            if full:
                modules.append(args["model"])
            self.weights.swap(modules)
            x = args["input"].clone()
            sigma = args["sigma"].clone()
            base = denoised.clone()
            denoiser = None
            if full:
                inner = comfy_compat.cfg_denoiser(args, self, self.cfg)

                def denoiser(z: torch.Tensor) -> torch.Tensor:
                    with clone_saved_tensors(self.unet_in_place, keep=(args["model"],)):
                        return inner(z)

            try:
                step = guided_prediction(
                    x,
                    sigma,
                    base,
                    loss_fn=self.loss_fn,
                    strength=self.config.strength,
                    mode=self.config.mode,
                    denoiser=denoiser,
                    schedule=self.config.schedule,
                )
            except RuntimeError as error:
                if full and "nference tensor" in str(error):
                    raise GuidanceError(
                        "mode 'full' cannot back-propagate through a model patch or ControlNet "
                        "that holds inference-mode weights; use mode 'x0' with it."
                    ) from error
                raise
        if not torch.isfinite(step.gradient).all():
            raise GuidanceError(
                f"the guidance gradient is not finite at sigma={float(sigma.flatten()[0]):.4g} "
                "(half-precision overflow in the VAE or CLIP?). Try mode 'x0', a lower "
                "guidance_strength, or a float32 VAE."
            )
        self.calls += 1
        self.losses.append(float(step.loss.mean()))
        return step.denoised.to(device=denoised.device, dtype=denoised.dtype)

    def loss_summary(self) -> str:
        if not self.losses:
            return "n/a"
        return f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f}"


def _with_eta(callback, node_id):
    """ComfyUI's per-step ``callback`` ``(step, x0, x, total)``, followed by a line on the node
    with the step and an ETA (a guided step costs 2-6 plain ones, so a long run says how long
    it has left). Sampling reads no private image: these are public values."""
    import time

    from .inversion_model import duration_text

    started = time.monotonic()

    def report(step, x0, x, total):
        callback(step, x0, x, total)
        done = step + 1
        if 0 < done < total:
            left = (time.monotonic() - started) / done * (total - done)
            comfy_compat.progress_text(
                f"guided sampling: step {done}/{total}, about {duration_text(left)} left", node_id
            )

    return report


def _run_sampler(
    model,
    positive,
    negative,
    latent: dict,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float,
    recurrence: int,
    after_each_call,
    node_id=None,
) -> torch.Tensor:
    """ComfyUI's sampling with ``model`` (already guided); self-recurrence as in the module doc.

    Returns the sampled latent (VAE space, like KSampler's output).
    """
    import comfy.sample
    import comfy.utils

    from ..dp.guidance import renoise

    latent_image = comfy_compat.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    common = dict(
        model=model,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        denoise=denoise,
    )
    if recurrence == 0:
        callback = _with_eta(comfy_compat.sampling_callback(model, steps), node_id)
        try:
            return comfy.sample.sample(
                noise=noise,
                latent_image=latent_image,
                noise_mask=latent.get("noise_mask"),
                callback=callback,
                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                seed=seed,
                **common,
            )
        finally:
            after_each_call()

    sigmas = comfy_compat.sampling_sigmas(
        model, steps=steps, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise
    )
    step_count = len(sigmas) - 1
    total = step_count * (recurrence + 1)
    preview = _with_eta(comfy_compat.sampling_callback(model, total), node_id)
    # The re-noising noise is public sampling randomness, reproducible from the workflow seed.
    generator = torch.Generator(device="cpu").manual_seed(seed % SEED_MODULUS)
    latent_in = model.model.process_latent_in
    latent_out = model.model.process_latent_out
    zeros = torch.zeros_like(noise)
    x = latent_image
    done = 0
    for i in range(step_count):
        for repeat in range(recurrence + 1):

            def callback(step, x0, x_now, _total, _offset=done):
                preview(_offset + step, x0, x_now, total)

            try:
                x_next = comfy.sample.sample(
                    noise=noise if (i == 0 and repeat == 0) else zeros,
                    latent_image=x,
                    disable_noise=not (i == 0 and repeat == 0),
                    start_step=i,
                    last_step=i + 1,
                    callback=callback,
                    disable_pbar=True,
                    seed=(seed + done) % SEED_MODULUS,
                    **common,
                )
            finally:
                after_each_call()
            done += 1
            if repeat < recurrence:
                fresh = torch.randn(x_next.shape, generator=generator, dtype=torch.float32)
                noisy = renoise(
                    latent_in(x_next.float()),
                    float(sigmas[i + 1]),
                    float(sigmas[i]),
                    fresh.to(x_next.device),
                )
                x = latent_out(noisy).to(x_next.dtype)
            else:
                x = x_next
    return x


NODE_CLASS_MAPPINGS = {"DPAdaptUniversalGuidanceSampler": UniversalGuidanceSamplerNode}
NODE_DISPLAY_NAME_MAPPINGS = {"DPAdaptUniversalGuidanceSampler": "Universal Guidance Sampler"}
