"""End to end: ``taskbalance compare`` on the small MultiDigits and Penguins configurations."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

import taskbalance as tb
from taskbalance.cli import app
from taskbalance.compare.runner import resolve_methods

runner = CliRunner()


def _rows(path):
    with path.open() as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_every_method_gets_a_finite_row_on_small_multidigits(tmp_path):
    out = tmp_path / "md"
    args = ["compare", "--problem", "multidigits", "--size", "small", "--methods", "all"]
    result = runner.invoke(app, [*args, "--seeds", "1", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "table.csv")
    expected = set(resolve_methods("all"))
    assert set(rows) == expected and len(expected) == len(tb.list_methods()) - 1  # not static
    for method, row in rows.items():
        assert row["seeds_ok"] == "1" and row["seeds_failed"] == "0", (method, row["errors"])
        for key in ("left_acc_mean", "right_acc_mean", "delta_m", "mean_rank", "step_time_ratio"):
            assert math.isfinite(float(row[key])), (method, key)
    for picture in ("table.md", "weights.png", "losses.png", "delta_m.png"):
        assert (out / picture).stat().st_size > 0
    assert "Δm%" in result.output


def test_rerun_reuses_finished_runs_and_adds_new_ones(tmp_path):
    out = tmp_path / "pg"
    base = ["compare", "--problem", "penguins", "--size", "small", "--out", str(out)]
    first = runner.invoke(app, [*base, "--methods", "mgda", "--seeds", "2", "--no-progress"])
    assert first.exit_code == 0, first.output
    stored = out / "runs" / "mgda" / "seed1" / "result.json"
    stamp = stored.stat().st_mtime_ns
    second = runner.invoke(
        app, [*base, "--methods", "mgda,upgrad", "--seeds", "2", "--no-progress"]
    )
    assert second.exit_code == 0, second.output
    assert stored.stat().st_mtime_ns == stamp  # not run again
    assert set(_rows(out / "table.csv")) == {"equal", "mgda", "upgrad"}
    metrics = json.loads(stored.read_text())["metrics"]
    assert 0.0 <= metrics["species_acc"] <= 1.0 and metrics["body_mass_mae"] > 0


def test_bad_problem_and_method_names_are_reported(tmp_path):
    result = runner.invoke(app, ["compare", "--problem", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown problem" in result.output
    result = runner.invoke(
        app,
        ["compare", "--problem", "penguins", "--size", "small", "--methods", "bogus",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code != 0 and "unknown method" in result.output


def test_list_shows_comparison_problems():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("multidigits", "penguins", "mmoe_pair"):
        assert name in result.output
