"""Yeast: the split, the summaries (mean AUC, Hamming loss) and a short run on the real file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance.compare.problem import RunResult
from taskbalance.problems._scores import roc_auc
from taskbalance.problems.yeast import TASKS, Yeast, split_rows


def _labels(n: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 14)) < 0.4).astype(np.int8)
    return labels


def test_split_is_disjoint_complete_and_seed_stable() -> None:
    labels = _labels()
    train, val, test = split_rows(labels, data_seed=0)
    assert (len(train), len(val), len(test)) == (60, 20, 20)
    assert sorted([*train, *val, *test]) == list(range(100))
    again = split_rows(labels, data_seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
    assert not np.array_equal(split_rows(labels, data_seed=1)[0], train)


def test_a_label_missing_from_a_part_is_refused() -> None:
    labels = _labels()
    labels[:, 13] = 0
    labels[0, 13] = 1  # one positive row: two of the three parts have none
    with pytest.raises(ValueError, match="only one class of class14"):
        split_rows(labels, data_seed=0)


def test_summaries_by_hand() -> None:
    problem = Yeast(size="small")
    g = torch.Generator().manual_seed(0)
    targets = {t: (torch.rand(40, generator=g) < 0.5).float() for t in TASKS}
    outputs = {t: torch.randn(40, 1, generator=g) for t in TASKS}
    values = problem.summary_values(outputs, targets)
    aucs = [roc_auc(outputs[t].reshape(-1), targets[t]) for t in TASKS]
    assert values["mean_auc"] == pytest.approx(sum(aucs) / 14)
    wrong = sum(int(((outputs[t].reshape(-1) > 0) != (targets[t] == 1)).sum()) for t in TASKS)
    assert values["hamming"] == pytest.approx(wrong / (40 * 14))


def test_single_task_summaries_take_each_network_on_its_own_label() -> None:
    problem = Yeast(size="small")
    results = {}
    for k, task in enumerate(TASKS):
        metrics = {f"{t}_{kind}": 0.5 for t in TASKS for kind in ("auc", "loss")}
        metrics.update(mean_auc=0.0, hamming=1.0)  # wrong for a single-task row: replaced
        metrics[f"{task}_auc"] = 0.6 + 0.01 * k  # its own label: the one that counts
        errors = {t: 0.9 for t in TASKS}
        errors[task] = 0.1 + 0.01 * k
        results[task] = RunResult(metrics, {}, 0.0, 0, extras={"label_errors": errors})
    combined = problem.combine_single_task(results)
    assert combined["class3_auc"] == pytest.approx(0.62)  # from the class3 network
    assert combined["mean_auc"] == pytest.approx(0.6 + 0.01 * 6.5)
    assert combined["hamming"] == pytest.approx(0.1 + 0.01 * 6.5)


@pytest.mark.registry
def test_data_and_a_short_run(yeast) -> None:
    problem = Yeast(size="small")
    data = problem.data()
    assert data.x_train.shape == (1450, 103)
    assert len(data.x_val) == 484 and len(data.x_test) == 483
    assert torch.allclose(data.x_train.mean(0), torch.zeros(103), atol=1e-4)
    _, labels = yeast
    train, _, test = split_rows(labels, 0)
    assert np.array_equal(data.y_test["class3"].numpy(), labels[test, 2])
    assert np.array_equal(data.y_train["class14"].numpy(), labels[train, 13])
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=3)
    names = [m.name for m in problem.metrics]
    assert names[:14] == [f"{t}_auc" for t in TASKS]
    assert names[14:16] == ["mean_auc", "hamming"]
    assert 0.55 < result.metrics["mean_auc"] < 1.0
    assert 0.0 < result.metrics["hamming"] < 0.35
    errors = result.extras["label_errors"]
    # the Hamming loss is the mean of the per-label error rates
    assert result.metrics["hamming"] == pytest.approx(sum(errors.values()) / 14)
    assert "mean_auc" in result.extras["validation"]
