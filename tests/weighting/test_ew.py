"""Equal weighting: L = sum_i L_i, or the mean."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, const, task_losses
from taskbalance.weighting.ew import equal_weights


def test_sum_of_three() -> None:
    bal = tb.EqualWeighting(["a", "b", "c"])
    total = bal(const(1.5, 2.0, 0.25))
    assert total.item() == 3.75
    assert torch.equal(bal.last_weights, torch.ones(3))


def test_mean_of_two() -> None:
    bal = tb.EqualWeighting(2, reduction="mean")
    total = bal(const(1.0, 4.0))
    assert total.item() == 2.5
    assert torch.equal(bal.last_weights, torch.tensor([0.5, 0.5]))


def test_mean_of_three_weights() -> None:
    bal = tb.EqualWeighting(3, reduction="mean")
    total = bal(const(3.0, 6.0, 9.0))
    assert total.item() == pytest.approx(6.0, rel=1e-7)
    torch.testing.assert_close(bal.last_weights, torch.full((3,), 1 / 3))


def test_bad_reduction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        tb.EqualWeighting(2, reduction="max")  # type: ignore[arg-type]


def test_weights_helper() -> None:
    assert torch.equal(equal_weights(4), torch.ones(4))
    assert torch.equal(equal_weights(4, "mean"), torch.full((4,), 0.25))
    like = torch.zeros(1, dtype=torch.float64)
    assert equal_weights(2, like=like).dtype == torch.float64


def test_gradient_is_the_sum_of_task_gradients() -> None:
    model = TinyNet(3)
    tb.EqualWeighting(3)(task_losses(model, 0)).backward()
    ref = TinyNet(3)
    a, b, c = task_losses(ref, 0)
    (a + b + c).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_weights_do_not_change_over_steps() -> None:
    bal = tb.EqualWeighting(2)
    for values in [(1.0, 2.0), (5.0, 0.1), (0.3, 0.3)]:
        bal(const(*values))
    assert bal.history is not None
    assert torch.equal(bal.history.weights, torch.ones(3, 2, dtype=torch.float64))


@settings(deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=8))
def test_sum_and_mean_property(values: list[float]) -> None:
    k = len(values)
    losses = torch.tensor(values, dtype=torch.float64)
    total = tb.EqualWeighting(k)(losses).item()
    mean = tb.EqualWeighting(k, reduction="mean")(losses).item()
    assert total == pytest.approx(sum(values), abs=1e-9)
    assert mean == pytest.approx(sum(values) / k, abs=1e-9)
