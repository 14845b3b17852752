"""Problems with options (``--problem penguins[data_seed=1]``) and the baseline rows on
the command line."""

from __future__ import annotations

import csv

import pytest
from _compare_fake import TwoRegressions
from typer.testing import CliRunner

from taskbalance.cli import app
from taskbalance.compare import compare
from taskbalance.compare.options import build_problem, parse_problem, spec_directory
from taskbalance.errors import BalancerUsageError

runner = CliRunner()


@pytest.fixture
def fake_problem(monkeypatch):
    """``--problem two_regressions``: the test problem, registered for one test only."""
    from taskbalance.compare import problem as problem_module

    problem_module._load_builtin()
    monkeypatch.setitem(problem_module._PROBLEMS, "two_regressions", TwoRegressions)
    return TwoRegressions


def test_a_problem_spec_is_read_like_a_method_spec():
    assert parse_problem("penguins") == ("penguins", {}, "penguins")
    name, values, label = parse_problem(" penguins[ data_seed = 2 ] ")
    assert (name, values, label) == ("penguins", {"data_seed": 2}, "penguins[data_seed=2]")
    problem = build_problem("penguins[data_seed=2]", size="small")
    assert problem.data_seed == 2 and problem.size == "small"


def test_compare_passes_the_options_to_the_problem(tmp_path, fake_problem):
    report = compare(
        "two_regressions[fail_for=mgda]", ["mgda"], 1, tmp_path, size="small", progress=False
    )
    assert report.comparison.problem.fail_for == "mgda"
    assert [r.method for r in report.comparison.failed] == ["mgda"]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (
            "penguins[data_sed=1]",
            BalancerUsageError,
            r"did you mean 'data_seed'.*options: data_seed",
        ),
        ("penguins[size=small]", BalancerUsageError, "--size"),
        ("penguins[data_seed=1", BalancerUsageError, "cannot read problem"),
        ("penguins[data_seed=1,data_seed=2]", BalancerUsageError, "twice"),
        ("penguins[data_seed=-1]", BalancerUsageError, "cannot be built: ValueError"),
        ("pingus[data_seed=1]", KeyError, "unknown problem"),
    ],
)
def test_a_bad_problem_spec_is_refused(spec, error, message):
    with pytest.raises(error, match=message):
        build_problem(spec, size="small")


def test_the_command_line_takes_a_problem_spec_and_names_its_folder(
    tmp_path, monkeypatch, fake_problem
):
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--problem", "two_regressions[nan_for=pcgrad]", "--size", "small"]
    result = runner.invoke(app, [*args, "--methods", "pcgrad", "--seeds", "1", "--no-progress"])
    assert result.exit_code == 1, result.output  # the option reached the problem: NaN
    folder = tmp_path / "runs" / spec_directory("two_regressions[nan_for=pcgrad]")
    assert folder.name.startswith("two_regressions__nan_for-pcgrad__")
    assert (folder / "table.md").exists()


def test_the_command_line_refuses_an_unknown_problem_option(tmp_path, fake_problem):
    result = runner.invoke(
        app,
        ["compare", "--problem", "two_regressions[bogus=1]", "--out", str(tmp_path)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2
    assert "two_regressions has no option 'bogus'" in result.output
    assert "fail_for, nan_for" in result.output
    assert not (tmp_path / "runs").exists()


def test_the_command_line_runs_single_task_and_shows_both_delta_m(tmp_path, fake_problem):
    result = runner.invoke(
        app,
        ["compare", "--problem", "two_regressions", "--size", "small", "--methods",
         "mgda,single_task", "--seeds", "1", "--out", str(tmp_path), "--no-progress"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Δm% vs STL" in result.output and "one network per task" in result.output
    with (tmp_path / "table.csv").open() as fh:
        assert [r["method"] for r in csv.DictReader(fh)][:2] == ["equal", "single_task"]


def test_the_command_line_refuses_tuned_static_without_validation(tmp_path, fake_problem):
    result = runner.invoke(
        app,
        ["compare", "--problem", "two_regressions", "--size", "small", "--methods",
         "tuned_static", "--out", str(tmp_path), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tuned_static cannot run here" in lines[0]
    assert "validation" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_tables_and_pictures_name_the_problem_by_its_spec(tmp_path) -> None:
    from taskbalance.compare import compare

    report = compare(
        "penguins[data_seed=1]", "equal", seeds=1, out=tmp_path, size="small", progress=False
    )
    assert report.table_md.read_text().startswith("# penguins[data_seed=1]: smoke test")
    assert report.comparison.title_name == "penguins[data_seed=1]"
    plain = compare("penguins", "equal", seeds=1, out=tmp_path / "p", size="small",
                    progress=False)  # fmt: skip
    assert plain.table_md.read_text().startswith("# penguins: smoke test")
