"""End to end: ``taskbalance compare`` on the small MultiDigits and Penguins configurations."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

import taskbalance as tb
from taskbalance.cli import app
from taskbalance.compare.runner import resolve_methods, run_dir

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


# --- method specs, options, the console table (the fake problem: runs in seconds) --------


@pytest.fixture
def fake_problem(monkeypatch):
    """``--problem two_regressions``: the test problem, registered for one test only."""
    from _compare_fake import TwoRegressions

    from taskbalance.compare import problem as problem_module

    problem_module._load_builtin()
    monkeypatch.setitem(problem_module._PROBLEMS, "two_regressions", TwoRegressions)
    return TwoRegressions


def _compare(out, *args, env=None):
    base = ["compare", "--problem", "two_regressions", "--size", "small", "--no-progress"]
    return runner.invoke(app, [*base, "--out", str(out), *args], env=env)


def test_options_and_variants_from_the_command_line(tmp_path, fake_problem):
    result = _compare(
        tmp_path,
        "--methods", "cagrad,cagrad[c=0.2],static[weights=1,3]",
        "--option", "cagrad.rescale=1+c",
        "--option", "cagrad.c=0.6",
        "--seeds", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "table.csv")
    assert set(rows) == {"equal", "cagrad", "cagrad[c=0.2]", "static[weights=1,3]"}
    for label in rows:
        config = json.loads((run_dir(tmp_path, label, 0) / "result.json").read_text())["config"]
        if label.startswith("cagrad"):
            assert config["options"]["rescale"] == repr("1+c")
            assert config["options"]["c"] == ("0.2" if "c=0.2" in label else "0.6")
    assert "cagrad.c=0.6" in result.output  # the options in force are printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "mgda,static"], "static needs weights"),
        (["--methods", "cagrad", "--option", "cagrad.cc=1"], "did you mean 'c'?"),
        (["--methods", "cagrad", "--option", "cagrad=1"], "METHOD.KEY=VALUE"),
        (["--methods", "cagard"], "did you mean 'cagrad'?"),
        (["--methods", "cagrad[c=0.2"], "cannot read method"),
    ],
)
def test_a_bad_selection_exits_with_one_line_before_training(tmp_path, fake_problem, args, message):
    result = _compare(tmp_path, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_all_says_which_methods_it_leaves_out(tmp_path, fake_problem):
    result = _compare(tmp_path, "--methods", "all", "--seeds", "1", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "left out static: it needs weights (--option static.weights=...)" in result.output
    assert "static" not in _rows(tmp_path / "table.csv")
    result = _compare(  # the other runs are reused
        tmp_path, "--methods", "all", "--option", "static.weights=1,2", "--seeds", "1"
    )
    assert result.exit_code == 0, result.output
    assert "static" in _rows(tmp_path / "table.csv") and "left out" not in result.output


LONG = "cagrad[c=0.2,rescale=1+c],aligned_mtl,nash_mtl[max_norm=2.0],uncertainty,imtl_l"


@pytest.mark.parametrize("columns", [80, 120])
def test_the_console_table_fits_and_never_cuts_a_method_name(tmp_path, fake_problem, columns):
    result = _compare(tmp_path, "--methods", LONG, "--seeds", "2", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "…" not in result.output
    labels = set(_rows(tmp_path / "table.csv"))
    for label in labels:  # each name whole, on one line
        assert any(label in line for line in lines), label
    if any("not shown" in line for line in lines):
        assert "table.md" in result.output
    assert "Δm%" in result.output


def test_one_seed_shows_no_spread_and_small_is_a_smoke_test(tmp_path, fake_problem):
    result = _compare(tmp_path, "--methods", "mgda,upgrad", "--seeds", "1")
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    assert "smoke test" in table.splitlines()[0] and "smoke test" in result.output
    assert "±" not in result.output
    for line in table.splitlines():
        if line.startswith("| "):
            assert "±" not in line, line
    two = _compare(tmp_path, "--methods", "mgda,upgrad", "--seeds", "2")
    assert two.exit_code == 0 and "±" in two.output  # the spread of several seeds shows
