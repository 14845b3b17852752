import csv
import json
import statistics

import pytest
import torch
from _compare_fake import TwoRegressions

from taskbalance.compare import compare, delta_m
from taskbalance.compare.runner import load_run, resolve_methods, run_comparison, run_dir


def test_resolve_methods_puts_the_baseline_first():
    assert resolve_methods(["mgda", "ew"]) == ["equal", "mgda"]
    everything = resolve_methods("all")
    assert everything[0] == "equal" and len(everything) == len(set(everything))


def test_all_leaves_out_methods_that_need_arguments():
    problem = TwoRegressions()
    assert "static" not in resolve_methods("all", problem)
    problem.method_options = lambda m: {"weights": [1.0, 2.0]} if m == "static" else {}
    assert "static" in resolve_methods("all", problem)


def test_famo_gets_the_losses_after_each_step(tmp_path, caplog):
    problem = TwoRegressions()
    with caplog.at_level("WARNING", logger="taskbalance"):
        report = compare(problem, ["famo"], 1, tmp_path, progress=False)
    assert not report.comparison.failed
    assert "update(new_losses) was not called" not in caplog.text
    weights = report.comparison.runs["famo"][0].result.histories["main"].weights
    assert not torch.allclose(weights[-1], weights[0])  # the logits learned


def test_runs_are_stored_and_reused(tmp_path):
    problem = TwoRegressions()
    first = run_comparison(problem, ["upgrad", "dwa"], 2, tmp_path, progress=False)
    assert sorted(problem.calls) == sorted(
        (m, s) for m in ("equal", "upgrad", "dwa") for s in (0, 1)
    )
    assert not any(r.cached for rs in first.runs.values() for r in rs)
    for method in ("equal", "upgrad", "dwa"):
        assert (run_dir(tmp_path, method, 1) / "history_main.csv").exists()
    # the stored history is the balancer's: 2 epochs x 4 steps, weights of DWA sum to K
    dwa = first.runs["dwa"][0].result.histories["main"]
    assert len(dwa) == 8
    assert dwa.weights.sum(dim=1).tolist() == pytest.approx([2.0] * 8)

    problem.calls.clear()
    again = run_comparison(problem, ["upgrad", "dwa"], 2, tmp_path, progress=False)
    assert problem.calls == []
    assert all(r.cached for rs in again.runs.values() for r in rs)
    assert again.runs["upgrad"][1].result.metrics == first.runs["upgrad"][1].result.metrics

    # an interrupted comparison: one run never finished -> only it runs again
    (run_dir(tmp_path, "dwa", 1) / "result.json").unlink()
    run_comparison(problem, ["upgrad", "dwa"], 2, tmp_path, progress=False)
    assert problem.calls == [("dwa", 1)]

    # another configuration (epochs) is not reused
    problem.calls.clear()
    run_comparison(problem, ["equal"], 1, tmp_path, epochs=1, progress=False)
    assert problem.calls == [("equal", 0)]


def test_a_failing_method_is_recorded_and_the_rest_goes_on(tmp_path):
    problem = TwoRegressions(fail_for="mgda", nan_for="pcgrad")
    report = compare(problem, ["mgda", "pcgrad", "imtl"], 1, tmp_path, progress=False)
    failed = {r.method: r.error for r in report.comparison.failed}
    assert set(failed) == {"mgda", "pcgrad"}
    assert "forced failure" in failed["mgda"] and "non-finite" in failed["pcgrad"]
    stored = json.loads((run_dir(tmp_path, "mgda", 0) / "result.json").read_text())
    assert stored["status"] == "failed"
    text = report.table_md.read_text()
    assert "| mgda | failed" in text and "| imtl |" in text
    # a failed run is retried next time
    problem.calls.clear()
    run_comparison(problem, ["mgda"], 1, tmp_path, progress=False)
    assert problem.calls == [("mgda", 0)]


def test_table_numbers_come_from_the_stored_runs(tmp_path):
    problem = TwoRegressions()
    report = compare(problem, ["upgrad", "uncertainty"], 3, tmp_path, progress=False)
    stored = {
        m: [json.loads((run_dir(tmp_path, m, s) / "result.json").read_text()) for s in range(3)]
        for m in ("equal", "upgrad", "uncertainty")
    }
    keys = ("mse_a", "score_b")
    base = {k: statistics.fmean(r["metrics"][k] for r in stored["equal"]) for k in keys}
    with report.table_csv.open() as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"equal", "upgrad", "uncertainty"}
    for method, runs in stored.items():
        row = rows[method]
        values = [r["metrics"]["mse_a"] for r in runs]
        assert float(row["mse_a_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["mse_a_std"]) == pytest.approx(statistics.stdev(values))
        deltas = [delta_m(r["metrics"], base, problem.metrics) for r in runs]
        assert float(row["delta_m"]) == pytest.approx(statistics.fmean(deltas))
        time_ratio = statistics.fmean(r["step_time"] for r in runs) / statistics.fmean(
            r["step_time"] for r in stored["equal"]
        )
        assert float(row["step_time_ratio"]) == pytest.approx(time_ratio)
    assert float(rows["equal"]["step_time_ratio"]) == pytest.approx(1.0)
    assert abs(float(rows["equal"]["delta_m"])) < 1e-9 or float(rows["equal"]["delta_m_std"]) > 0
    md = report.table_md.read_text()
    assert md.count("\n| ") == 4  # header + 3 methods
    names = {p.name for p in report.pictures}
    assert names == {"weights.png", "losses.png", "delta_m.png"}
    for picture in report.pictures:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_run_round_trips_the_history(tmp_path):
    problem = TwoRegressions()
    report = compare(problem, ["uncertainty"], 1, tmp_path, progress=False)
    config, result = load_run(run_dir(tmp_path, "uncertainty", 0), problem.tasks)
    assert config["method"] == "uncertainty" and config["seed"] == 0
    history = result.histories["main"]
    original = report.comparison.runs["uncertainty"][0].result.histories["main"]
    assert history.steps == original.steps
    assert history.weights.tolist() == original.weights.tolist()
    assert history.extra_names == original.extra_names


def test_the_code_a_run_depends_on_is_fingerprinted():
    """Editing a method's module (or what it imports) changes its fingerprint; others keep
    theirs; presentation modules are not followed."""
    import taskbalance as tb
    from taskbalance.compare.fingerprint import dependencies

    pcgrad = dependencies(tb.get("pcgrad"))
    assert {"taskbalance.aggregation.pcgrad", "taskbalance.aggregation.base"} <= set(pcgrad)
    assert {"taskbalance.gradients", "taskbalance.balancer"} <= set(pcgrad)
    assert "taskbalance.aggregation.upgrad" not in pcgrad  # no link between methods
    assert "taskbalance.aggregation.pcgrad" in dependencies(tb.get("gradvac"))  # imported
    assert "taskbalance.aggregation._dual_cone" in dependencies(tb.get("upgrad"))
    assert not any(".compare.report" in m or ".plots" in m for m in pcgrad)
    assert "taskbalance.compare.problem" in dependencies(TwoRegressions)


def test_a_run_of_other_code_is_not_reused(tmp_path, monkeypatch):
    from taskbalance.compare import runner

    problem = TwoRegressions()
    run_comparison(problem, ["pcgrad"], 1, tmp_path, progress=False)
    problem.calls.clear()
    real = runner.code_fingerprint
    monkeypatch.setattr(
        runner, "code_fingerprint", lambda m, p: "edited" if m.__name__ == "PCGrad" else real(m, p)
    )
    run_comparison(problem, ["pcgrad"], 1, tmp_path, progress=False)
    assert problem.calls == [("pcgrad", 0)]  # equal weighting's code did not change
    config, _ = load_run(run_dir(tmp_path, "pcgrad", 0), problem.tasks)
    assert config["code"] == "edited"
