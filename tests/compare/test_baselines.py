"""The baseline rows of ``taskbalance compare``: ``single_task`` (one network per task) and
``tuned_static`` (static weights tuned on the validation split), the Δm% against the
single-task networks, and problems declaring their baselines. Fake problems, no training
(except one tiny Penguins run that checks the untrained heads)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import statistics

import numpy as np
import pytest
import torch
from _baseline_fake import WeightFake, peaked
from _compare_fake import TwoRegressions

from taskbalance.compare import compare, delta_m
from taskbalance.compare.baselines import (
    Tuning,
    choose_candidate,
    single_task_weights,
    tuning_candidates,
)
from taskbalance.compare.options import select_methods
from taskbalance.compare.problem import Metric, RunResult
from taskbalance.compare.report import build_rows, console_table, notes
from taskbalance.compare.runner import resolve_methods, run_comparison, run_dir
from taskbalance.errors import BalancerUsageError


def _csv(path):
    with path.open() as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


# --- the candidates and the selection rule (pure functions) ------------------------------


def test_two_tasks_try_the_grid_of_nine_with_equal_weighting_first():
    candidates = tuning_candidates(2)
    assert candidates[0] == [1.0, 1.0]
    assert len(candidates) == 9
    firsts = sorted(round(w[0], 12) for w in candidates)
    assert firsts == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8]
    for w in candidates:
        assert w[0] + w[1] == pytest.approx(2.0)
    assert tuning_candidates(2, n=3) == candidates  # the grid, whatever n


def test_more_tasks_draw_dirichlet_vectors_from_the_seed():
    candidates = tuning_candidates(4, n=8, seed=0)
    assert len(candidates) == 8 and candidates[0] == [1.0] * 4
    draws = np.random.default_rng(0).dirichlet(np.ones(4), size=7) * 4
    assert np.allclose(np.array(candidates[1:]), draws)
    for w in candidates:
        assert sum(w) == pytest.approx(4.0) and min(w) > 0
    assert tuning_candidates(4, n=8, seed=0) == candidates  # seed-stable
    assert tuning_candidates(4, n=8, seed=1)[1:] != candidates[1:]
    assert tuning_candidates(3, n=1) == [[1.0, 1.0, 1.0]]
    assert len(tuning_candidates(14)) == 8  # the default n


@pytest.mark.parametrize(("k", "n", "message"), [(0, 8, "number of tasks"), (3, 0, "candidates")])
def test_candidates_refuse_nonsense_sizes(k, n, message):
    with pytest.raises(ValueError, match=message):
        tuning_candidates(k, n)


METRICS = (Metric("acc", "a", True), Metric("err", "b", False))


def test_selection_scores_by_delta_m_against_candidate_0_and_ties_go_to_the_lower_index():
    validation = [
        {"acc": 0.5, "err": 1.0},
        {"acc": 0.6, "err": 1.0},  # Δm% = -10
        None,  # failed
        {"acc": 0.5, "err": 0.8},  # Δm% = -10: a tie with candidate 1
        {"acc": 0.4, "err": 1.0},
    ]
    chosen, scores = choose_candidate(validation, METRICS)
    assert chosen == 1
    assert scores[0] == 0.0 and scores[2] is None
    assert scores[1] == pytest.approx(-10.0) and scores[3] == pytest.approx(-10.0)
    assert scores[4] == pytest.approx(10.0)


def test_selection_needs_the_reference_candidate():
    with pytest.raises(ValueError, match="candidate 0"):
        choose_candidate([None, {"acc": 0.6, "err": 1.0}], METRICS)


def test_single_task_weights_are_one_hot():
    assert single_task_weights(("a", "b", "c"), "b") == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not one of"):
        single_task_weights(("a", "b"), "z")


# --- single_task ---------------------------------------------------------------------------


def test_single_task_takes_each_tasks_metrics_from_its_own_run(tmp_path):
    problem = WeightFake(tasks=("a", "b", "c"), summary=True)
    report = compare(problem, ["single_task"], 2, tmp_path, progress=False)
    assert not report.comparison.failed
    # one static run per task and seed, one-hot weights
    static = sorted(c for c in problem.calls if c[0] == "static")
    hot = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    assert static == sorted(("static", w, s) for w in hot for s in (0, 1))
    for seed, record in enumerate(report.comparison.runs["single_task"]):
        result = record.result
        for task in "abc":  # 0.5 + 0.1·1 from its own run (0.5 in the others)
            assert result.metrics[f"score_{task}"] == pytest.approx(0.6 + 0.01 * seed)
        # a metric of no task: the mean over the runs (each run's mean is (0.6 + 1.0) / 3)
        assert result.metrics["mean_score"] == pytest.approx(1.6 / 3 + 0.01 * seed)
        assert result.step_time == pytest.approx(3 * WeightFake.STEP_TIME)  # K networks
        assert result.steps == 3 * WeightFake.STEPS
        assert result.epoch_losses == {t: [1.0, 2.0] for t in "abc"}  # run k's curve of k
    for task in "abc":
        stored = tmp_path / "runs" / "single_task" / task / "seed1" / "result.json"
        assert json.loads(stored.read_text())["config"]["task"] == task
    rows = _csv(report.table_csv)
    assert float(rows["single_task"]["step_time_ratio"]) == pytest.approx(3.0)

    problem.calls.clear()  # cached: nothing runs again
    again = run_comparison(problem, ["single_task"], 2, tmp_path, progress=False)
    assert problem.calls == []
    assert (
        again.runs["single_task"][1].result.metrics
        == report.comparison.runs["single_task"][1].result.metrics
    )


def test_a_problem_can_recompute_its_summary_metrics_for_single_task(tmp_path):
    class Recomputed(WeightFake):
        def combine_single_task(self, results_by_task):
            own = {f"score_{t}": r.metrics[f"score_{t}"] for t, r in results_by_task.items()}
            return {**own, "mean_score": statistics.fmean(own.values())}

    problem = Recomputed(tasks=("a", "b"), summary=True)
    report = compare(problem, ["single_task"], 1, tmp_path, progress=False)
    assert report.comparison.runs["single_task"][0].result.metrics["mean_score"] == (
        pytest.approx(0.6)
    )


def test_the_default_combination_averages_metrics_of_no_task():
    problem = WeightFake(tasks=("a", "b"), summary=True)
    runs = {
        "a": RunResult({"score_a": 0.9, "score_b": 0.1, "mean_score": 0.5}, {}, 0.0, 0),
        "b": RunResult({"score_a": 0.2, "score_b": 0.8, "mean_score": 0.3}, {}, 0.0, 0),
    }
    assert problem.combine_single_task(runs) == pytest.approx(
        {"score_a": 0.9, "score_b": 0.8, "mean_score": 0.4}
    )


def test_a_failed_single_task_run_fails_the_seed_and_names_the_task(tmp_path):
    class FailsOnB(WeightFake):
        def run(self, make_balancer, *, seed, epochs, progress=False):
            result = super().run(make_balancer, seed=seed, epochs=epochs)
            if self.calls[-1][1] == (0.0, 1.0):
                raise RuntimeError("b broke")
            return result

    report = compare(FailsOnB(), ["single_task"], 1, tmp_path, progress=False)
    (record,) = report.comparison.runs["single_task"]
    assert record.status == "failed" and "task b" in record.error and "b broke" in record.error
    assert "Δm% vs STL" not in report.table_md.read_text()  # no finished reference


def test_single_task_networks_leave_the_other_heads_as_initialised(tmp_path, monkeypatch):
    """On a real problem (Penguins, Adam): zero static weights give the other heads zero
    gradients, so they keep their initial values; the trained head changes."""
    from taskbalance.compare.problem import make_problem

    problem = make_problem("penguins", size="small")
    built = []
    real = problem.build_model

    def build_model():
        model = real()
        built.append((model, copy.deepcopy(model.state_dict())))
        return model

    monkeypatch.setattr(problem, "build_model", build_model)
    report = run_comparison(problem, ["single_task"], [0], tmp_path, epochs=1, progress=False)
    assert report.runs["single_task"][0].status == "ok"
    assert len(built) == 1 + len(problem.tasks)  # equal weighting, then one run per task
    for task, (model, initial) in zip(problem.tasks, built[1:]):
        for name, value in model.state_dict().items():
            if not name.startswith("towers."):
                continue
            unchanged = torch.equal(value, initial[name])
            assert unchanged == (not name.startswith(f"towers.{task}.")), (task, name)


# --- tuned_static ----------------------------------------------------------------------------


def test_tuned_static_selects_on_validation_only(tmp_path):
    """Validation prefers candidate 3 (w = 0.6, 1.4), the test split candidate 5 (1.2, 0.8):
    the row must train candidate 3."""
    problem = WeightFake(score=peaked(validation_peak=0.6, test_peak=1.2))
    assert tuning_candidates(2)[3] == [0.6, 1.4] and tuning_candidates(2)[5] == [1.2, 0.8]
    report = compare(problem, ["tuned_static"], 2, tmp_path, progress=False)
    tuning = report.comparison.tuning
    assert isinstance(tuning, Tuning) and tuning.chosen == 3
    assert tuning.weights == [0.6, 1.4]
    static = [c for c in problem.calls if c[0] == "static"]
    tuning_calls, final = static[:9], static[9:]
    assert sorted(c[1] for c in tuning_calls) == sorted(
        tuple(round(w, 6) for w in c) for c in tuning_candidates(2)
    )
    assert {c[2] for c in tuning_calls} == {0}  # every candidate with the tuning seed
    assert final == [("static", (0.6, 1.4), 0), ("static", (0.6, 1.4), 1)]
    for seed, record in enumerate(report.comparison.runs["tuned_static"]):
        assert record.result.metrics["score_a"] == pytest.approx(1 - (0.6 - 1.2) ** 2)
        config = json.loads((run_dir(tmp_path, "tuned_static", seed) / "result.json").read_text())
        assert config["config"]["options"]["weights"] == repr([0.6, 1.4])
    best = min(range(9), key=lambda i: (tuning.scores[i], i))
    assert best == 3 and tuning.scores[0] == 0.0


def test_tuning_runs_are_cached_and_their_cost_reported(tmp_path):
    problem = WeightFake(score=peaked(validation_peak=0.6, test_peak=1.2))
    report = compare(problem, ["tuned_static"], 2, tmp_path, progress=False)
    walls = [
        json.loads((tmp_path / "runs" / "tuned_static" / "tuning" / f"cand{i}" / "result.json")
        .read_text())["wall_time"]
        for i in range(9)
    ]  # fmt: skip
    ew = [
        json.loads((run_dir(tmp_path, "equal", s) / "result.json").read_text())["wall_time"]
        for s in (0, 1)
    ]
    row = _csv(report.table_csv)["tuned_static"]
    assert row["weights"] == "0.6,1.4" and row["tuning_runs"] == "9"
    assert float(row["tuning_seconds"]) == pytest.approx(sum(walls))
    assert float(row["tuning_ew_runs"]) == pytest.approx(sum(walls) / statistics.fmean(ew))
    assert _csv(report.table_csv)["equal"]["weights"] == ""
    text = report.table_md.read_text()
    assert "a 0.6, b 1.4 (candidate 3" in text and "tuning cost 9 runs" in text
    assert "equal-weighting run" in text and "validation split only" in text

    problem.calls.clear()
    again = compare(problem, ["tuned_static"], 2, tmp_path, progress=False)
    assert problem.calls == []
    assert again.comparison.tuning.chosen == 3 and again.comparison.tuning.cached == 9
    assert again.comparison.tuning.seconds == pytest.approx(sum(walls))


def test_a_problem_without_validation_refuses_an_explicit_tuned_static(tmp_path):
    with pytest.raises(BalancerUsageError, match=r"tuned_static cannot run here.*validation"):
        compare(WeightFake(validation=False), ["tuned_static"], 1, tmp_path, progress=False)
    with pytest.raises(BalancerUsageError, match="validation split"):
        select_methods("mgda,tuned_static", TwoRegressions())
    assert not (tmp_path / "runs").exists()  # refused before anything trained


def test_all_leaves_tuned_static_out_without_validation_and_says_why(tmp_path, caplog):
    class Declares(WeightFake):
        baselines = ("single_task", "tuned_static")

    with caplog.at_level(logging.INFO, logger="taskbalance"):
        comparison = run_comparison(Declares(validation=False), "all", 1, tmp_path, progress=False)
    assert "single_task" in comparison.runs and "tuned_static" not in comparison.runs
    assert "tuned_static" in comparison.unavailable
    assert "leaves out tuned_static" in caplog.text and "validation" in caplog.text
    assert any(
        "Left out by `all`: " in line and "tuned_static (" in line for line in notes(comparison)
    )


def test_a_run_without_validation_metrics_fails_the_row_with_the_reason(tmp_path):
    problem = WeightFake(reports_validation=False)  # declares a split, reports none
    report = compare(problem, ["tuned_static", "rlw"], 1, tmp_path, progress=False)
    (record,) = report.comparison.runs["tuned_static"]
    assert record.status == "failed"
    assert "extras['validation']" in record.error and "candidate 0" in record.error
    assert report.comparison.runs["rlw"][0].status == "ok"  # the rest goes on
    assert "tuning failed" in report.table_md.read_text()


# --- rows, order, declared baselines -------------------------------------------------------


def test_rows_are_equal_then_the_baselines_then_the_methods():
    problem = WeightFake()
    labels = resolve_methods("mgda,tuned_static,rlw,single_task", problem)
    assert labels == ["equal", "single_task", "tuned_static", "mgda", "rlw"]


def test_all_adds_only_the_baselines_a_problem_declares():
    assert not {"single_task", "tuned_static"} & set(resolve_methods("all", WeightFake()))

    class Declares(WeightFake):
        baselines = ("single_task", "tuned_static")

    labels = resolve_methods("all", Declares())
    assert labels[:3] == ["equal", "single_task", "tuned_static"]
    assert "mgda" in labels
    # an explicit baseline works on any problem
    assert resolve_methods("single_task,mgda", TwoRegressions()) == ["equal", "single_task", "mgda"]


def test_a_declared_baseline_must_exist():
    class Typo(WeightFake):
        baselines = ("single_tsk",)

    with pytest.raises(BalancerUsageError, match=r"Typo\.baselines names 'single_tsk'"):
        select_methods("all", Typo())


@pytest.mark.parametrize(
    ("methods", "options", "message"),
    [
        ("single_task[weights=1,0]", None, "single_task is a baseline row.*no options"),
        ("tuned_static", {"tuned_static": {"n": 4}}, "tuned_static is a baseline row"),
        ("single_tsk", None, "did you mean 'single_task'"),
    ],
)
def test_baseline_rows_take_no_options_and_typos_are_named(methods, options, message):
    with pytest.raises(BalancerUsageError, match=message):
        select_methods(methods, WeightFake(), options)


# --- the Δm% against the single-task networks ------------------------------------------------


def test_delta_m_against_single_task_is_a_second_column(tmp_path):
    problem = TwoRegressions()
    report = compare(problem, ["single_task", "mgda"], 2, tmp_path, progress=False)
    runs = report.comparison.runs
    stl = {
        name: statistics.fmean(r.result.metrics[name] for r in runs["single_task"])
        for name in ("mse_a", "score_b", "steps_seen")
    }
    rows = _csv(report.table_csv)
    for label in ("equal", "single_task", "mgda"):
        deltas = [delta_m(r.result.metrics, stl, problem.metrics) for r in runs[label]]
        assert float(rows[label]["delta_m_stl"]) == pytest.approx(statistics.fmean(deltas))
        assert float(rows[label]["delta_m_stl_std"]) == pytest.approx(statistics.stdev(deltas))
        # the first Δm% stays against equal weighting
        base = {
            name: statistics.fmean(r.result.metrics[name] for r in runs["equal"]) for name in stl
        }
        first = [delta_m(r.result.metrics, base, problem.metrics) for r in runs[label]]
        assert float(rows[label]["delta_m"]) == pytest.approx(statistics.fmean(first))
    text = report.table_md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "| Δm% ↓ | Δm% vs STL ↓ |" in header
    assert "against the single-task networks" in text
    table, hidden = console_table(report.comparison, build_rows(report.comparison), 400)
    assert hidden == [] and "Δm% vs STL ↓" in [c.header for c in table.columns]


def test_without_single_task_there_is_no_second_delta_m(tmp_path):
    report = compare(TwoRegressions(), ["mgda"], 1, tmp_path, progress=False)
    assert "delta_m_stl" not in report.table_csv.read_text().splitlines()[0]
    assert "STL" not in report.table_md.read_text()
