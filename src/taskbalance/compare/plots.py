"""Pictures of a comparison: task weights over time, loss curves, a Δm% bar chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from taskbalance.compare.report import Row
from taskbalance.compare.runner import BASELINE, Comparison

#: at most this many points per curve (longer histories are averaged in windows).
MAX_POINTS = 400


def _downsample(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window means so that at most :data:`MAX_POINTS` points remain (noisy weights too)."""
    n = len(steps)
    if n <= MAX_POINTS:
        return steps, values
    width = math.ceil(n / MAX_POINTS)
    cut = (n // width) * width
    steps = steps[:cut].reshape(-1, width).mean(axis=1)
    values = values[:cut].reshape(-1, width, values.shape[1]).mean(axis=1)
    return steps, values


def _grid(count: int) -> tuple[int, int]:
    cols = min(count, 5)
    return math.ceil(count / cols), cols


def new_figure(**kw: Any) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def plot_weights(comparison: Comparison, path: Path) -> Path | None:
    """One panel per method: each task's weight against the training step (first seed)."""
    panels = []
    for method in comparison.runs:
        results = comparison.ok(method)
        if results and results[0].histories:
            label, history = next(iter(results[0].histories.items()))
            if len(history):
                panels.append((method, label, history))
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    fig = new_figure(figsize=(3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (method, label, history) in zip(axes.flat, panels):
        steps, weights = _downsample(np.asarray(history.steps), history.weights.numpy())
        for j, task in enumerate(history.tasks):
            ax.plot(steps, weights[:, j], lw=1, label=task)
        title = method if label == "main" else f"{method} ({label})"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("training step")
    fig.supylabel("task weight")
    fig.suptitle(f"{comparison.problem.name}: task weights over training (seed of first run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_losses(comparison: Comparison, path: Path) -> Path | None:
    """One panel per task: mean training loss per epoch (mean over seeds), one line per method."""
    tasks = comparison.problem.tasks
    curves = {}
    for method in comparison.runs:
        results = comparison.ok(method)
        if results:
            curves[method] = {
                t: np.mean([r.epoch_losses[t] for r in results], axis=0) for t in tasks
            }
    if not curves:
        return None
    fig = new_figure(figsize=(4.2 * len(tasks), 3.4))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    colors = colormaps["tab20"](np.linspace(0, 1, max(len(curves), 2)))
    for ax, task in zip(axes.flat, tasks):
        for color, (method, by_task) in zip(colors, curves.items()):
            values = by_task[task]
            style = (
                {"lw": 2.2, "color": "black"} if method == BASELINE else {"lw": 1, "color": color}
            )
            ax.plot(np.arange(1, len(values) + 1), values, label=method, **style)
        ax.set_title(task)
        ax.set_xlabel("epoch")
        if all(v > 0 for c in curves.values() for v in c[task]):
            ax.set_yscale("log")
    axes.flat[0].set_ylabel("training loss")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.suptitle(f"{comparison.problem.name}: training loss (mean over seeds)")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    return path


def plot_delta_m(comparison: Comparison, rows: list[Row], path: Path) -> Path | None:
    """Horizontal bars of Δm% against equal weighting (error bars: std over seeds)."""
    done = [r for r in rows if r.delta_m is not None and r.method != BASELINE]
    if not done:
        return None
    done.sort(key=lambda r: r.delta_m)  # type: ignore[arg-type, return-value]
    values = [r.delta_m for r in done]
    fig = new_figure(figsize=(6, 0.32 * len(done) + 1.2))
    ax = fig.subplots()
    colors = ["tab:green" if v < 0 else "tab:red" for v in values]  # type: ignore[operator]
    ax.barh([r.method for r in done], values, xerr=[r.delta_m_std for r in done], color=colors)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("Δm% against equal weighting (lower is better)")
    ax.set_title(f"{comparison.problem.name}: Δm% (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_plots(comparison: Comparison, rows: list[Row]) -> list[Path]:
    """Every picture of the comparison, written into its directory; returns the paths."""
    out = comparison.out
    paths = [
        plot_weights(comparison, out / "weights.png"),
        plot_losses(comparison, out / "losses.png"),
        plot_delta_m(comparison, rows, out / "delta_m.png"),
    ]
    results = {m: comparison.ok(m) for m in comparison.runs if comparison.ok(m)}
    paths += comparison.problem.plot_comparison(results, out)
    return [p for p in paths if p is not None]
