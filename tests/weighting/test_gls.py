"""Geometric Loss Strategy (Chennupati et al., CVPR-W 2019): L = (prod_i L_i)^(1/K)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, const, task_losses


def test_hand_computed_two_tasks() -> None:
    bal = tb.GLS(["a", "b"])
    total = bal(const(2.0, 8.0))
    assert total.item() == pytest.approx(4.0, rel=1e-6)
    # effective weights L / (K L_i) = 4 / (2 * 2), 4 / (2 * 8)
    assert bal.last_weights.tolist() == pytest.approx([1.0, 0.25], rel=1e-6)


def test_hand_computed_three_tasks() -> None:
    bal = tb.GLS(3)
    losses = const(1.0, 2.0, 4.0, requires_grad=True)
    total = bal(losses)
    assert total.item() == pytest.approx(2.0, rel=1e-6)
    expected = [2.0 / (3 * 1.0), 2.0 / (3 * 2.0), 2.0 / (3 * 4.0)]
    assert bal.last_weights.tolist() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert [loss.grad.item() for loss in losses] == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_the_effective_weights_on_a_model() -> None:
    model = TinyNet(3)
    tb.GLS(3)(task_losses(model, 0)).backward()
    got = [p.grad.clone() for p in model.parameters()]

    ref = TinyNet(3)
    losses = task_losses(ref, 0)
    values = [float(loss.detach()) for loss in losses]
    geo = math.prod(values) ** (1 / 3)
    per_task = []
    for loss in losses:
        per_task.append(
            torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True, retain_graph=True)
        )
    for j, g in enumerate(got):
        expected = torch.zeros_like(g)
        for i, grads in enumerate(per_task):
            if grads[j] is not None:
                expected += geo / (3 * values[i]) * grads[j]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)


def test_scale_of_one_task_does_not_change_the_direction() -> None:
    """GLS is invariant (up to a positive factor) to rescaling one loss: the geometric mean
    of (c L1, L2) is c^(1/K) times that of (L1, L2), so the gradient only scales."""
    model = TinyNet(2)
    l0, l1 = task_losses(model, 0)
    g_plain = torch.autograd.grad(tb.GLS(2)([l0, l1]), model.shared.weight, retain_graph=True)[0]
    g_scaled = torch.autograd.grad(tb.GLS(2)([100.0 * l0, l1]), model.shared.weight)[0]
    torch.testing.assert_close(g_scaled, 10.0 * g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_raises_naming_task_and_value(bad: float) -> None:
    bal = tb.GLS(["seg", "depth", "normal"])
    with pytest.raises(tb.NonPositiveLossError) as info:
        bal(const(1.0, 2.0, bad))
    err = info.value
    assert err.task == "normal"
    assert err.value == bad
    assert "'normal'" in str(err) and str(bad) in str(err)
    assert bal.steps == 0


def test_non_finite_is_reported_before_non_positive() -> None:
    with pytest.raises(tb.NonFiniteLossError):
        tb.GLS(2)(const(float("nan"), -1.0))


positive = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(positive, min_size=1, max_size=8))
def test_weights_positive_and_euler_identity(values: list[float]) -> None:
    k = len(values)
    bal = tb.GLS(k)
    total = bal(torch.tensor(values, dtype=torch.float64)).item()
    weights = bal.last_weights
    assert bool((weights > 0).all())
    geo = math.exp(sum(math.log(v) for v in values) / k)
    assert total == pytest.approx(geo, rel=1e-9)
    # a homogeneous function of degree 1: sum_i w_i L_i = L
    assert float((weights * torch.tensor(values, dtype=torch.float64)).sum()) == pytest.approx(
        geo, rel=1e-9
    )
    # AM-GM: the geometric mean lies between min and the arithmetic mean
    assert min(values) * (1 - 1e-9) <= total <= sum(values) / k * (1 + 1e-9)
