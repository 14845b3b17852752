"""``compare()``: run a comparison, then write its tables and pictures (the CLI's work)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskbalance.compare.plots import write_plots
from taskbalance.compare.problem import ComparisonProblem, Size, make_problem
from taskbalance.compare.report import Row, write_tables
from taskbalance.compare.runner import Comparison, run_comparison


@dataclass
class ComparisonReport:
    """A finished comparison and the files written for it."""

    comparison: Comparison
    rows: list[Row]
    table_md: Path
    table_csv: Path
    pictures: list[Path]


def compare(
    problem: str | ComparisonProblem,
    methods: Sequence[str] | str = "all",
    seeds: int | Sequence[int] = 3,
    out: str | Path = "runs/compare",
    *,
    size: Size = "full",
    epochs: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> ComparisonReport:
    """Run every method × seed on ``problem`` (cached in ``out``), write tables and PNGs.

    ``problem`` is a registered name (built with ``size``) or a problem instance. See
    :func:`~taskbalance.compare.runner.run_comparison` for caching and failures.
    """
    if isinstance(problem, str):
        problem = make_problem(problem, size=size)
    comparison = run_comparison(
        problem, methods, seeds, out, epochs=epochs, progress=progress, force=force
    )
    rows, md, csv_path = write_tables(comparison)
    pictures = write_plots(comparison, rows)
    return ComparisonReport(comparison, rows, md, csv_path, pictures)
