"""The privacy–utility picture of the DP Privacy Planner node, drawn with matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..dp.planner import CurvePoint, LedgerBalance

WIDTH_INCHES, HEIGHT_INCHES, DPI = 6.4, 4.0, 100


def privacy_utility_plot(
    points: Sequence[CurvePoint],
    *,
    epsilon: float,
    balance: LedgerBalance,
    dataset_size: int,
    dimension: int,
    sampling_rate: float,
    delta: float,
) -> np.ndarray:
    """Expected noise / signal against epsilon, this pack's calibration and the paper's, with
    the chosen epsilon and what the ledger still allows marked. An (H, W, 3) float array in
    [0, 1], ComfyUI's IMAGE layout without the batch axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epsilons = [p.epsilon for p in points]
    axes.plot(
        epsilons,
        [p.relative_noise for p in points],
        "o-",
        color="#1f5fa8",
        label="this pack (exact PLD accounting, add/remove)",
    )
    paper = [(p.epsilon, p.paper_relative_noise) for p in points if p.paper_relative_noise]
    if paper:
        axes.plot(
            *zip(*paper, strict=True),
            "s--",
            color="#b5651d",
            label="paper's calibration (classical bound, replace-one)",
        )
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes.text(epsilons[0] if epsilons else 0.25, 1.03, "noise = signal", color="grey", fontsize=8)
    axes.axvline(epsilon, color="#2e8b57", linewidth=1.5, label=f"chosen epsilon {epsilon:g}")
    allowed = balance.next_release_epsilon
    if allowed is not None and epsilons:
        right = max(max(epsilons), epsilon) * 1.2
        if allowed < right:
            axes.axvspan(
                max(allowed, min(epsilons) / 1.2),
                right,
                color="#c0392b",
                alpha=0.12,
                label=f"beyond what the ledger allows next (<= {allowed:.3g})",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    ticks = [
        t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if epsilons and min(epsilons) <= t <= max(epsilons)
    ]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.set_xlabel("epsilon per release")
    axes.set_ylabel("expected noise / signal bound")
    axes.set_title(
        f"n_hat={dataset_size}, D={dimension}, q={sampling_rate:g}, delta={delta:g}; "
        f"spent {balance.spent:.3g} of {balance.total.epsilon:g}",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255.0
    return rgba[..., :3].copy()
