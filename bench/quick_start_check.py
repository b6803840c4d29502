"""What the artist sees after the README's first command: ``python bench/quick_start_check.py``.

Runs the README's first command (``run_workflow.py`` on the shipped DP textual-inversion
workflow, demo model, epsilon = 1, n_hat = 100) ``--runs`` times, each into a fresh output
folder (so each is a first release with fresh OS-entropy noise, like a new user's), and reads
its two outputs with both measures of the reproduction (the style classifier and the
hand-written dot detector):

- the saved pictures ("a red circle in the style of" the token, batch 4, the workflow's seed);
- the preview grid (one picture per subject: circle, square, triangle, diamond; 2 x 2 cells).

Prints, per run, how many of the 4 saved pictures and of the 4 preview subjects each
measure calls dotted, and writes ``results/quick_start_check.json``. The target (docs/
reproduction.md): the style on at least 3 of 4 of each, by the classifier and by eye; the
pictures are in the output folders (``--keep``) to be looked at.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _setup  # noqa: E402, F401  (registers the pack as comfyui_dp_adapt)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from comfyui_dp_adapt.demo import dot_detector, evaluation, world  # noqa: E402
from comfyui_dp_adapt.demo.style_classifier import load_style_classifier  # noqa: E402

WORKFLOW = ROOT / "workflows" / "Private style token (DP textual inversion).json"
STYLE = "dotted"


def read_png(path: Path) -> torch.Tensor:
    """IMAGE (H, W, 3) in [0, 1]."""
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255


def grid_cells(grid: torch.Tensor, side: int) -> torch.Tensor:
    """The 2 x 2 preview grid's four cells, each area-resized to the model's ``side`` px."""
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    cells = [grid[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(2) for c in range(2)]
    batch = torch.stack(cells).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(batch, size=(side, side), mode="area").permute(
        0, 2, 3, 1
    )


def measure(images: torch.Tensor, classifier) -> dict:
    predicted = classifier.predict(images).tolist()
    return {
        "classifier": [world.STYLES[i] for i in predicted],
        "classifier_dotted": sum(world.STYLES[i] == STYLE for i in predicted),
        "detector_dotted": round(dot_detector.dotted_fraction(images) * len(images)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="independent first releases")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each run's output folder under this path"
    )
    args = parser.parse_args(argv)
    classifier = load_style_classifier()
    side = evaluation.LATENT_SIDE * 8  # the demo model's pixels per latent side
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="dp_adapt_quick_start_"))
    runs = []
    started = time.monotonic()
    for index in range(args.runs):
        out = scratch / f"run{index + 1}"
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(ROOT / "run_workflow.py"), str(WORKFLOW), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(done.stdout[-2000:] + done.stderr[-2000:])
            print(f"quick_start_check.py: FAILED: run {index + 1} exited {done.returncode}")
            return 1
        saved = torch.stack([read_png(p) for p in sorted((out / "images").glob("*.png"))])
        (grid_path,) = sorted((out / "previews").glob("*.png"))
        preview = grid_cells(read_png(grid_path), side)
        run = {
            "seconds": round(time.monotonic() - began, 1),
            "saved": measure(saved, classifier),
            "preview": measure(preview, classifier),
        }
        runs.append(run)
        print(
            f"run {index + 1}: saved {run['saved']['classifier_dotted']}/4 classifier, "
            f"{run['saved']['detector_dotted']}/4 detector; preview "
            f"{run['preview']['classifier_dotted']}/4 classifier, "
            f"{run['preview']['detector_dotted']}/4 detector "
            f"(preview styles {run['preview']['classifier']})",
            flush=True,
        )
    summary = {
        f"{part} {measure_}": sum(r[part][f"{measure_}_dotted"] >= 3 for r in runs)
        for part in ("saved", "preview")
        for measure_ in ("classifier", "detector")
    }
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "seconds": round(time.monotonic() - started, 1),
        "workflow": WORKFLOW.name,
        "runs": runs,
        "runs_with_at_least_3_of_4": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quick_start_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"runs with >= 3 of 4 dotted, of {len(runs)}: {summary}; pictures in {scratch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
