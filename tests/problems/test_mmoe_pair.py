import math

import pytest
import torch

import taskbalance as tb
from taskbalance.compare import make_problem
from taskbalance.problems.mmoe_synthetic import label_correlation, make_data


def test_data_is_standardised_with_training_statistics_and_seed_independent():
    problem = make_problem("mmoe_pair", size="small")
    data = problem.data()
    for task in problem.tasks:
        y = data.y_train[task]
        assert float(y.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(y.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # the raw labels, rebuilt by hand: standardised value * scale + mean = raw label
    x, raw = make_data(0.5, 2048, seed=0)
    mean, std = raw[:1024].mean(0), raw[:1024].std(0, unbiased=False)
    assert data.scales["y2"] == pytest.approx(float(std[1]))
    assert torch.allclose(data.y_test["y1"] * std[0] + mean[0], raw[1024:, 0], atol=1e-4)
    assert torch.equal(data.x_test, x[1024:])


def test_the_two_tasks_are_weakly_correlated():
    _, y = make_data(0.5, 20_000, seed=0)
    empirical = float(torch.corrcoef(y.T)[0, 1])
    assert empirical == pytest.approx(label_correlation(0.5), abs=0.05)
    assert empirical < 0.4


def test_small_run_gives_finite_metrics_for_loss_and_gradient_methods():
    problem = make_problem("mmoe_pair", size="small")
    for method in ("equal", "mgda_ub", "upgrad"):
        result = problem.run(lambda m=method: tb.make(m, problem.tasks), seed=0, epochs=1)
        assert set(result.metrics) == {"y1_mae", "y2_mae", "y1_loss", "y2_loss"}
        assert all(math.isfinite(v) for v in result.metrics.values())
        assert result.steps == 4 and len(result.histories["main"]) == 4
