"""Static weighting: L = sum_i w_i L_i with user-fixed w_i."""

from __future__ import annotations

import logging

import pytest
import torch

import taskbalance as tb
from conftest import const


def test_hand_computed_three_tasks() -> None:
    bal = tb.StaticWeighting(["a", "b", "c"], weights=[0.5, 2.0, 4.0])
    total = bal(const(2.0, 0.25, 1.5))
    assert total.item() == 0.5 * 2.0 + 2.0 * 0.25 + 4.0 * 1.5
    assert torch.equal(bal.last_weights, torch.tensor([0.5, 2.0, 4.0]))


def test_weights_by_name() -> None:
    bal = tb.StaticWeighting(["a", "b"], weights={"b": 10.0, "a": 1.0})
    total = bal(const(3.0, 2.0))
    assert total.item() == 1.0 * 3.0 + 10.0 * 2.0
    assert torch.equal(bal.last_weights, torch.tensor([1.0, 10.0]))


def test_weights_are_constant_over_steps() -> None:
    bal = tb.StaticWeighting(2, weights=[0.1, 0.9])
    for values in [(1.0, 2.0), (3.0, 0.5), (10.0, 10.0)]:
        bal(const(*values))
    assert bal.history is not None
    torch.testing.assert_close(
        bal.history.weights, torch.tensor([[0.1, 0.9]] * 3, dtype=torch.float64), rtol=1e-7, atol=0
    )


def test_weights_follow_the_loss_dtype() -> None:
    bal = tb.StaticWeighting(2, weights=[0.1, 0.2])
    bal(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert bal.last_weights.dtype == torch.float64
    assert bal.last_weights.tolist() == [0.1, 0.2]
    bal(const(1.0, 1.0))
    assert bal.last_weights.dtype == torch.float32


@pytest.mark.parametrize(
    "weights",
    [{"a": 1.0}, {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "x": 2.0}],
)
def test_mapping_must_name_exactly_the_tasks(weights: dict[str, float]) -> None:
    with pytest.raises(tb.TaskMismatchError):
        tb.StaticWeighting(["a", "b"], weights=weights)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_sequence_must_have_one_weight_per_task(weights: list[float]) -> None:
    with pytest.raises(tb.TaskMismatchError, match=f"{len(weights)} static weights"):
        tb.StaticWeighting(2, weights=weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="'b'"):
        tb.StaticWeighting(["a", "b"], weights=[1.0, bad])


def test_negative_weight_is_allowed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        bal = tb.StaticWeighting(["main", "adv"], weights=[1.0, -0.5])
    assert "'adv'" in caplog.text and "negative" in caplog.text
    losses = const(2.0, 4.0, requires_grad=True)
    total = bal(losses)
    assert total.item() == 2.0 - 2.0
    total.backward()
    assert losses[1].grad.item() == -0.5


def test_integer_keys_for_counted_tasks() -> None:
    """Counted tasks are named "0", "1", ...: integer keys are matched to them by name."""
    bal = tb.StaticWeighting(2, weights={1: 2.0, 0: 1.0})  # not in task order
    assert bal.tasks == ("0", "1")
    assert bal(const(1.0, 10.0)).item() == 1.0 * 1.0 + 2.0 * 10.0


@pytest.mark.parametrize("weights", [[0.0, 1.0], [0.5, 2.0]])
def test_zero_and_positive_weights_do_not_warn(
    weights: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        bal = tb.StaticWeighting(["main", "aux"], weights=weights)
    assert caplog.records == []
    assert bal(const(2.0, 4.0)).item() == weights[0] * 2.0 + weights[1] * 4.0
