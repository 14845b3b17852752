"""Small end-to-end comparisons on the real-data problems (files fetched from the registry):
tables, the two Δm% columns, pictures, and the tuned-static choice made on validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskbalance.compare import compare
from taskbalance.compare.metrics import delta_m

pytestmark = [pytest.mark.registry, pytest.mark.xdist_group(name="real_data_compare")]


def _check_report(report, out: Path, rows: list[str]) -> None:
    table = report.table_md.read_text()
    for row in rows:
        assert f"| {row} " in table or f"| **{row}** " in table, row
    assert "vs STL" in table
    header = report.table_csv.read_text().splitlines()[0]
    assert "delta_m_stl" in header and "weights" in header
    names = {p.name for p in report.pictures}
    assert {"delta_m.png", "losses.png"} <= names
    for picture in report.pictures:
        assert picture.stat().st_size > 5_000
    assert not report.comparison.failed


def _tuning_choice_from_validation(problem, out: Path) -> int:
    """The candidate with the lowest validation Δm% against candidate 0, recomputed from the
    stored tuning runs."""
    runs = sorted((out / "runs" / "tuned_static" / "tuning").glob("cand*/result.json"),
                  key=lambda p: int(p.parent.name[4:]))  # fmt: skip
    stored = [json.loads(p.read_text()) for p in runs]
    validation = [s["extras"]["validation"] for s in stored]
    scores = [delta_m(v, validation[0], problem.metrics) for v in validation]
    return min(range(len(scores)), key=lambda i: (scores[i], i))


def test_census_income_small(census_income, tmp_path: Path) -> None:
    out = tmp_path / "census"
    report = compare(
        "census_income[group=2]",
        "equal,mgda,single_task,tuned_static",
        seeds=1,
        out=out,
        size="small",
        progress=False,
    )
    _check_report(report, out, ["equal", "mgda", "single_task", "tuned_static"])
    problem = report.comparison.problem
    assert problem.group == 2 and problem.tasks == ("education", "marital")
    tuning = report.comparison.tuning
    assert tuning.chosen == _tuning_choice_from_validation(problem, out)
    assert len(tuning.candidates) == 9


def test_yeast_small(yeast, tmp_path: Path) -> None:
    out = tmp_path / "yeast"
    report = compare(
        "yeast", "equal,upgrad,single_task,tuned_static", seeds=1, out=out, size="small",
        progress=False,
    )  # fmt: skip
    _check_report(report, out, ["equal", "upgrad", "single_task", "tuned_static"])
    rows = {r.method: r for r in report.rows}
    assert rows["single_task"].seeds_ok == 1
    for row in rows.values():
        assert 0.5 < row.mean["mean_auc"] < 1.0 and 0.0 < row.mean["hamming"] < 0.4
    assert report.comparison.tuning.chosen == _tuning_choice_from_validation(
        report.comparison.problem, out
    )
