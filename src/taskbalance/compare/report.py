"""The comparison table (Markdown, CSV and the console's), built only from the stored runs.

One row per method (or variant, ``cagrad[c=0.2]``, or baseline row): each metric as mean
± std over seeds, Δm% against equal weighting (per seed against the baseline's mean over
seeds; mean ± std), with a finished ``single_task`` row also Δm% against the single-task
networks (the same way), mean rank over metrics (of the seed means), and the mean
training-step time relative to equal weighting's. A row of one seed shows its values alone
(no "± 0": one seed has no spread). Runs of ``size="small"`` are titled a smoke test. The
notes say what the baseline rows are, the weights ``tuned_static`` chose and what tuning
cost (also in the CSV's ``weights``, ``tuning_runs``, ``tuning_seconds`` and
``tuning_ew_runs`` columns, present when ``tuned_static`` is a row).

The console table (:func:`console_table`) never cuts a method name: it puts each spread
under its mean when the columns do not fit on one line, and if they still do not fit it
leaves out metric columns (they are in ``table.md``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from taskbalance.compare.baselines import BASELINE_ROWS, SINGLE_TASK, TUNED_STATIC, TUNING_SEED
from taskbalance.compare.metrics import delta_m, mean_ranks
from taskbalance.compare.options import format_value
from taskbalance.compare.runner import BASELINE, Comparison


@dataclass
class Row:
    """One row of the table (``None`` where no run finished; a std is ``None`` when only
    one seed finished). ``method`` is the row label: ``cagrad`` or ``cagrad[c=0.2]``."""

    method: str
    seeds_ok: int
    seeds_failed: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    delta_m: float | None = None
    delta_m_std: float | None = None
    delta_m_stl: float | None = None
    delta_m_stl_std: float | None = None
    mean_rank: float | None = None
    time_ratio: float | None = None
    errors: list[str] = field(default_factory=list)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build_rows(comparison: Comparison) -> list[Row]:
    """Rows: equal weighting first, then the baseline rows (``single_task``,
    ``tuned_static``), then the methods sorted by Δm% (those without a finished run
    last)."""
    metrics = comparison.problem.metrics
    rows: dict[str, Row] = {}
    step_times: dict[str, float] = {}
    for method, records in comparison.runs.items():
        results = comparison.ok(method)
        row = Row(method, len(results), len(records) - len(results))
        row.errors = [r.error for r in records if r.status != "ok"]
        if results:
            for metric in metrics:
                values = [float(r.metrics[metric.name]) for r in results]
                row.mean[metric.name], row.std[metric.name] = _mean_std(values)
            step_times[method] = statistics.fmean(r.step_time for r in results)
        rows[method] = row
    base = rows.get(BASELINE)
    if base is not None and base.seeds_ok:
        for method, row in rows.items():
            if not row.seeds_ok:
                continue
            deltas = [delta_m(r.metrics, base.mean, metrics) for r in comparison.ok(method)]
            row.delta_m, row.delta_m_std = _mean_std(deltas)
            row.time_ratio = step_times[method] / step_times[BASELINE]
    stl = rows.get(SINGLE_TASK)
    if stl is not None and stl.seeds_ok:
        for method, row in rows.items():
            if row.seeds_ok:
                deltas = [delta_m(r.metrics, stl.mean, metrics) for r in comparison.ok(method)]
                row.delta_m_stl, row.delta_m_stl_std = _mean_std(deltas)
    finished = {m: r.mean for m, r in rows.items() if r.seeds_ok}
    for method, rank in mean_ranks(finished, metrics).items():
        rows[method].mean_rank = rank

    def order(row: Row) -> tuple[int, float]:
        if row.method == BASELINE:
            return (0, 0.0)
        if row.method in BASELINE_ROWS:
            return (1, float(BASELINE_ROWS.index(row.method)))
        return (2, row.delta_m) if row.delta_m is not None else (3, 0.0)

    return sorted(rows.values(), key=order)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _metric_cell(row: Row, name: str, sep: str = " ") -> str:
    if name not in row.mean:
        return "failed"
    std = row.std.get(name)
    mean = _fmt(row.mean[name], 4)
    return mean if std is None else f"{mean}{sep}± {_fmt(std, 2)}"


def _delta_m_cell(row: Row, sep: str = " ", stl: bool = False) -> str:
    mean, std = (row.delta_m_stl, row.delta_m_stl_std) if stl else (row.delta_m, row.delta_m_std)
    if mean is None:
        return "—"
    shown = 0.0 if abs(mean) < 5e-3 else mean  # no "-0.00"
    if std is None:
        return f"{shown:+.2f}"
    return f"{shown:+.2f}{sep}± {std:.2f}"


#: the header of the Δm% against the single-task networks.
STL_COLUMN = "Δm% vs STL ↓"


def has_stl(rows: list[Row]) -> bool:
    """Whether the table has a finished ``single_task`` row (and so a Δm% against it)."""
    return any(row.method == SINGLE_TASK and row.seeds_ok for row in rows)


def _seeds_cell(row: Row) -> str:
    return f"{row.seeds_ok}" + (f" ({row.seeds_failed} failed)" if row.seeds_failed else "")


def _header(comparison: Comparison) -> list[str]:
    metrics = comparison.problem.metrics
    return [f"{m.name} {'↑' if m.higher_is_better else '↓'}" for m in metrics]


def markdown_table(comparison: Comparison, rows: list[Row]) -> str:
    """The table as GitHub Markdown; ↑/↓ marks the direction of each metric."""
    metrics = comparison.problem.metrics
    stl = has_stl(rows)
    header = ["method", *_header(comparison), "Δm% ↓", *([STL_COLUMN] if stl else [])]
    header += ["MR ↓", "time ×EW", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row.method.replace("|", "\\|")
        cells = [f"**{name}**" if row.method == BASELINE else name]
        cells += [_metric_cell(row, metric.name) for metric in metrics]
        cells += [_delta_m_cell(row), *([_delta_m_cell(row, stl=True)] if stl else [])]
        cells += [_fmt(row.mean_rank), _fmt(row.time_ratio)]
        cells.append(_seeds_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_count(comparison: Comparison) -> int:
    return max((len(r) for r in comparison.runs.values()), default=0)


def title(comparison: Comparison) -> str:
    """One line: the problem, its size (``small`` is called a smoke test), epochs, seeds."""
    problem = comparison.problem
    seeds = _seed_count(comparison)
    counts = f"{comparison.epochs} epochs, {seeds} seed{'s' if seeds != 1 else ''}"
    if problem.size == "small":
        return f"{comparison.title_name}: smoke test, not results (size small, {counts})"
    return f"{comparison.title_name} ({problem.size}, {counts})"


def notes(comparison: Comparison) -> list[str]:
    """What the numbers are, the options in force and the methods left out (Markdown)."""
    one = _seed_count(comparison) == 1
    spread = (
        "Values of one seed (no spread to show: run more seeds to tell a difference from noise)"
        if one
        else "Mean ± std over seeds"
    )
    stl = any(r.status == "ok" for r in comparison.runs.get(SINGLE_TASK, []))
    against = (
        f"Δm% against equal weighting (`{BASELINE}`) and, in “Δm% vs STL”, against the "
        f"single-task networks (`{SINGLE_TASK}`, the literature's reference), each per seed "
        "against the reference's mean over seeds"
        if stl
        else f"Δm% against equal weighting (`{BASELINE}`)"
    )
    lines = [
        f"{spread}; {against}, lower is better; MR: mean rank over metrics; time: mean "
        "training-step time / equal weighting's."
    ]
    lines += baseline_notes(comparison)
    if comparison.options:
        given = ", ".join(
            f"`{method}.{key}={format_value(value)}`"
            for method, values in comparison.options.items()
            for key, value in values.items()
        )
        lines.append(f"Options for every row of their method (a bracketed value wins): {given}.")
    left = [f"{method} (needs {', '.join(needs)})" for method, needs in comparison.left_out.items()]
    left += [f"{name} ({reason})" for name, reason in comparison.unavailable.items()]
    if left:
        lines.append(f"Left out by `all`: {', '.join(left)}.")
    return lines


@dataclass
class TuningCost:
    """What tuning ``tuned_static`` cost: its runs, their wall time in seconds, and that as
    a multiple of one equal-weighting run's (``None`` where no such run is known)."""

    runs: int
    seconds: float
    ew_runs: float | None


def tuning_cost(comparison: Comparison) -> TuningCost | None:
    """The cost of tuning ``tuned_static`` (``None`` when it is not a row)."""
    tuning = comparison.tuning
    if tuning is None:
        return None
    ew = [r.wall_time for r in comparison.runs.get(BASELINE, []) if r.wall_time]
    ew_runs = tuning.seconds / statistics.fmean(ew) if ew else None
    return TuningCost(len(tuning.candidates), tuning.seconds, ew_runs)


def _weights_text(tasks: tuple[str, ...], weights: list[float]) -> str:
    return ", ".join(f"{task} {w:.3g}" for task, w in zip(tasks, weights))


def baseline_notes(comparison: Comparison) -> list[str]:
    """What the baseline rows are: the single-task networks, and the weights
    ``tuned_static`` chose and what tuning them cost (Markdown)."""
    problem = comparison.problem
    lines = []
    if SINGLE_TASK in comparison.runs:
        summary = [m.name for m in problem.metrics if m.task not in problem.tasks]
        combined = (
            f"; {', '.join(summary)} (of no single task) from the problem's "
            "`combine_single_task` (by default the mean over the K networks)"
            if summary
            else ""
        )
        lines.append(
            f"`{SINGLE_TASK}`: one network per task (static weights 1 on the task, 0 "
            f"elsewhere), each task's metrics from its own network{combined}; its time is "
            f"that of the {len(problem.tasks)} networks' steps together."
        )
    tuning, cost = comparison.tuning, tuning_cost(comparison)
    if tuning is not None and cost is not None:
        k = len(problem.tasks)
        tried = (
            "w = (2a, 2 − 2a), a = 0.1, 0.2, …, 0.9"
            if k == 2
            else f"equal weighting and {len(tuning.candidates) - 1} draws of {k}·Dirichlet(1)"
        )
        spent = f"{cost.runs} runs, {cost.seconds:.3g} s"
        if cost.ew_runs is not None:
            spent += f" = {cost.ew_runs:.3g} × one equal-weighting run"
        if tuning.weights is not None and tuning.chosen is not None:
            score = tuning.scores[tuning.chosen] or 0.0
            chosen = (
                f"weights {_weights_text(problem.tasks, tuning.weights)} (candidate "
                f"{tuning.chosen}, validation Δm% {score:+.2f})"
            )
        else:
            chosen = f"tuning failed ({tuning.error})"
        lines.append(
            f"`{TUNED_STATIC}`: static weights chosen on the validation split only, among "
            f"{len(tuning.candidates)} candidates ({tried}), each trained once with seed "
            f"{TUNING_SEED} and scored by its validation Δm% against equal weighting: "
            f"{chosen}; tuning cost {spent} (not in its time ×EW)."
        )
    return lines


def write_csv(comparison: Comparison, rows: list[Row], path: Path) -> Path:
    """The table as CSV, one column per number (full precision)."""
    metrics = comparison.problem.metrics
    header = ["method", "seeds_ok", "seeds_failed"]
    for metric in metrics:
        header += [f"{metric.name}_mean", f"{metric.name}_std"]
    stl = has_stl(rows)
    header += ["delta_m", "delta_m_std", *(["delta_m_stl", "delta_m_stl_std"] if stl else [])]
    header += ["mean_rank", "step_time_ratio"]
    cost = tuning_cost(comparison)
    if cost is not None:
        header += ["weights", "tuning_runs", "tuning_seconds", "tuning_ew_runs"]
    header.append("errors")
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            line: list[object] = [row.method, row.seeds_ok, row.seeds_failed]
            for metric in metrics:
                std = row.std.get(metric.name)
                line += [row.mean.get(metric.name, ""), "" if std is None else std]
            values = [row.delta_m, row.delta_m_std]
            values += [row.delta_m_stl, row.delta_m_stl_std] if stl else []
            for value in (*values, row.mean_rank, row.time_ratio):
                line.append("" if value is None else value)
            if cost is not None:
                weights = comparison.tuning.weights if comparison.tuning is not None else None
                tuned = row.method == TUNED_STATIC
                line.append(format_value(weights) if tuned and weights is not None else "")
                line += [cost.runs, cost.seconds] if tuned else ["", ""]
                line.append(cost.ew_runs if tuned and cost.ew_runs is not None else "")
            line.append(" | ".join(row.errors))
            writer.writerow(line)
    return path


def write_tables(comparison: Comparison) -> tuple[list[Row], Path, Path]:
    """Write ``table.md`` and ``table.csv`` into the comparison's directory."""
    rows = build_rows(comparison)
    out = comparison.out
    out.mkdir(parents=True, exist_ok=True)
    head = f"# {title(comparison)}\n\n" + "".join(f"{line}\n\n" for line in notes(comparison))
    md = out / "table.md"
    md.write_text(head + markdown_table(comparison, rows))
    return rows, md, write_csv(comparison, rows, out / "table.csv")


#: the console keeps these columns longest (after the method), in this order of priority.
KEY_COLUMNS = ("Δm% ↓", "MR ↓", "time ×EW", "seeds")


def _console_cells(comparison: Comparison, row: Row, split: bool) -> dict[str, str]:
    sep = "\n" if split else " "
    cells = {
        header: _metric_cell(row, metric.name, sep)
        for header, metric in zip(_header(comparison), comparison.problem.metrics)
    }
    cells["Δm% ↓"] = _delta_m_cell(row, sep)
    cells[STL_COLUMN] = _delta_m_cell(row, sep, stl=True)
    cells["MR ↓"] = _fmt(row.mean_rank)
    cells["time ×EW"] = _fmt(row.time_ratio)
    cells["seeds"] = _seeds_cell(row)
    return cells


def _rich_table(comparison: Comparison, rows: list[Row], columns: list[str], split: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    longest = max((len(row.method) for row in rows), default=6)
    table.add_column("method", no_wrap=True, min_width=longest, overflow="fold")
    for column in columns:
        header = column.replace(" ", "\n", 1) if split and column != "seeds" else column
        table.add_column(header, justify="right", overflow="fold")
    for row in rows:
        cells = _console_cells(comparison, row, split)
        style = "bold" if row.method == BASELINE else ""
        table.add_row(Text(row.method), *(Text(cells[c]) for c in columns), style=style)
    return table


def console_table(comparison: Comparison, rows: list[Row], width: int) -> tuple[Table, list[str]]:
    """The table for a console ``width`` columns wide, and the metric columns left out.

    Tried in turn until one fits without cutting anything: every column on one line;
    every column with each spread under its mean; then without metric columns (the
    diagnostics not counted in Δm% first, then from the last); then without the key
    columns, least useful first. Method names are never cut.
    """
    metrics = comparison.problem.metrics
    headers = dict(zip((m.name for m in metrics), _header(comparison)))
    dropping = [m.name for m in reversed(metrics) if not m.in_delta_m]
    dropping += [m.name for m in reversed(metrics) if m.in_delta_m]
    measure = Console(file=io.StringIO(), width=10_000)

    def fits(table: Table) -> bool:  # the width it takes when nothing wraps
        return Measurement.get(measure, measure.options, table).maximum <= width

    shown = [m.name for m in metrics]
    every_key = list(KEY_COLUMNS)
    if has_stl(rows):  # the Δm% against the single-task networks, after the other Δm%
        every_key.insert(1, STL_COLUMN)
    keys = list(every_key)
    candidates = [(list(shown), keys, False)]
    for name in [None, *dropping]:
        if name is not None:
            shown.remove(name)
        candidates.append((list(shown), keys, True))
    for key in ("seeds", "time ×EW", "MR ↓", STL_COLUMN):
        if key in keys:
            keys = [k for k in keys if k != key]
            candidates.append(([], keys, True))
    for names, keys, split in candidates:
        table = _rich_table(comparison, rows, [headers[n] for n in names] + keys, split)
        if fits(table):
            break
    hidden = [m.name for m in metrics if m.name not in names]
    hidden += [k for k in every_key if k not in keys]
    return table, hidden
