"""The table and the figures of a comparison, on stored-looking runs made up here (no
training): titles, spread, the console table, colours, legends and overlaps."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from _compare_fake import TwoRegressions
from matplotlib.colors import to_rgb
from rich.console import Console

from taskbalance.compare.plots import losses_figure, method_styles, weights_figure
from taskbalance.compare.problem import RunResult
from taskbalance.compare.report import build_rows, console_table, write_tables
from taskbalance.compare.runner import Comparison, RunRecord
from taskbalance.history import History

#: 22 rows: the baseline, 20 other methods and a variant with a long label.
LABELS = [
    "equal", "aligned_mtl", "cagrad", "db_mtl", "dtp", "dwa", "famo", "gls", "graddrop",
    "gradnorm", "gradvac", "imtl", "imtl_l", "mgda", "mgda_ub", "nash_mtl", "pcgrad", "rlw",
    "static[weights=1,2]", "uncertainty", "upgrad", "cagrad[c=0.2,rescale=1+c]",
]  # fmt: skip


def _history(tasks, steps: int, seed: int, level: float) -> History:
    gen = torch.Generator().manual_seed(seed)
    weights = level + 0.4 * torch.randn(steps, len(tasks), generator=gen, dtype=torch.float64)
    history = History(tasks)
    history.load_state_dict(
        {
            "steps": list(range(steps)),
            "losses": torch.rand(steps, len(tasks), generator=gen, dtype=torch.float64),
            "weights": weights,
            "extras": {},
        }
    )
    return history


def made_up(tmp_path, labels=LABELS, seeds=1, size="small", steps=300) -> Comparison:
    """A comparison of ``labels`` whose runs are invented (distinct, finite numbers)."""
    problem = TwoRegressions(size=size)
    runs = {}
    for i, label in enumerate(labels):
        records = []
        for seed in range(seeds):
            scale = 1.0 + 0.01 * i + 0.003 * seed
            result = RunResult(
                metrics={"mse_a": 0.5 * scale, "score_b": 0.8 / scale, "steps_seen": steps},
                epoch_losses={"a": [1.0 * scale, 0.6 * scale], "b": [2.0 / scale, 0.9]},
                step_time=1e-3 * scale,
                steps=steps,
                histories={"main": _history(problem.tasks, steps, 10 * i + seed, 1.0)},
            )
            records.append(RunRecord(label, seed, "ok", result))
        runs[label] = records
    return Comparison(problem, tmp_path, 2, runs)


# --- the table ---------------------------------------------------------------------------


def test_small_runs_are_titled_a_smoke_test_and_full_ones_are_not(tmp_path):
    _, md, _ = write_tables(made_up(tmp_path / "s", LABELS[:3], size="small"))
    assert "smoke test" in md.read_text().splitlines()[0]
    _, md, _ = write_tables(made_up(tmp_path / "f", LABELS[:3], size="full"))
    assert "smoke test" not in md.read_text()


def test_one_seed_has_no_spread_in_the_table_or_the_csv(tmp_path):
    comparison = made_up(tmp_path, LABELS[:4], seeds=1)
    _, md, csv_path = write_tables(comparison)
    body = [line for line in md.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(body) == 4 and not any("±" in line for line in body)
    assert "one seed" in md.read_text()
    header, first = csv_path.read_text().splitlines()[:2]
    cells = dict(zip(header.split(","), first.split(",")))
    assert cells["mse_a_std"] == "" and cells["delta_m_std"] == "" and cells["mse_a_mean"]
    _, md3, _ = write_tables(made_up(tmp_path / "3", LABELS[:4], seeds=3))
    body3 = [line for line in md3.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(body3) == 4 and all("±" in line for line in body3)


def _render(table, width: int) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(table)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_console_table_drops_columns_instead_of_cutting_names(tmp_path, width):
    comparison = made_up(tmp_path, LABELS, seeds=2)
    rows = build_rows(comparison)
    table, hidden = console_table(comparison, rows, width)
    text = _render(table, width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width and "…" not in text
    for label in LABELS:
        assert any(label in line.split() for line in lines), label
    assert "Δm%" in text  # the key column stays
    wide, none_hidden = console_table(comparison, rows, 400)
    assert none_hidden == [] and "score_b" in _render(wide, 400)
    for name in hidden:
        assert name not in text


# --- the figures -------------------------------------------------------------------------


def _distance(a, b) -> float:
    return math.dist(to_rgb(a), to_rgb(b))


def test_the_palette_gives_22_methods_distinct_colours_and_varies_line_style():
    styles = method_styles(LABELS)
    colours = [styles[label]["color"] for label in LABELS]
    nearest = min(_distance(a, b) for a, b in itertools.combinations(colours, 2))
    assert nearest > 0.15, nearest
    assert to_rgb(styles["equal"]["color"]) == (0.0, 0.0, 0.0)  # the baseline: black
    assert len({styles[label]["linestyle"] for label in LABELS}) > 1
    few = method_styles(LABELS[:6])
    assert {few[label]["linestyle"] for label in LABELS[:6]} == {"-"}


def _boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    return renderer, axes


def _overlap(a, b, pad: float = 0.0) -> bool:
    return a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad


@pytest.mark.parametrize("count", [3, 22])
def test_legends_lie_outside_every_panel(tmp_path, count):
    comparison = made_up(tmp_path, LABELS[:count])
    for fig in (weights_figure(comparison), losses_figure(comparison)):
        renderer, axes = _boxes(fig)
        legends = fig.legends + [ax.get_legend() for ax in axes if ax.get_legend()]
        assert legends
        texts = [fig._suptitle, fig._supxlabel, fig._supylabel]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in axes:
                assert not _overlap(box, ax.get_window_extent()), fig.get_suptitle()
            for text in texts:
                if text is not None:
                    assert not _overlap(box, text.get_window_extent(renderer)), text.get_text()


def test_the_shared_weight_label_does_not_touch_any_tick_label(tmp_path):
    fig = weights_figure(made_up(tmp_path, LABELS))
    renderer, axes = _boxes(fig)
    label = fig._supylabel.get_window_extent(renderer)
    for ax in axes:
        for tick in ax.get_yticklabels():
            if tick.get_visible() and tick.get_text():
                assert not _overlap(label, tick.get_window_extent(renderer)), tick.get_text()


def test_weights_are_smoothed_over_a_faint_raw_line(tmp_path):
    fig = weights_figure(made_up(tmp_path, LABELS[:3]))
    for ax in [ax for ax in fig.axes if ax.lines]:
        faint = [line for line in ax.lines if (line.get_alpha() or 1.0) < 0.5]
        solid = [line for line in ax.lines if (line.get_alpha() or 1.0) >= 0.5]
        assert len(faint) == len(solid) == 2  # one of each per task
        for raw, smooth in zip(faint, solid):
            assert raw.get_color() == smooth.get_color()
            jumps_raw = np.abs(np.diff(raw.get_ydata())).mean()
            jumps_smooth = np.abs(np.diff(smooth.get_ydata())).mean()
            assert jumps_smooth < 0.25 * jumps_raw


def test_every_method_has_its_own_line_style_in_the_loss_figure(tmp_path):
    fig = losses_figure(made_up(tmp_path, LABELS))
    ax = fig.axes[0]
    looks = {(to_rgb(line.get_color()), line.get_linestyle()) for line in ax.lines}
    labelled = [line for line in ax.lines if not line.get_label().startswith("_")]
    assert len(labelled) == len(LABELS) and len(looks) >= len(LABELS)
