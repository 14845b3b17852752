"""Pictures of the Pareto toy (:mod:`taskbalance.problems.pareto_toy`): every method's
trajectories over the loss contours, as in Fig. 1 of the CAGrad paper and Fig. 2 of the
Nash-MTL paper, and the same trajectories in loss space (L1 against L2) with the front."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from taskbalance.compare.problem import RunResult
from taskbalance.problems.pareto_toy import balanced_distance, pareto_theta2, toy_losses

if TYPE_CHECKING:
    from taskbalance.problems.pareto_toy import ParetoToy

GRID = 241  #: contour grid points per axis over [−10, 10]
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


def _panels(count: int) -> tuple[Figure, list]:
    cols = min(count, 5)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(3.1 * cols, 3.1 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes[count:]:
        ax.axis("off")
    return fig, axes[:count]


def _front(scale: tuple[float, float], points: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto set in θ space ``(points, 2)`` and in loss space ``(points, 2)``."""
    s = torch.linspace(-7.0, 7.0, points, dtype=torch.float64)
    theta = torch.stack([s, pareto_theta2(s)], dim=1)
    return theta.numpy(), toy_losses(theta, scale).numpy()


def _runs(results: dict[str, list[RunResult]]) -> list[tuple[str, RunResult]]:
    return [(method, runs[0]) for method, runs in results.items() if runs]


def plot_toy_comparison(
    problem: ParetoToy, results: dict[str, list[RunResult]], out_dir: Path
) -> list[Path]:
    """Write ``pareto_<problem>.png`` (θ space) and ``pareto_<problem>_losses.png``.

    One panel per method (its first run): the contours of the mean of the two losses as
    optimised, the Pareto set (grey), the balanced optimum (star), the start points (black
    dots) and each start's trajectory, ending in a dot when it reached the front and a cross
    when not. Returns the paths written (none when ``results`` is empty).
    """
    runs = _runs(results)
    if not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = problem.setup.scale
    return [
        _theta_space(problem, runs, scale, out_dir / f"pareto_{problem.name}.png"),
        _loss_space(problem, runs, scale, out_dir / f"pareto_{problem.name}_losses.png"),
    ]


def _theta_space(problem, runs, scale, path: Path) -> Path:
    axis = torch.linspace(-10.0, 10.0, GRID, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
    mean = toy_losses(grid, scale).mean(dim=-1).numpy()
    front, _ = _front(scale)
    best = float(pareto_theta2(torch.tensor(0.0)))
    fig, axes = _panels(len(runs))
    for ax, (method, result) in zip(axes, runs):
        ax.contour(axis.numpy(), axis.numpy(), mean, levels=14, cmap="viridis", linewidths=0.7)
        ax.plot(front[:, 0], front[:, 1], color="0.55", lw=5, alpha=0.6, zorder=1)
        ax.plot(0.0, best, marker="*", color="black", ms=11, zorder=5)
        for i, s in enumerate(result.extras["starts"].values()):
            line = np.asarray(s["trajectory"])
            color = COLORS[i % len(COLORS)]
            start = f"({s['start'][0]:g}, {s['start'][1]:g})"
            ax.plot(line[:, 0], line[:, 1], color=color, lw=1.3, zorder=3, label=start)
            ax.plot(*s["start"], marker="o", color="black", ms=5, zorder=4)
            end = "o" if s["front_reached"] else "X"
            ax.plot(*s["theta"], marker=end, color=color, mec="black", ms=7, zorder=6)
        reached = int(result.metrics["front_reached"])
        ax.set_title(f"{method} ({reached}/{len(result.extras['starts'])} on front)", fontsize=9)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="upper center", title="start", title_fontsize=6)
    what = "(L1 + L2)/2" if scale == (1.0, 1.0) else f"({scale[0]:g} L1 + {scale[1]:g} L2)/2"
    fig.suptitle(
        f"{problem.setup.paper} toy set-up: trajectories over the contours of {what}\n"
        "grey: Pareto set, star: balanced optimum, dot: start / reached the front, "
        "X: did not reach it",
        fontsize=10,
    )
    fig.savefig(path, dpi=90)
    return path


def _loss_space(problem, runs, scale, path: Path) -> Path:
    _, front = _front(scale)
    fig, axes = _panels(len(runs))
    for ax, (method, result) in zip(axes, runs):
        ax.plot(front[:, 0], front[:, 1], color="0.55", lw=4, alpha=0.6, zorder=1)
        for i, s in enumerate(result.extras["starts"].values()):
            losses = toy_losses(torch.tensor(s["trajectory"], dtype=torch.float64), scale)
            color = COLORS[i % len(COLORS)]
            ax.plot(losses[:, 0], losses[:, 1], color=color, lw=1.2, zorder=3)
            end = "o" if s["front_reached"] else "X"
            ax.plot(*s["losses"], marker=end, color=color, mec="black", ms=7, zorder=6)
        dist = balanced_distance(
            torch.tensor([s["theta"] for s in result.extras["starts"].values()])
        )
        ax.set_title(f"{method} (mean dist. to star {float(dist.mean()):.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
    names = ("L1", "L2") if scale == (1.0, 1.0) else (f"{scale[0]:g} L1", f"{scale[1]:g} L2")
    fig.supxlabel(names[0])
    fig.supylabel(names[1])
    fig.suptitle(
        f"{problem.setup.paper} toy set-up in loss space (grey: Pareto front)", fontsize=10
    )
    fig.savefig(path, dpi=90)
    return path
