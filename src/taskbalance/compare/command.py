"""``compare()``: run a comparison, then write its tables and pictures (the CLI's work)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskbalance.compare.options import build_problem, parse_problem
from taskbalance.compare.plots import write_plots
from taskbalance.compare.problem import ComparisonProblem, Size
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
    options: Mapping[str, Mapping[str, Any]] | None = None,
    size: Size = "full",
    epochs: int | None = None,
    progress: bool = True,
    force: bool = False,
    label: str | None = None,
) -> ComparisonReport:
    """Run every method × seed on ``problem`` (cached in ``out``), write tables and PNGs.

    ``problem`` is a registered name, optionally with constructor options in brackets
    (``"penguins[data_seed=1]"``, read as method specs are; built with ``size``), or a
    problem instance. ``methods`` is ``"all"`` or method specs, a list or one
    comma-separated string: ``["mgda", "cagrad[c=0.2]", "static[weights=1,2]"]``; each
    distinct spec is a row. ``"single_task"`` and ``"tuned_static"`` add the baseline rows
    of :mod:`~taskbalance.compare.baselines` (``"all"`` adds the problem's own
    :attr:`~taskbalance.compare.problem.ComparisonProblem.baselines`).
    ``options`` sets constructor arguments for every row of a method,
    ``{"cagrad": {"c": 0.2}}`` (a bracketed value wins). Everything is checked before the
    first run starts: a mistake raises :class:`~taskbalance.errors.BalancerUsageError`
    with the fix in its message. See :func:`~taskbalance.compare.runner.run_comparison`
    for caching and failures. ``label`` names the problem in the tables and pictures
    (default: the spec given, or the problem's name).
    """
    if isinstance(problem, str):
        label = parse_problem(problem)[2] if label is None else label
        problem = build_problem(problem, size=size)
    comparison = run_comparison(
        problem,
        methods,
        seeds,
        out,
        options=options,
        epochs=epochs,
        progress=progress,
        force=force,
    )
    comparison.label = label or ""
    rows, md, csv_path = write_tables(comparison)
    pictures = write_plots(comparison, rows)
    return ComparisonReport(comparison, rows, md, csv_path, pictures)
