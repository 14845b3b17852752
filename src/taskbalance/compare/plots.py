"""Pictures of a comparison: task weights over time, loss curves, a Δm% bar chart.

Readable with every method at once (20+ rows): the weights are small multiples (one panel
per row, one colour per task, the per-step weights as a faint line under their moving
mean); the loss curves give each row its own colour from a qualitative palette (and, past
10 rows, its own line style), with equal weighting in black; legends sit outside the
panels. Each ``*_figure`` function returns the figure (for tests), each ``plot_*`` writes
it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from taskbalance.compare.baselines import BASELINE_ROWS, SINGLE_TASK
from taskbalance.compare.report import Row
from taskbalance.compare.runner import BASELINE, Comparison

#: at most this many points per drawn line (longer lines are thinned).
MAX_POINTS = 400
#: the raw per-step weights keep up to this many points (their noise is the point).
MAX_RAW_POINTS = 2000
#: the weights' moving mean spans about this fraction of the run.
SMOOTH_FRACTION = 1 / 30

#: colours of the rows other than equal weighting (black), far apart from each other:
#: tab10 without its grey, dark and middle shades of tab20b (and Dark2's teal), then light
#: shades of tab20. No two are closer than 0.17 in RGB.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#393b79", "#637939", "#1b9e77", "#7b4173", "#e7ba52", "#6b6ecf", "#b5cf6b",
    "#ff9896", "#aec7e8", "#98df8a", "#c49c94", "#dbdb8d", "#f7b6d2",
)  # fmt: skip
#: line styles, one per block of :data:`PALETTE` (bright, dark, light), past 10 rows.
STYLES = ("-", "--", "-.", ":")
#: colours of the tasks in the weights figure.
TASK_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
)  # fmt: skip


def method_styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Line properties of each row: equal weighting black and thick, the others a colour
    of :data:`PALETTE` each (in order), solid up to 10 rows; with more rows the line style
    also changes with the palette's block (bright solid, dark dashed, light dash-dot)."""
    others = [label for label in dict.fromkeys(labels) if label != BASELINE]
    many = len(others) > 10
    styles: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(others):
        position = i % len(PALETTE)
        block = 0 if position < 9 else 1 if position < 16 else 2
        style = STYLES[(block + 3 * (i // len(PALETTE))) % len(STYLES)] if many else "-"
        styles[label] = {"color": PALETTE[position], "linestyle": style, "lw": 1.3}
    styles[BASELINE] = {"color": "#000000", "linestyle": "-", "lw": 2.4}
    return {label: styles[label] for label in labels}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean of each column of ``values`` over ``window`` rows (shorter
    windows at the ends, so the result has as many rows)."""
    n = len(values)
    if window <= 1 or n < 2:
        return values
    sums = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
    index = np.arange(n)
    low = np.clip(index - window // 2, 0, n)
    high = np.clip(index - window // 2 + window, 0, n)
    return (sums[high] - sums[low]) / (high - low).reshape(-1, *([1] * (values.ndim - 1)))


def _thin(steps: np.ndarray, values: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Every k-th row so that at most ``points`` remain (the last one kept)."""
    if len(steps) <= points:
        return steps, values
    keep = np.unique(np.linspace(0, len(steps) - 1, points).round().astype(int))
    return steps[keep], values[keep]


def new_figure(**kw: Any) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _grid(count: int) -> tuple[int, int]:
    cols = count if count <= 3 else 4 if count <= 8 else 5
    return math.ceil(count / cols), cols


def _weight_panels(comparison: Comparison) -> list[tuple[str, str, Any]]:
    panels = []
    for label in comparison.runs:
        results = comparison.ok(label)
        if results and results[0].histories:
            name, history = next(iter(results[0].histories.items()))
            if len(history):
                panels.append((label, name, history))
    return panels


def weights_figure(comparison: Comparison) -> Figure | None:
    """One panel per row: each task's weight against the training step (first seed), the
    per-step values faint, their moving mean over :data:`SMOOTH_FRACTION` of the run solid.
    ``None`` when no run recorded weights."""
    panels = _weight_panels(comparison)
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    fig = new_figure(figsize=(2.9 * cols + 1.4, 2.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    tasks = panels[0][2].tasks
    windows = set()
    for ax, (label, name, history) in zip(axes.flat, panels):
        steps = np.asarray(history.steps, dtype=float)
        weights = history.weights.numpy()
        window = max(1, round(len(steps) * SMOOTH_FRACTION))
        windows.add(window)
        raw_steps, raw = _thin(steps, weights, MAX_RAW_POINTS)
        mean_steps, mean = _thin(steps, smooth(weights, window), MAX_POINTS)
        for j, task in enumerate(history.tasks):
            colour = TASK_COLOURS[j % len(TASK_COLOURS)]
            if window > 1:
                ax.plot(raw_steps, raw[:, j], color=colour, lw=0.6, alpha=0.3)
            ax.plot(mean_steps, mean[:, j], color=colour, lw=1.4, label=task)
        ax.set_title(label if name == "main" else f"{label} ({name})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25, lw=0.5)
    flat = list(axes.flat)
    for i, ax in enumerate(flat):
        if i >= len(panels):
            ax.set_visible(False)
        elif i + cols >= len(panels):  # nothing below it: its step axis is labelled
            ax.xaxis.set_tick_params(labelbottom=True)
    handles = [
        Line2D([], [], color=TASK_COLOURS[j % len(TASK_COLOURS)], lw=2) for j in range(len(tasks))
    ]
    fig.legend(
        handles, tasks, loc="outside right upper", title="task", fontsize=8, title_fontsize=8,
        frameon=False,
    )  # fmt: skip
    fig.supxlabel("training step", fontsize=10)
    fig.supylabel("task weight", fontsize=10)
    span = f"moving mean over {max(windows)} steps" if max(windows) > 1 else "every step"
    fig.suptitle(
        f"{comparison.title_name}: task weights over training (first seed; line: {span}"
        + ("; faint: every step)" if max(windows) > 1 else ")"),
        fontsize=11,
    )
    return fig


def _scale(ax: Any, values: Sequence[float]) -> None:
    """A log y axis when ``values`` are positive and span more than a decade (a loss falls
    by orders of magnitude); otherwise linear, whose ticks read better over a short span."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")


def losses_figure(comparison: Comparison) -> Figure | None:
    """Mean training loss per epoch (mean over seeds), one panel per task and one line per
    row; below it, each row's loss divided by equal weighting's (where the curves of many
    rows lie on top of each other). ``None`` when no run finished."""
    tasks = comparison.problem.tasks
    curves = {}
    for label in comparison.runs:
        results = comparison.ok(label)
        if results:
            curves[label] = {
                t: np.mean([r.epoch_losses[t] for r in results], axis=0) for t in tasks
            }
    if not curves:
        return None
    base = curves.get(BASELINE)
    relative = base is not None and all(np.all(np.asarray(base[t]) > 0) for t in tasks)
    styles = method_styles(list(curves))
    nrows = 2 if relative else 1
    legend_width = 2.0 if len(curves) <= 24 else 3.8
    fig = new_figure(
        figsize=(3.8 * len(tasks) + legend_width, 3.0 * nrows + 0.9), layout="constrained"
    )
    axes = fig.subplots(nrows, len(tasks), squeeze=False, sharex=True)
    epochs = max(len(c[t]) for c in curves.values() for t in tasks)
    marker = {"marker": "o", "ms": 3} if epochs <= 12 else {}
    for col, task in enumerate(tasks):
        ax = axes[0, col]
        for label, by_task in curves.items():
            values = np.asarray(by_task[task])
            x = np.arange(1, len(values) + 1)
            zorder = 3 if label == BASELINE else 2
            ax.plot(x, values, label=label, zorder=zorder, **styles[label], **marker)
            if relative and len(values) == len(base[task]):  # type: ignore[index]
                ratio = values / np.asarray(base[task])  # type: ignore[index]
                axes[1, col].plot(x, ratio, zorder=zorder, **styles[label], **marker)
        ax.set_title(task, fontsize=10)
        _scale(ax, [float(v) for c in curves.values() for v in c[task]])
        if relative:
            _scale(
                axes[1, col], [float(v) for line in axes[1, col].lines for v in line.get_ydata()]
            )
        for a in axes[:, col]:
            a.grid(alpha=0.25, lw=0.5)
            a.tick_params(labelsize=8)
            if epochs <= 12:  # every epoch marked, and a single one in the middle
                a.set_xticks(range(1, epochs + 1))
                a.set_xlim(0.6, epochs + 0.4)
            else:
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[-1, col].set_xlabel("epoch")
    axes[0, 0].set_ylabel("training loss")
    if relative:
        axes[1, 0].set_ylabel(f"loss / {BASELINE}'s")
        for ax in axes[1]:
            ax.axhline(1.0, color="0.5", lw=0.8, zorder=1)
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8,
        ncols=1 if len(curves) <= 24 else 2, title="method", title_fontsize=8, frameon=False,
    )  # fmt: skip
    fig.suptitle(f"{comparison.title_name}: training loss (mean over seeds)", fontsize=11)
    return fig


def delta_m_figure(comparison: Comparison, rows: list[Row]) -> Figure | None:
    """Horizontal bars of Δm% against equal weighting (error bars: std over seeds, where
    more than one seed finished). ``None`` when no row has a Δm%."""
    done = [r for r in rows if r.delta_m is not None and r.method != BASELINE]
    if not done:
        return None
    done.sort(key=lambda r: r.delta_m)  # type: ignore[arg-type, return-value]
    values = [r.delta_m for r in done]
    errors = [r.delta_m_std if r.delta_m_std is not None else 0.0 for r in done]
    longest = max(len(r.method) for r in done)
    fig = new_figure(figsize=(5.0 + 0.07 * longest, 0.3 * len(done) + 1.3), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:green" if v < 0 else "tab:red" for v in values]  # type: ignore[operator]
    baseline = [r.method in BASELINE_ROWS for r in done]
    colors = ["0.55" if b else c for b, c in zip(baseline, colors)]
    spread = any(r.delta_m_std is not None for r in done)
    bars = ax.barh([r.method for r in done], values, xerr=errors if spread else None, color=colors)
    for bar, is_baseline in zip(bars, baseline):
        if is_baseline:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    handles, labels = [], []
    if any(baseline):
        handles.append(bars[baseline.index(True)])
        labels.append("baseline row (single-task networks / tuned static weights)")
    reference = next((r for r in rows if r.method == BASELINE), None)
    if reference is not None and reference.delta_m_std:
        band = reference.delta_m_std
        handles.append(ax.axvspan(-band, band, color="0.88", zorder=0))
        labels.append(f"equal weighting's own seed spread (± {band:.2g}, 1 std)")
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, frameon=False)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.25, lw=0.5)
    ax.set_xlabel("Δm% against equal weighting (lower is better)")
    what = "mean ± std over seeds" if spread else "one seed"
    ax.set_title(f"{comparison.title_name}: Δm% ({what})", fontsize=10)
    return fig


def _save(fig: Figure | None, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path


def plot_weights(comparison: Comparison, path: Path) -> Path | None:
    """Write :func:`weights_figure` to ``path`` (``None``: nothing to draw)."""
    return _save(weights_figure(comparison), path)


def plot_losses(comparison: Comparison, path: Path) -> Path | None:
    """Write :func:`losses_figure` to ``path`` (``None``: nothing to draw)."""
    return _save(losses_figure(comparison), path)


def plot_delta_m(comparison: Comparison, rows: list[Row], path: Path) -> Path | None:
    """Write :func:`delta_m_figure` to ``path`` (``None``: nothing to draw)."""
    return _save(delta_m_figure(comparison, rows), path)


def write_plots(comparison: Comparison, rows: list[Row]) -> list[Path]:
    """Every picture of the comparison, written into its directory; returns the paths."""
    out = comparison.out
    paths = [
        plot_weights(comparison, out / "weights.png"),
        plot_losses(comparison, out / "losses.png"),
        plot_delta_m(comparison, rows, out / "delta_m.png"),
    ]
    results = {  # not single_task: its results combine K runs and carry no extras
        m: comparison.ok(m) for m in comparison.runs if comparison.ok(m) and m != SINGLE_TASK
    }
    paths += comparison.problem.plot_comparison(results, out)
    return [p for p in paths if p is not None]
