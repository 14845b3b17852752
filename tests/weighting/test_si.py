"""Scale-invariant loss (SI): L = sum_i log L_i, weights 1 / L_i; GLS's direction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, const, task_losses
from taskbalance.weighting.si import SI


def test_hand_computed_two_tasks() -> None:
    bal = SI(["a", "b"])
    losses = const(2.0, 8.0, requires_grad=True)
    total = bal(losses)
    assert total.item() == pytest.approx(math.log(16.0), rel=1e-6)  # log 2 + log 8
    assert bal.last_weights.tolist() == pytest.approx([0.5, 0.125], rel=1e-6)
    total.backward()
    # d/dL_i sum log L = 1 / L_i: the recorded weights are the ones applied
    assert [loss.grad.item() for loss in losses] == pytest.approx([0.5, 0.125], rel=1e-6)


def test_hand_computed_three_tasks_and_evaluate() -> None:
    bal = SI(3)
    total = bal(const(1.0, 2.0, 4.0))
    assert total.item() == pytest.approx(math.log(8.0), rel=1e-6)
    assert bal.last_weights.tolist() == pytest.approx([1.0, 0.5, 0.25], rel=1e-6)
    with torch.no_grad():
        value = bal.evaluate(const(0.5, 1.0, 1.0))
    assert value.item() == pytest.approx(math.log(0.5), rel=1e-6)  # may be negative
    assert bal.steps == 1


def _parameter_gradient(
    balancer: tb.Balancer, scales: list[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``balancer``'s loss on positive float64 losses
    ``L_i = s_i (1 + (a_i·θ - b_i)²)`` with respect to θ, and the losses."""
    gen = torch.Generator().manual_seed(seed)
    k = len(scales)
    a = torch.randn(k, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(k, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scales, dtype=torch.float64)
    losses = s * (1.0 + (a @ theta - b) ** 2)
    balancer(list(losses)).backward()
    assert theta.grad is not None
    return theta.grad, losses.detach()


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


scale = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(scales=st.lists(scale, min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_same_update_direction_as_gls(scales: list[float], seed: int) -> None:
    si, gls = SI(len(scales)), tb.GLS(len(scales))
    g_si, losses = _parameter_gradient(si, scales, seed)
    g_gls, _ = _parameter_gradient(gls, scales, seed)
    assert _cosine(g_si, g_gls) == pytest.approx(1.0, abs=1e-12)
    # the positive factor between them: GLS's gradient is (geo / K) times SI's
    factor = float(torch.exp(torch.log(losses).mean())) / len(scales)
    torch.testing.assert_close(g_gls, factor * g_si, rtol=1e-10, atol=0.0)


def test_same_update_direction_as_gls_through_the_engine() -> None:
    model, twin = TinyNet(3), TinyNet(3)
    SI(3).backward(task_losses(model, 0))
    tb.GLS(3).backward(task_losses(twin, 0))
    got = torch.cat([p.grad.reshape(-1) for p in model.shared.parameters()]).double()
    ref = torch.cat([p.grad.reshape(-1) for p in twin.shared.parameters()]).double()
    assert _cosine(got, ref) == pytest.approx(1.0, abs=1e-6)  # float32 model


def test_rescaling_one_loss_leaves_the_gradient_unchanged() -> None:
    """The defining property: log(c L) = log c + log L, so the gradient does not see c."""
    model = TinyNet(2)
    l0, l1 = task_losses(model, 0)
    plain = torch.autograd.grad(SI(2)([l0, l1]), model.shared.weight, retain_graph=True)[0]
    scaled = torch.autograd.grad(SI(2)([1e3 * l0, l1]), model.shared.weight)[0]
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_raises_naming_the_task(bad: float) -> None:
    bal = SI(["seg", "depth", "normal"])
    with pytest.raises(tb.NonPositiveLossError, match=r"SI .*task 'normal' has loss") as info:
        bal(const(1.0, 2.0, bad))
    assert info.value.task == "normal" and info.value.value == bad
    assert bal.steps == 0 and bal.last_weights is None


def test_weights_follow_the_loss_dtype() -> None:
    bal = SI(2)
    bal(torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert bal.last_weights.dtype == torch.float64
    bal(const(2.0, 4.0))
    assert bal.last_weights.dtype == torch.float32


def test_registered_by_name_and_alias() -> None:
    assert tb.get("si") is SI
    assert tb.get("scale_invariant") is SI
    assert type(tb.make("si", tasks=2)) is SI
    assert tb.SI is SI and "si" in tb.list_methods()
