"""Train the demo model on the synthetic styles world: ``python demo/train_demo_model.py``.

Writes ``demo/weights/dp_adapt_demo.safetensors`` (UNet, CLIP text encoder, VAE, CLIP vision
tower; float16) and ``demo/weights/style_classifier.safetensors``, with the training record
(seed, steps, timings, the positive control) in the file metadata and in
``demo/weights/training_record.json``.

The components are ComfyUI's own modules (``nodes/demo_model.py`` fixes their sizes) and the
diffusion loss is the pack's own (``nodes/inversion_model.make_denoise_loss``: eps-MSE in
ComfyUI's sigma parametrisation, SD1.x's noise schedule), so what is trained here is exactly
what ComfyUI samples. Phases, each logged with its timing:

1. style classifier on augmented renders (the fidelity meter; held-out accuracy gated >= 95%);
2. VAE (AutoencoderKL, 64 px -> 8 x 8 x 4), then its latent scale folded into its weights so
   that SD1.x's latent factor 0.18215 gives unit-variance latents;
3. UNet + text encoder from scratch with an EMA of the weights; every ``--eval-every`` steps
   the EMA weights are sampled through ComfyUI's KSampler for captions naming each training
   style and classified (the positive control); the best EMA weights are kept;
4. CLIP vision tower, contrastively against the (frozen) text encoder's caption features;
5. the held-out words (``world.ERASED_WORDS``: "dotted", "star") erased from the text
   encoder's token embedding (their rows set to the vocabulary's mean row), with the
   held-out style's reachability measured before and after (the world check).

Reproducibility: everything is drawn from ``--seed`` (default 0); on the same torch version
and thread count the run repeats. Measured on a 2-core CPU: see training_record.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import bootstrap_comfyui  # noqa: E402

WEIGHTS_DIR = ROOT / "demo" / "weights"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", type=int, default=24_000, help="rendered training pictures")
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--vae-steps", type=int, default=1_000)
    parser.add_argument("--unet-steps", type=int, default=12_000)
    parser.add_argument("--vision-steps", type=int, default=1_500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=1_500)
    parser.add_argument("--stop-at", type=float, default=0.95, help="stop once control >= this")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bootstrap_comfyui(cuda=torch.cuda.is_available(), prefix="dp_adapt_demo_train_")
    import comfy.cli_args
    import comfy.utils

    from comfyui_dp_adapt.demo import style_classifier, world
    from comfyui_dp_adapt.demo.evaluation import positive_control
    from comfyui_dp_adapt.nodes import demo_model

    comfy.utils.PROGRESS_BAR_ENABLED = False  # the sampler's bars would drown the log

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    record: dict = {
        "seed": args.seed,
        "arguments": {k: _public_argument(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "phases": {},
    }
    torch.manual_seed(args.seed)

    # 1. The fidelity meter first: nothing else is worth training if it cannot measure.
    classifier_path = args.out / "style_classifier.safetensors"
    start = time.monotonic()
    if classifier_path.exists():
        classifier = style_classifier.load_style_classifier(classifier_path)
        log("classifier: reusing " + classifier_path.name)
    else:
        classifier, metrics = style_classifier.train_style_classifier(
            args.seed, steps=args.classifier_steps, log=log
        )
        log(f"classifier: {metrics}")
        if metrics["held_out_clean_accuracy"] < 0.95:
            raise SystemExit("style classifier below 95% on held-out renders: stop")
        save_file(classifier.state_dict(), classifier_path, {"dp_adapt.metrics": metrics})
        record["phases"]["classifier"] = metrics
    classifier.eval()

    rng = np.random.default_rng([args.seed, 10])
    log(f"rendering {args.dataset} training pictures")
    specs = world.sample_specs(rng, args.dataset, subjects=world.TRAINING_SUBJECTS)
    pixels = torch.from_numpy(world.render_batch(specs, rng))  # uint8 (N, H, W, 3)

    # Train in float32 throughout (ComfyUI's default text-encoder dtype on a CPU is float16,
    # where Adam's epsilon underflows).
    comfy.cli_args.args.fp32_text_enc = True
    model, clip, vae, vision = demo_model.build_components(seed=args.seed)
    for component in (clip.cond_stage_model, vae.first_stage_model, vision.model):
        component.float()

    # 2. VAE.
    vae_state = work / "vae.safetensors"
    start = time.monotonic()
    if vae_state.exists():
        load_into(vae.first_stage_model, vae_state)
        log("vae: reusing " + vae_state.name)
    else:
        vae_metrics = train_vae(vae.first_stage_model, pixels, args)
        fold_latent_scale(vae.first_stage_model, pixels)
        save_file(vae.first_stage_model.state_dict(), vae_state, {})
        vae_metrics["seconds"] = round(time.monotonic() - start, 1)
        record["phases"]["vae"] = vae_metrics
    latents = encode_dataset(model, vae.first_stage_model, pixels)
    log(f"latents: {tuple(latents.shape)}, std {latents.std().item():.3f}")

    # 3. UNet + text encoder.
    start = time.monotonic()
    captions_rng = np.random.default_rng([args.seed, 11])
    control = train_unet_and_text(
        model, clip, vae, classifier, latents, specs, captions_rng, args, work
    )
    control["seconds"] = round(time.monotonic() - start, 1)
    record["phases"]["unet_text"] = control

    # 4. CLIP vision tower.
    start = time.monotonic()
    vision_metrics = train_vision(vision, clip, pixels, specs, args)
    vision_metrics["seconds"] = round(time.monotonic() - start, 1)
    record["phases"]["vision"] = vision_metrics

    # 5. Erase the held-out words; measure that dots are reachable before and not asked for
    # after (the world check: the private style must not be the model's default).
    start = time.monotonic()
    check = {"before_erasing": world_check(model, clip, vae, classifier, seed=args.seed + 50)}
    check["erased"] = erase_words(clip, world.ERASED_WORDS)
    check["after_erasing"] = world_check(model, clip, vae, classifier, seed=args.seed + 50)
    check["seconds"] = round(time.monotonic() - start, 1)
    record["phases"]["erase_held_out_words"] = check
    log(f"world check: {check}")

    # Ship float16 weights, then measure the positive control on exactly what ships.
    states = demo_model.component_state_dicts(model, clip, vae, vision)
    tensors = {
        demo_model.PREFIXES[name] + key: value.detach().to(torch.float16).contiguous()
        for name, state in states.items()
        for key, value in state.items()
        if torch.is_floating_point(value)
    }
    out_file = args.out / demo_model.WEIGHTS_FILE.name
    save_file(tensors, out_file, {"dp_adapt.training": record})
    shipped = demo_model.load_demo_model(out_file)
    final = positive_control(*shipped[:3], classifier, seed=args.seed + 99, per_style=48)
    record["positive_control_shipped"] = final
    log(f"positive control on the shipped float16 weights: {final['accuracy']:.3f}")
    save_file(tensors, out_file, {"dp_adapt.training": record})
    (args.out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out_file} ({out_file.stat().st_size / 1e6:.1f} MB)")
    return 0 if final["accuracy"] >= 0.8 else 1


def train_vae(autoencoder, pixels, args) -> dict:
    """Reconstruction (L1 + MSE) with a tiny KL term, on sampled latents."""
    from comfyui_dp_adapt.nodes.inversion_model import make_autograd_safe

    make_autograd_safe(autoencoder)
    autoencoder.requires_grad_(True).train()
    optimiser = torch.optim.AdamW(autoencoder.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = cosine_with_warmup(optimiser, args.vae_steps, warmup=200)
    generator = torch.Generator().manual_seed(args.seed + 20)
    for step in range(args.vae_steps):
        index = torch.randint(len(pixels), (16,), generator=generator)
        x = pixels[index].permute(0, 3, 1, 2).float() / 127.5 - 1
        moments = autoencoder.quant_conv(autoencoder.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        out = autoencoder.decoder(autoencoder.post_quant_conv(z))
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = (out - x).abs().mean() + ((out - x) ** 2).mean() + 1e-5 * kl
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"  vae step {step + 1}/{args.vae_steps} loss {loss.item():.4f}")
    autoencoder.requires_grad_(False).eval()
    return {"steps": args.vae_steps, "final_loss": round(loss.item(), 5)}


@torch.no_grad()
def fold_latent_scale(autoencoder, pixels) -> None:
    """Scale the latent space so SD1.x's factor 0.18215 gives unit variance (exactly
    compensated in the decoder's first convolution)."""
    means = _latent_means(autoencoder, pixels[:2048])
    factor = (1 / 0.18215) / means.std().item()
    channels = means.shape[1]
    autoencoder.quant_conv.weight[:channels] *= factor
    autoencoder.quant_conv.bias[:channels] *= factor
    autoencoder.quant_conv.bias[channels:] += 2 * math.log(factor)
    autoencoder.post_quant_conv.weight /= factor
    log(f"  latent scale folded: x{factor:.3f}")


@torch.no_grad()
def _latent_means(autoencoder, pixels) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), 256):
        x = pixels[i : i + 256].permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(autoencoder.quant_conv(autoencoder.encoder(x)).chunk(2, dim=1)[0])
    return torch.cat(out)


@torch.no_grad()
def encode_dataset(model, autoencoder, pixels) -> torch.Tensor:
    """Posterior means in the diffusion model's space (SD1.x latent factor applied)."""
    return model.model.process_latent_in(_latent_means(autoencoder, pixels))


def training_caption(spec, rng) -> str:
    """Captions name the style most of the time (style words are learned last), the held-out
    style and subject included (their words are erased after training); 12% name no style,
    evenly over all six styles, so a style-less prompt has no default style; 10% are empty
    for classifier-free guidance."""
    from comfyui_dp_adapt.dp.templates import STYLE_TEMPLATES

    draw = rng.random()
    if draw < 0.1:
        return ""
    plain = f"a {spec.colour} {spec.subject}"
    if draw < 0.65:
        return spec.caption()
    if draw < 0.88:
        template = STYLE_TEMPLATES[int(rng.integers(len(STYLE_TEMPLATES)))]
        return template.format(spec.style)
    return plain


class CaptionIds:
    """Token ids of captions (the pack's own tokenisation, 77 tokens, SD1 padding), cached."""

    def __init__(self, clip):
        from comfyui_dp_adapt.nodes import inversion_model

        self._clip = clip
        self._family = inversion_model.SD1
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        from comfyui_dp_adapt.nodes import inversion_model

        tok = inversion_model.tokenizers(self._clip, self._family)[0]
        for caption in set(captions) - self._cache.keys():
            ids = tok.tokenizer(caption)["input_ids"][: tok.max_length]
            ids = ids + [tok.end_token] * (tok.max_length - len(ids))  # SD1 pads with end
            self._cache[caption] = torch.tensor(ids)
        return torch.stack([self._cache[c] for c in captions])


def train_unet_and_text(model, clip, vae, classifier, latents, specs, rng, args, work) -> dict:
    from comfyui_dp_adapt.demo.evaluation import positive_control
    from comfyui_dp_adapt.nodes import inversion_model

    text_forward = inversion_model.make_text_forward(clip, inversion_model.SD1)
    denoise_loss = inversion_model.make_denoise_loss(model)
    unet = model.model.diffusion_model
    text_model = inversion_model.text_encoders(clip, inversion_model.SD1)[0].transformer.text_model
    modules = (unet, text_model)
    for module in modules:
        module.requires_grad_(True).train()
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = cosine_with_warmup(optimiser, args.unet_steps, warmup=500)
    ids_of = CaptionIds(clip)
    generator = torch.Generator().manual_seed(args.seed + 30)
    empty_vectors = torch.zeros((0, demo_width(clip)))
    history, best = [], {"accuracy": -1.0}
    for step in range(args.unet_steps):
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        ids = ids_of([training_caption(specs[i], rng) for i in index.tolist()])
        # Each distinct caption of the batch goes through the text encoder once.
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
        mask = torch.zeros(unique.shape, dtype=torch.bool)
        context = text_forward(unique, mask, empty_vectors)[inverse]
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator).float()
        noise = torch.randn(latents[index].shape, generator=generator)
        loss = denoise_loss(latents[index], context, timesteps, noise).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, params, strict=True):
                average.lerp_(p.detach(), 1 - decay)
        if (step + 1) % 250 == 0:
            log(f"  unet step {step + 1}/{args.unet_steps} loss {loss.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps:
            live = [p.detach().clone() for p in params]
            swap_in(params, ema)
            for module in modules:
                module.eval()
            result = positive_control(model, clip, vae, classifier, seed=args.seed + 7)
            result["step"] = step + 1
            history.append(result)
            log(
                f"  positive control at step {step + 1}: {result['accuracy']:.3f} {result['per_style']}"
            )
            if result["accuracy"] > best["accuracy"]:
                best = {**result, "weights": [p.detach().clone() for p in params]}
                save_file(  # survives a kill
                    {str(i): w for i, w in enumerate(best["weights"])},
                    work / "best_unet_text.safetensors",
                    {"positive_control": result},
                )
            swap_in(params, live)
            for module in modules:
                module.train()
            if result["accuracy"] >= args.stop_at or (work / "STOP").exists():
                break  # good enough, or asked to stop (touch work/STOP)
    swap_in(params, best.pop("weights"))
    for module in modules:
        module.requires_grad_(False).eval()
    return {"steps_run": step + 1, "best": best, "history": history}


def demo_width(clip) -> int:
    from comfyui_dp_adapt.nodes import inversion_model

    encoder = inversion_model.text_encoders(clip, inversion_model.SD1)[0]
    return encoder.transformer.get_input_embeddings().weight.shape[1]


@torch.no_grad()
def swap_in(params, values) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def train_vision(vision, clip, pixels, specs, args) -> dict:
    """Contrastive (InfoNCE) image-caption training of the vision tower against the frozen
    text encoder's mean caption features; captions name every style, dotted included."""
    import comfy.clip_vision

    from comfyui_dp_adapt.nodes import inversion_model

    inversion_model.make_autograd_safe(vision.model)
    vision.model.requires_grad_(True).train()
    text_forward = inversion_model.make_text_forward(clip, inversion_model.SD1)
    ids_of = CaptionIds(clip)
    empty_vectors = torch.zeros((0, demo_width(clip)))
    optimiser = torch.optim.AdamW(vision.model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = cosine_with_warmup(optimiser, args.vision_steps, warmup=100)
    generator = torch.Generator().manual_seed(args.seed + 40)
    temperature = 0.07
    for step in range(args.vision_steps):
        index = torch.randint(len(pixels), (args.batch,), generator=generator)
        captions = [
            f"a {specs[i].colour} {specs[i].subject} in the style of {specs[i].style}"
            for i in index.tolist()
        ]
        ids = ids_of(captions)
        with torch.no_grad():
            hidden = text_forward(ids, torch.zeros(ids.shape, dtype=torch.bool), empty_vectors)
            length = (ids != ids[0, -1]).sum(dim=1, keepdim=True).clamp(min=1)
            keep = (torch.arange(ids.shape[1])[None, :] < length).unsqueeze(-1)
            text = (hidden * keep).sum(dim=1) / length
        images = pixels[index].float() / 255
        pixel_values = comfy.clip_vision.clip_preprocess(images, size=224)
        # ComfyUI's CLIP layers add residuals in place: clone what autograd saves.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            image = vision.model(pixel_values=pixel_values)[2]
        logits = (
            torch.nn.functional.normalize(image, dim=-1)
            @ torch.nn.functional.normalize(text, dim=-1).T
        ) / temperature
        same = torch.tensor([[c == d for d in captions] for c in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            log(f"  vision step {step + 1}/{args.vision_steps} loss {loss.item():.4f}")
    vision.model.requires_grad_(False).eval()
    return {"steps": args.vision_steps, "final_loss": round(loss.item(), 4)}


WORLD_CHECK_PROMPTS = {
    "named": "{} in the style of dotted",  # before erasing: is the style reachable?
    "no style word": "{}",
}


def world_check(model, clip, vae, classifier, *, seed: int, per_prompt: int = 4) -> dict:
    """Dotted fraction of pictures for prompts naming "dotted" and naming no style."""
    from comfyui_dp_adapt.demo import evaluation, world

    out = {}
    for name, template in WORLD_CHECK_PROMPTS.items():
        prompts = evaluation.subject_prompts(template, seed)
        images = evaluation.generate(model, clip, vae, prompts, per_prompt=per_prompt, seed=seed)
        out[name] = {
            "dotted": round(evaluation.style_fraction(classifier, images, world.HELD_OUT_STYLE), 3),
            "styles": evaluation.style_counts(classifier, images),
        }
    return out


@torch.no_grad()
def erase_words(clip, words) -> dict:
    """Set each word's token-embedding row to the vocabulary's mean row: the word then asks
    for nothing, while what the UNet learned from it stays reachable to textual inversion."""
    from comfyui_dp_adapt.nodes import inversion_model

    tok = inversion_model.tokenizers(clip, inversion_model.SD1)[0]
    encoder = inversion_model.text_encoders(clip, inversion_model.SD1)[0]
    table = encoder.transformer.get_input_embeddings().weight
    mean = table.mean(dim=0)
    erased = {}
    for word in words:
        ids = tok.tokenizer(word)["input_ids"][1:-1]  # without start and end tokens
        if len(ids) != 1:
            raise SystemExit(f"{word!r} is not one token ({ids}); choose another held-out word")
        erased[word] = ids[0]
        table[ids[0]] = mean
    return erased


def _public_argument(value) -> str:
    """Arguments as recorded: paths relative to the repository (no machine's folders)."""
    if isinstance(value, Path):
        try:
            return value.relative_to(ROOT).as_posix()
        except ValueError:
            return value.name
    return str(value)


def cosine_with_warmup(optimiser, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def save_file(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file as write

    tmp = path.with_suffix(".tmp")
    write(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={k: json.dumps(v) for k, v in metadata.items()},
    )
    tmp.replace(path)


def load_into(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    from comfyui_dp_adapt.nodes.inversion_model import make_autograd_safe

    make_autograd_safe(module)
    module.load_state_dict(load_file(str(path)))


if __name__ == "__main__":
    raise SystemExit(main())
