"""Choose the token quick start's seeds and settings by measurement: ``python bench/quick_start_sweep.py``.

The README's first command releases a DPAgg-TI token (epsilon = 1, n_hat = 100) from the
demo's built-in collection of 100 dotted renders, saves 4 pictures of "a red circle" in its
style and previews it on four subjects (a red circle, a blue square, a green triangle, a
yellow diamond). What the artist sees depends on the seeds and on the settings (training
steps, learning rate, the per-image bound C, the sampler's CFG). Stages:

0. Seeds, from public prompts only (before any token exists): each output takes the first
   seed from the old one where the demo model draws its subjects in every named training
   style as that style and as a whole shape; some noises break the model's shapes whatever
   the prompt, which no token can fix.
1. Settings: per-image tokens trained once per (steps, learning rate); for every C and CFG
   one fresh epsilon = 1 release (the bench's DPAgg-TI, ``bench/reproduce_paper.py``) drawn
   on the four subjects from SELECTION seeds (5000 on), which the workflow never uses, so
   the choice is not fitted to the pictures it is then judged on. Score: (red-circle
   fraction + all-subject fraction) / 2 by the style classifier, since the saved pictures
   are circles and the preview shows all four.
2. The best ``--shortlist`` again on fresh releases, more pictures, new seeds. Chosen: the
   fewest steps within ``TOLERANCE`` of the best score.
3. The workflow's own outputs on the chosen seeds for every short-listed setting, and what
   the workflow ships now, ``--workflow-releases`` releases each: how many releases show the
   style on at least 3 of 4 saved pictures and preview subjects, by the classifier and by
   the hand-written dot detector. Reported, not used to choose.

The demo collection is public (rendered by the project; it stands in for private pictures),
so choosing the demo's settings on it spends no one's privacy. A real private set gets its
settings from public pictures, never from itself (docs/reproduction.md).

Writes ``results/quick_start_sweep.json`` and prints stage 2's table and stage 3's counts;
about 10 minutes on 2 cores (611 s on 2026-12-03).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import reproduce_paper as rp  # noqa: E402
import torch  # noqa: E402
from _setup import bootstrap_comfyui  # noqa: E402

SUBJECTS = ("a red circle", "a blue square", "a green triangle", "a yellow diamond")
SELECTION_SEED = 5000  # far from the workflow's seeds (123456 on, 0 on)
N_HAT = 100
EPSILON = 1.0
DATA_SEED = 777  # the demo collection's renders (any fixed public seed)
WORKFLOW = ROOT / "workflows" / "Private style token (DP textual inversion).json"
SAVED_SEED = 123456  # where the search for the saved pictures' seed starts (4 red circles)
PREVIEW_SEED = 0  # where the search for the preview's seed starts (subject i from seed + i)
SEED_TRIES = 50
# Renders of convex subjects fill > 0.9 of their hull (demo/star_detector.py); the model's
# soft edges cost a little. Seed 1 draws every subject in every style at 0.43-0.84.
CLEAN_SOLIDITY = 0.85
# A score from 36 pictures a subject has a standard error of about 0.08: a setting within
# 0.05 of the best is not told apart from it, and the cheaper one is preferred.
TOLERANCE = 0.05


def setting(steps: int, learning_rate: float, clip_norm: float, cfg: float) -> dict:
    return {"steps": steps, "learning_rate": learning_rate, "clip_norm": clip_norm, "cfg": cfg}


def shipped_setting() -> dict:
    """The settings the workflow ships for the demo model (``extra.dp_adapt_demo``)."""
    demo = json.loads(WORKFLOW.read_text())["extra"]["dp_adapt_demo"]
    return setting(demo["4.steps"], demo["4.learning_rate"], demo["4.clip_norm"], demo["8.cfg"])


def shipped_seeds() -> dict:
    """The seeds the workflow ships for the demo: ``extra.dp_adapt_demo``'s, else the
    widgets' (KSampler, node 8; the preview, node 14)."""
    workflow = json.loads(WORKFLOW.read_text())
    demo = workflow["extra"]["dp_adapt_demo"]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    return {
        "saved": demo.get("8.seed", nodes[8]["widgets_values"][0]),
        "preview": demo.get("14.seed", nodes[14]["widgets_values"][5]),
    }


def per_image_tokens(world_, latents, steps: int, rate: float, trained: dict) -> torch.Tensor:
    """The 100 per-image tokens for (steps, rate), trained once (fixed public seeds)."""
    if (steps, rate) not in trained:
        rp.TI_STEPS, rp.TI_LEARNING_RATE = steps, rate
        tick = time.monotonic()
        trained[steps, rate] = rp.train_per_image(world_, latents, DATA_SEED)
        rp.log(f"steps {steps}, rate {rate}: trained in {time.monotonic() - tick:.0f} s")
    return trained[steps, rate]


def draw(
    world_, token: torch.Tensor, cfg: float, per_subject: int, seed: int, subjects=SUBJECTS
) -> torch.Tensor:
    """``per_subject`` pictures of each subject "in the style of" the token; subject i is
    sampled from ``seed + i`` (as the preview node and ``evaluation.generate`` do)."""
    from safetensors.torch import save_file

    from comfyui_dp_adapt.demo import evaluation

    world_._names += 1
    name = f"sweep_token_{world_._names}"
    save_file(
        {"emb_params": token.reshape(1, -1).float().contiguous()},
        str(world_.embeddings_dir / f"{name}.safetensors"),
    )
    prompts = [f"{subject} in the style of embedding:{name}" for subject in subjects]
    return evaluation.generate(
        world_.model, world_.clip, world_.vae, prompts, per_prompt=per_subject, seed=seed, cfg=cfg
    )


def measure(world_, images: torch.Tensor, per_subject: int) -> dict:
    from comfyui_dp_adapt.demo import dot_detector, world

    dotted = world.STYLES.index(rp.HELD_OUT)
    hits = (world_.classifier.predict(images) == dotted).reshape(len(SUBJECTS), per_subject)
    by_subject = [float(row.float().mean()) for row in hits]
    overall = float(hits.float().mean())
    return {
        "classifier": overall,
        "classifier_by_subject": by_subject,
        # The quick start shows two things: 4 saved red circles and one picture per subject.
        "score": (by_subject[0] + overall) / 2,
        "detector": dot_detector.dotted_fraction(images),
    }


def draws_every_public_style(world_, seed: int, per_subject: int, subjects) -> bool:
    """True when the demo model, asked by name for each public training style, draws every
    picture of ``subjects`` from ``seed`` in that style (by the classifier) and as a whole
    convex shape (silhouette solidity >= ``CLEAN_SOLIDITY``, ``demo/star_detector.py``). A
    property of the model and the public words only: no token, no private picture. Sampled
    at the evaluation's CFG (3): the seeds are fixed before any setting, CFG included, is
    chosen."""
    from comfyui_dp_adapt.demo import evaluation, star_detector, world

    for index, style in enumerate(world.TRAINING_STYLES):
        prompts = [f"{subject} in the style of {style}" for subject in subjects]
        images = evaluation.generate(
            world_.model, world_.clip, world_.vae, prompts, per_prompt=per_subject, seed=seed
        )
        if not bool((world_.classifier.predict(images) == index).all()):
            return False
        for image in images:
            value = star_detector.solidity(image.numpy())
            if value is None or value < CLEAN_SOLIDITY:
                return False
    return True


def public_seeds(world_) -> dict:
    """Stage 0: the workflow's seeds. Some starting noises break the demo model's shapes
    whatever the prompt (from seed 1 it draws every subject in every named style as a
    broken blob; seed 123456's third picture is a blob in every style), which no token can
    fix. Each output takes the first seed from its start where the model draws every public
    style cleanly; chosen before any token exists, so it cannot favour one."""
    found = {}
    for key, start, per_subject, subjects in (
        ("saved", SAVED_SEED, 4, SUBJECTS[:1]),
        ("preview", PREVIEW_SEED, 1, SUBJECTS),
    ):
        for seed in range(start, start + SEED_TRIES):
            if draws_every_public_style(world_, seed, per_subject, subjects):
                found[key] = seed
                break
        else:
            raise RuntimeError(f"no clean {key} seed in {start}..{start + SEED_TRIES - 1}")
        rp.log(f"{key} seed: {found[key]} (searched from {start})")
    return found


def choose(confirmed: list[dict]) -> dict:
    """The cheapest confirmed setting (fewest training steps: the README's first command
    must finish within 5 minutes on a fresh machine) whose score is within ``TOLERANCE`` of
    the best; ties by score, then the detector."""
    best = max(row["score"] for row in confirmed)
    near = [row for row in confirmed if row["score"] >= best - TOLERANCE]
    return min(near, key=lambda r: (r["steps"], -r["score"], -r["detector"]))


def pick(row: dict) -> dict:
    return setting(row["steps"], row["learning_rate"], row["clip_norm"], row["cfg"])


def sweep(world_, latents, args, trained: dict) -> list[dict]:
    """Stage 1: every (steps, rate, C, CFG), one release each, ``--per-subject`` pictures."""
    rows = []
    for steps in args.steps:
        for rate in args.learning_rates:
            vectors = per_image_tokens(world_, latents, steps, rate, trained)
            moves = (vectors - world_.initial.reshape(1, -1)).norm(dim=1)
            for clip_norm in args.clip_norms:
                token = rp.dpagg_release(world_, vectors, EPSILON, clip_norm, N_HAT)
                for cfg in args.cfgs:
                    images = draw(world_, token, cfg, args.per_subject, SELECTION_SEED)
                    row = {
                        **setting(steps, rate, clip_norm, cfg),
                        "median_move": float(moves.median()),
                        **measure(world_, images, args.per_subject),
                    }
                    rows.append(row)
                    rp.log(json.dumps(row))
    return sorted(rows, key=lambda r: (-r["score"], -r["detector"]))


def confirm(world_, latents, chosen: dict, args, trained: dict) -> dict:
    """Stage 2: a short-listed setting again, fresh releases, more pictures, new seeds."""
    vectors = per_image_tokens(world_, latents, chosen["steps"], chosen["learning_rate"], trained)
    runs = []
    for release in range(args.confirm_releases):
        token = rp.dpagg_release(world_, vectors, EPSILON, chosen["clip_norm"], N_HAT)
        seed = SELECTION_SEED + 1000 * (release + 1)
        images = draw(world_, token, chosen["cfg"], args.confirm_per_subject, seed)
        runs.append(measure(world_, images, args.confirm_per_subject))
    out = {**pick(chosen)}
    for key in ("score", "classifier", "detector"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    out["classifier_by_subject"] = [
        sum(r["classifier_by_subject"][i] for r in runs) / len(runs) for i in range(len(SUBJECTS))
    ]
    rp.log(f"confirmed: {json.dumps(out)}")
    return out


def workflow_outputs(
    world_, latents, chosen: dict, seeds: dict, releases: int, trained: dict
) -> dict:
    """Stage 3: the workflow's own outputs (4 saved red circles from ``seeds["saved"]``; the
    preview's four subjects from ``seeds["preview"]`` + i) for ``releases`` fresh releases,
    as the artist would see them."""
    from comfyui_dp_adapt.demo import dot_detector, world

    dotted = world.STYLES.index(rp.HELD_OUT)
    vectors = per_image_tokens(world_, latents, chosen["steps"], chosen["learning_rate"], trained)
    counts = []
    for _ in range(releases):
        token = rp.dpagg_release(world_, vectors, EPSILON, chosen["clip_norm"], N_HAT)
        saved = draw(world_, token, chosen["cfg"], 4, seeds["saved"], subjects=SUBJECTS[:1])
        preview = draw(world_, token, chosen["cfg"], 1, seeds["preview"])
        counts.append(
            {
                "saved_classifier": int((world_.classifier.predict(saved) == dotted).sum()),
                "saved_detector": round(dot_detector.dotted_fraction(saved) * 4),
                "preview_classifier": int((world_.classifier.predict(preview) == dotted).sum()),
                "preview_detector": round(dot_detector.dotted_fraction(preview) * 4),
            }
        )
    summary = {f"{key}_at_least_3_of_4": sum(c[key] >= 3 for c in counts) for key in counts[0]}
    out = {**pick(chosen), "seeds": seeds, "releases": releases, "counts": counts, **summary}
    rp.log(f"workflow outputs: {json.dumps(summary)} over {releases} releases for {chosen}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--clip-norms", type=float, nargs="+", default=[1.5, 2.0, 2.57, 3.5, 5.0])
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--per-subject", type=int, default=6, help="pictures per subject")
    parser.add_argument("--shortlist", type=int, default=6, help="settings confirmed")
    parser.add_argument("--confirm-releases", type=int, default=3)
    parser.add_argument("--confirm-per-subject", type=int, default=12)
    parser.add_argument("--workflow-releases", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quick_start_sweep.json")
    args = parser.parse_args(argv)

    bootstrap_comfyui(cuda=torch.cuda.is_available(), prefix="dp_adapt_quick_sweep_")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    started = time.monotonic()
    world_ = rp.World()
    latents = world_.latents(world_.renders(rp.HELD_OUT, N_HAT, DATA_SEED))
    seeds = public_seeds(world_)
    trained: dict = {}
    rows = sweep(world_, latents, args, trained)
    confirmed = sorted(
        (confirm(world_, latents, row, args, trained) for row in rows[: args.shortlist]),
        key=lambda r: (-r["score"], -r["detector"]),
    )
    chosen = choose(confirmed)
    # What the artist would see with every short-listed setting on the chosen seeds (not
    # used to choose), and with what the workflow ships today.
    candidates = [(pick(row), seeds) for row in confirmed]
    if (shipped_setting(), shipped_seeds()) not in candidates:
        candidates.append((shipped_setting(), shipped_seeds()))
    outputs = [
        workflow_outputs(world_, latents, s, s_seeds, args.workflow_releases, trained)
        for s, s_seeds in candidates
    ]
    record = {
        "what": "DPAgg-TI quick-start settings on the demo collection, chosen on selection seeds",
        "rule": "score = (red-circle fraction + all-subject fraction) / 2 by the classifier; "
        "stage 0 the seeds, from public named-style prompts only; stage 1 one release per "
        "setting; stage 2 the shortlist again on fresh releases and seeds; chosen: the fewest "
        f"steps within {TOLERANCE} of stage 2's best score; stage 3 the workflow's outputs on "
        "the chosen seeds for every short-listed setting (not used to choose)",
        "tolerance": TOLERANCE,
        "epsilon": EPSILON,
        "n_hat": N_HAT,
        "subjects": list(SUBJECTS),
        "per_subject": args.per_subject,
        "selection_seed": SELECTION_SEED,
        "sweep": rows,
        "confirmed": confirmed,
        "chosen": chosen,
        "seeds": seeds,
        "workflow_outputs": outputs,
        "seconds": round(time.monotonic() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        "steps  rate   C     cfg   score  classifier  detector  by subject (circle square triangle diamond)"
    )
    for r in confirmed:
        by_subject = " ".join(f"{x:.2f}" for x in r["classifier_by_subject"])
        print(
            f"{r['steps']:<6} {r['learning_rate']:<6} {r['clip_norm']:<5} {r['cfg']:<5} "
            f"{r['score']:.2f}   {r['classifier']:.2f}        {r['detector']:.2f}      {by_subject}"
        )
    for o in outputs:
        print({k: v for k, v in o.items() if k != "counts"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
