"""Binary tasks (AUC) and the validation set of the shared supervised loop."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.models.hps import HardParameterSharing
from taskbalance.problems._supervised import (
    SupervisedData,
    SupervisedProblem,
    SupervisedTask,
    task_kpi,
    task_loss,
)


class TwoBinary(SupervisedProblem):
    """Two binary tasks on 4 inputs; the validation labels are the test labels flipped."""

    name: ClassVar[str] = "two_binary_test_only"
    SIZES: ClassVar[dict[str, dict[str, int]]] = {
        "small": {"epochs": 3, "batch_size": 32},
        "full": {"epochs": 3, "batch_size": 32},
    }
    LR: ClassVar[float] = 1e-2

    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        return (SupervisedTask("a", "binary"), SupervisedTask("b", "binary"))

    def build_data(self) -> SupervisedData:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(600, 4, generator=g)
        ys = {"a": (x[:, 0] > 0).float(), "b": (x[:, 1] + x[:, 2] > 0).float()}
        test = slice(400, 600)
        return SupervisedData(
            x[:400],
            {t: y[:400] for t, y in ys.items()},
            x[test],
            {t: y[test] for t, y in ys.items()},
            x_val=x[test],
            y_val={t: 1.0 - y[test] for t, y in ys.items()},
        )

    def build_model(self) -> nn.Module:
        return HardParameterSharing(4, self.tasks, (16,), ())


def test_binary_task_reports_auc_on_test_and_validation() -> None:
    problem = TwoBinary(size="small")
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=3)
    names = [m.name for m in problem.metrics]
    assert names == ["a_auc", "b_auc", "a_loss", "b_loss"]
    assert [m.higher_is_better for m in problem.metrics[:2]] == [True, True]
    # the tasks are learnable: the test AUC is well above chance
    assert result.metrics["a_auc"] > 0.9 and result.metrics["b_auc"] > 0.8
    validation = result.extras["validation"]
    assert set(validation) == set(names)
    # same inputs, flipped labels: the validation AUC is 1 - the test AUC, which it can
    # only be if it is computed on the validation labels
    for t in ("a", "b"):
        assert validation[f"{t}_auc"] == pytest.approx(1.0 - result.metrics[f"{t}_auc"])


def test_no_validation_set_means_no_validation_metrics() -> None:
    class NoVal(TwoBinary):
        def build_data(self) -> SupervisedData:
            d = super().build_data()
            return SupervisedData(d.x_train, d.y_train, d.x_test, d.y_test)

    problem = NoVal(size="small")
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=1)
    assert "validation" not in result.extras
    with pytest.raises(ValueError, match="no validation set"):
        problem.evaluate(problem.build_model(), problem.data(), part="validation")


def test_validation_parts_come_in_pairs() -> None:
    x = torch.zeros(4, 2)
    y = {"a": torch.zeros(4)}
    with pytest.raises(ValueError, match="both x_val and y_val"):
        SupervisedData(x, y, x, y, x_val=x)
    with pytest.raises(ValueError, match=r"validation target 'a' has shape \(3,\)"):
        SupervisedData(x, y, x, y, x_val=x, y_val={"a": torch.zeros(3)})


def test_binary_loss_and_kpi_by_hand() -> None:
    task = SupervisedTask("a", "binary")
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    target = torch.tensor([1.0, 1.0, 0.0])
    expected = (
        -(
            torch.log(torch.sigmoid(torch.tensor(2.0)))
            + torch.log(torch.sigmoid(torch.tensor(-1.0)))
            + torch.log(1 - torch.sigmoid(torch.tensor(0.5)))
        )
        / 3
    )
    assert float(task_loss(task, logits, target)) == pytest.approx(float(expected))
    # right, wrong, wrong -> accuracy 1/3
    assert task_kpi(task, logits, target) == pytest.approx(1 / 3)


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="classification, binary, regression"):
        SupervisedTask("a", "ordinal")  # type: ignore[arg-type]
