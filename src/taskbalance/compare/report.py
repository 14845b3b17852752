"""The comparison table (Markdown and CSV), built only from the stored runs.

One row per method: each metric as mean ± std over seeds, Δm% against equal weighting
(per seed against the baseline's mean over seeds; mean ± std), mean rank over metrics (of
the seed means), and the mean training-step time relative to equal weighting's.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from taskbalance.compare.metrics import delta_m, mean_ranks
from taskbalance.compare.runner import BASELINE, Comparison


@dataclass
class Row:
    """One method's line of the table (``None`` where no run of the method finished)."""

    method: str
    seeds_ok: int
    seeds_failed: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    delta_m: float | None = None
    delta_m_std: float | None = None
    mean_rank: float | None = None
    time_ratio: float | None = None
    errors: list[str] = field(default_factory=list)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_rows(comparison: Comparison) -> list[Row]:
    """Rows sorted by Δm% (baseline first, methods without a finished run last)."""
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
    finished = {m: r.mean for m, r in rows.items() if r.seeds_ok}
    for method, rank in mean_ranks(finished, metrics).items():
        rows[method].mean_rank = rank

    def order(row: Row) -> tuple[int, float]:
        if row.method == BASELINE:
            return (0, 0.0)
        return (1, row.delta_m) if row.delta_m is not None else (2, 0.0)

    return sorted(rows.values(), key=order)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def markdown_table(comparison: Comparison, rows: list[Row]) -> str:
    """The table as GitHub Markdown; ↑/↓ marks the direction of each metric."""
    metrics = comparison.problem.metrics
    header = ["method"]
    header += [f"{m.name} {'↑' if m.higher_is_better else '↓'}" for m in metrics]
    header += ["Δm% ↓", "MR ↓", "time ×EW", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"**{row.method}**" if row.method == BASELINE else row.method]
        for metric in metrics:
            if metric.name in row.mean:
                mean, std = row.mean[metric.name], row.std[metric.name]
                cells.append(f"{_fmt(mean, 4)} ± {_fmt(std, 2)}")
            else:
                cells.append("failed")
        if row.delta_m is None:
            cells.append("—")
        else:
            shown = 0.0 if abs(row.delta_m) < 5e-3 else row.delta_m  # no "-0.00"
            cells.append(f"{shown:+.2f} ± {row.delta_m_std:.2f}")
        cells.append(_fmt(row.mean_rank))
        cells.append(_fmt(row.time_ratio))
        cells.append(
            f"{row.seeds_ok}" + (f" ({row.seeds_failed} failed)" if row.seeds_failed else "")
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(comparison: Comparison, rows: list[Row], path: Path) -> Path:
    """The table as CSV, one column per number (full precision)."""
    metrics = comparison.problem.metrics
    header = ["method", "seeds_ok", "seeds_failed"]
    for metric in metrics:
        header += [f"{metric.name}_mean", f"{metric.name}_std"]
    header += ["delta_m", "delta_m_std", "mean_rank", "step_time_ratio", "errors"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            line: list[object] = [row.method, row.seeds_ok, row.seeds_failed]
            for metric in metrics:
                line += [row.mean.get(metric.name, ""), row.std.get(metric.name, "")]
            for value in (row.delta_m, row.delta_m_std, row.mean_rank, row.time_ratio):
                line.append("" if value is None else value)
            line.append(" | ".join(row.errors))
            writer.writerow(line)
    return path


def write_tables(comparison: Comparison) -> tuple[list[Row], Path, Path]:
    """Write ``table.md`` and ``table.csv`` into the comparison's directory."""
    rows = build_rows(comparison)
    out = comparison.out
    out.mkdir(parents=True, exist_ok=True)
    problem = comparison.problem
    seeds = max((len(r) for r in comparison.runs.values()), default=0)
    title = (
        f"# {problem.name} ({problem.size}, {comparison.epochs} epochs, {seeds} seeds)\n\n"
        f"Mean ± std over seeds; Δm% against equal weighting (`{BASELINE}`), lower is better; "
        "MR: mean rank over metrics; time: mean training-step time / equal weighting's.\n\n"
    )
    md = out / "table.md"
    md.write_text(title + markdown_table(comparison, rows))
    return rows, md, write_csv(comparison, rows, out / "table.csv")
