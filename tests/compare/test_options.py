"""Method specs and options of a comparison: ``cagrad[c=0.2]``, ``options={"cagrad": ...}``,
and every refusal happening before anything trains."""

from __future__ import annotations

import json
import re

import pytest
from _compare_fake import TwoRegressions

import taskbalance as tb
from taskbalance.compare import compare
from taskbalance.compare.options import (
    parse_option,
    parse_value,
    select_methods,
    spec_directory,
    split_specs,
)
from taskbalance.compare.runner import load_run, run_comparison, run_dir
from taskbalance.errors import BalancerUsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2", 0.2),
        ("-1e-3", -0.001),
        ("3", 3),
        ("true", True),
        ("False", False),
        ("none", None),
        ("1,2,3", [1, 2, 3]),
        ("0.5,2", [0.5, 2]),
        ("1+c", "1+c"),
        ("kendall", "kendall"),
    ],
)
def test_values_are_read_as_numbers_booleans_none_lists_or_strings(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_none_stays_a_string_where_the_default_is_one():
    """CAGrad's ``rescale`` takes the string "none"; ``famo.min_losses=none`` means None."""
    assert parse_option("cagrad.rescale=none") == ("cagrad", "rescale", "none")
    assert parse_option("famo.min_losses=none") == ("famo", "min_losses", None)
    assert parse_option("ew.reduction=mean") == ("equal", "reduction", "mean")  # alias


@pytest.mark.parametrize("text", ["cagrad", "c=0.2", "cagrad.c", ".c=1", "cagrad.=1"])
def test_a_malformed_option_is_refused_with_its_form(text):
    with pytest.raises(BalancerUsageError, match=r"METHOD\.KEY=VALUE, e\.g\. cagrad\.c=0\.2"):
        parse_option(text)


def test_method_lists_split_outside_brackets_only():
    text = "equal, cagrad[c=0.2,rescale=1+c] ,static[weights=1,2]"
    assert split_specs(text) == ["equal", "cagrad[c=0.2,rescale=1+c]", "static[weights=1,2]"]


def test_variants_of_one_method_are_separate_rows_with_their_own_directories():
    problem = TwoRegressions()
    selection = select_methods("cagrad,cagrad[c=0.2],cagrad[ c = 0.20 ]", problem)
    labels = [s.label for s in selection.specs]
    assert labels == ["equal", "cagrad", "cagrad[c=0.2]"]  # the same variant twice is one row
    variant = selection.specs[2]
    assert variant.method == "cagrad" and variant.options == {"c": 0.2}
    directories = {spec_directory(label) for label in labels}
    assert len(directories) == 3 and spec_directory("cagrad") == "cagrad"
    for name in directories:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
    # labels that read differently never share a directory
    assert spec_directory("cagrad[rescale=1+c]") != spec_directory("cagrad[rescale=1_c]")


def test_a_bracketed_value_wins_over_an_option_for_every_row():
    problem = TwoRegressions()
    selection = select_methods(
        ["cagrad", "cagrad[c=0.2]"], problem, {"cagrad": {"c": 0.3, "rescale": "1+c"}}
    )
    plain, variant = selection.specs[1:]
    assert plain.options == {"c": 0.3, "rescale": "1+c"}
    assert variant.options == {"c": 0.2, "rescale": "1+c"}


@pytest.mark.parametrize(
    ("methods", "options", "message"),
    [
        ("cagrad[cc=0.2]", None, r"cagrad has no option 'cc'; did you mean 'c'\?.*rescale"),
        ("cagrad", {"cagrad": {"rescal": "1+c"}}, r"did you mean 'rescale'\?"),
        ("cagard", None, r"unknown method 'cagard'; did you mean 'cagrad'\?"),
        ("mgda", {"cagrad": {"c": 0.2}}, r"options for cagrad, which is not compared"),
        ("pcgrad[seed=3]", None, r"'seed' is set by the comparison"),
        ("pcgrad", {"pcgrad": {"record": False}}, r"'record' is set by the comparison"),
        ("cagrad[c=0.2", None, r"cannot read method 'cagrad\[c=0\.2'.*NAME\[KEY=VALUE,\.\.\.\]"),
        ("cagrad[c]", None, r"cannot read method 'cagrad\[c\]'"),
        ("cagrad[c=1,c=2]", None, r"gives 'c' twice"),
        ("static", None, r"static needs weights.*static\[weights=.*--option static\.weights="),
        ("cagrad[rescale=bogus]", None, r"cagrad\[rescale=bogus\] cannot be built: .*rescale"),
        ("", None, r"no method given"),
        ("cagrad", {"cagrad": 0.2}, r"options\['cagrad'\] must map argument names"),
    ],
)
def test_a_bad_selection_is_refused_before_anything_trains(tmp_path, methods, options, message):
    problem = TwoRegressions()
    with pytest.raises(BalancerUsageError, match=message):
        run_comparison(problem, methods, 1, tmp_path, options=options, progress=False)
    assert problem.calls == []  # not even the baseline ran
    assert not (tmp_path / "runs").exists()


def test_static_fails_before_the_baseline_trains_in_compare(tmp_path):
    problem = TwoRegressions()
    with pytest.raises(BalancerUsageError, match="static needs weights"):
        compare(problem, ["mgda", "static"], 1, tmp_path, progress=False)
    with pytest.raises(BalancerUsageError, match=r"options\['mgda'\] must map"):
        compare(problem, ["mgda"], 1, tmp_path, options={"mgda": "upgrad"}, progress=False)
    assert problem.calls == [] and not list(tmp_path.iterdir())


def test_a_variant_runs_with_its_options_and_is_cached_in_its_own_directory(tmp_path):
    problem = TwoRegressions()
    report = compare(
        problem, "static[weights=1,3],static[weights=2,2]", 1, tmp_path, progress=False
    )
    assert not report.comparison.failed
    assert report.rows[0].method == "equal"
    assert {r.method for r in report.rows} == {
        "equal",
        "static[weights=1,3]",
        "static[weights=2,2]",
    }
    first = run_dir(tmp_path, "static[weights=1,3]", 0)
    second = run_dir(tmp_path, "static[weights=2,2]", 0)
    assert first != second and first.parent.parent == tmp_path / "runs"
    config, result = load_run(first, problem.tasks)
    assert config["method"] == "static" and config["options"]["weights"] == repr([1, 3])
    assert result.histories["main"].weights[0].tolist() == [1.0, 3.0]  # trained with them
    _, other = load_run(second, problem.tasks)
    assert other.histories["main"].weights[0].tolist() == [2.0, 2.0]


def test_changing_an_option_reruns_and_keeping_it_does_not(tmp_path):
    problem = TwoRegressions()
    run_comparison(problem, ["cagrad"], 1, tmp_path, options={"cagrad": {"c": 0.2}}, progress=False)
    problem.calls.clear()
    run_comparison(problem, ["cagrad"], 1, tmp_path, options={"cagrad": {"c": 0.2}}, progress=False)
    assert problem.calls == []
    run_comparison(problem, ["cagrad"], 1, tmp_path, options={"cagrad": {"c": 0.7}}, progress=False)
    assert problem.calls == [("cagrad", 0)]
    stored = json.loads((run_dir(tmp_path, "cagrad", 0) / "result.json").read_text())
    assert stored["config"]["options"]["c"] == "0.7"


def test_all_takes_static_only_with_its_weights():
    problem = TwoRegressions()
    without = select_methods("all", problem)
    assert "static" not in [s.label for s in without.specs]
    assert without.left_out == {"static": ["weights"]}
    given = select_methods("all", problem, {"static": {"weights": [1, 2]}})
    assert "static" in [s.label for s in given.specs] and given.left_out == {}
    assert len(given.specs) == len(tb.list_methods())


def test_all_can_be_combined_with_variants():
    labels = [s.label for s in select_methods("all,cagrad[c=0.2]", TwoRegressions()).specs]
    assert labels[0] == "equal" and labels[-1] == "cagrad[c=0.2]" and "cagrad" in labels
    listed = select_methods(["mgda,upgrad", "static[weights=1,2]"], TwoRegressions()).specs
    assert [s.label for s in listed] == ["equal", "mgda", "upgrad", "static[weights=1,2]"]


def test_the_progress_bar_shows_a_variant_by_its_label(tmp_path, capsys):
    problem = TwoRegressions()
    run_comparison(problem, ["cagrad[c=0.2]"], 1, tmp_path, progress=True)
    assert "cagrad[c=0.2] seed 0" in capsys.readouterr().out  # not read as rich markup
