"""MetaBalance (He et al., WWW 2022): auxiliary gradients rescaled per tensor to the main's."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _gradcheck import check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet
from taskbalance.aggregation.metabalance import MetaBalance
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, TaskMismatchError

D = torch.float64
ONES = torch.ones(4, dtype=D)


def make(k: int, sizes: list[int], **kw) -> MetaBalance:
    bal = MetaBalance(k, **kw)
    bal._sizes = sizes  # what the engine sets from the shared tensors
    return bal


def test_hand_computed_one_step() -> None:
    # tensors of sizes 1 and 2; main (3 | 0, 4): block norms 3, 4; aux (1 | 2, 0): 1, 2
    # r = ½: s = ½·3/1 + ½ = 2 and ½·4/2 + ½ = 3/2; d = (3 + 2, 0 + 3, 4 + 0)
    jac = torch.tensor([[3.0, 0.0, 4.0], [1.0, 2.0, 0.0]], dtype=D)
    d, w = make(2, [1, 2], relax=0.5, beta=0.0).aggregate(jac, ONES[:2])
    torch.testing.assert_close(d, torch.tensor([5.0, 3.0, 4.0], dtype=D))
    # recorded: ||ĝ|| / ||g|| = sqrt(2²·1 + 1.5²·4) / sqrt(5)
    torch.testing.assert_close(w, torch.tensor([1.0, math.sqrt(13 / 5)], dtype=D))


def test_hand_computed_moving_average() -> None:
    bal = make(2, [1, 1], relax=1.0, beta=0.5)
    # step 1: m = ½ norms; the ratio is that of the norms: s = (4/1, 2/2) = (4, 1)
    d1, _ = bal.aggregate(torch.tensor([[4.0, 2.0], [1.0, 2.0]], dtype=D), ONES[:2])
    torch.testing.assert_close(d1, torch.tensor([8.0, 4.0], dtype=D))
    torch.testing.assert_close(bal.averages, torch.tensor([[2.0, 1.0], [0.5, 1.0]], dtype=D))
    # step 2: m_main = ½(2, 1) + ½(2, 2) = (2, 1.5); m_aux = ½(0.5, 1) + ½(3, 1) = (1.75, 1)
    d2, _ = bal.aggregate(torch.tensor([[2.0, -2.0], [3.0, 1.0]], dtype=D), ONES[:2])
    s = torch.tensor([2.0 / 1.75, 1.5 / 1.0], dtype=D)
    torch.testing.assert_close(
        d2, torch.tensor([2.0, -2.0], dtype=D) + s * torch.tensor([3.0, 1.0])
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.lists(st.integers(1, 6), min_size=1, max_size=4),
    st.integers(0, 4),
)
def test_relax_one_gives_every_aux_block_the_main_norm(
    seed: int, k: int, sizes: list[int], main: int
) -> None:
    """The defining property: with r = 1 and β = 0, each auxiliary gradient's block norm
    equals the main's in every tensor, for rows whose norms span 1e-3..1e3."""
    main = main % k
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.empty(k, 1, dtype=D).uniform_(-3, 3, generator=gen)
    jac = torch.randn(k, sum(sizes), generator=gen, dtype=D) * scales
    for aux in range(k):
        if aux == main:
            continue
        pair = jac[[main, aux]]
        d, _ = make(2, sizes, relax=1.0, beta=0.0).aggregate(pair, ONES[:2])
        rescaled = (d - pair[0]).split(sizes)
        for block, target in zip(rescaled, pair[0].split(sizes)):
            torch.testing.assert_close(block.norm(), target.norm(), rtol=1e-12, atol=0)
    d, w = make(k, sizes, relax=1.0, beta=0.0, main=main).aggregate(jac, torch.ones(k, dtype=D))
    assert float(w[main]) == 1.0
    # whole-J norm factor: ||ĝ_i|| = ||g_main|| for every aux task
    for i in range(k):
        if i != main:
            want = jac[main].norm() / jac[i].norm()
            torch.testing.assert_close(w[i], want, rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.floats(0.0, 0.95))
def test_relax_zero_is_the_plain_sum(seed: int, k: int, beta: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    bal = make(k, [2, 3], relax=0.0, beta=beta)
    for _ in range(3):
        jac = torch.randn(k, 5, generator=gen, dtype=D) * 10.0 ** torch.randint(-3, 4, (k, 1))
        d, w = bal.aggregate(jac, torch.ones(k, dtype=D))
        torch.testing.assert_close(d, jac.sum(dim=0), rtol=1e-12, atol=1e-300)
        assert w.tolist() == [1.0] * k


def test_one_tensor_records_the_exact_weights() -> None:
    # a single shared tensor: the scale is one number per task and d = wᵀJ
    jac = torch.tensor([[3.0, 4.0], [0.3, 0.4], [60.0, 80.0]], dtype=D)
    d, w = make(3, [2], relax=0.7).aggregate(jac, ONES[:3])
    torch.testing.assert_close(w, torch.tensor([1.0, 0.7 * 10 + 0.3, 0.7 / 20 + 0.3], dtype=D))
    torch.testing.assert_close(d, w @ jac)


def test_zero_aux_gradient_logs_counts_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jac = torch.tensor([[3.0, 4.0, 1.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=D)
    bal = MetaBalance(["main", "a", "b"], relax=1.0, beta=0.0)
    bal._sizes = [2, 1]
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        d, w = bal.aggregate(jac, ONES[:3])
    # a: zero in tensor 1 (scale 1, block 0), 1/2 in tensor 2; b: 5 in tensor 1, zero in 2
    torch.testing.assert_close(d, torch.tensor([3.0 + 5.0, 4.0, 1.0 + 1.0], dtype=D))
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 5.0], dtype=D))
    assert bal.zero_scales == 1
    assert "scale is taken as 1" in caplog.text and "'a'" in caplog.text and "'b'" in caplog.text


def test_all_zero_aux_row_and_zero_main() -> None:
    bal = make(2, [1, 1], relax=0.6, beta=0.0)
    d, w = bal.aggregate(torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=D), ONES[:2])
    torch.testing.assert_close(d, torch.tensor([1.0, 2.0], dtype=D))
    assert w.tolist() == [1.0, 1.0] and bal.zero_scales == 1
    # a zero main gradient shrinks the auxiliary one to (1 - r) of itself (no NaN)
    d, w = make(2, [2], relax=0.6, beta=0.0).aggregate(
        torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=D), ONES[:2]
    )
    torch.testing.assert_close(d, torch.tensor([1.2, 1.6], dtype=D))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.4], dtype=D))


def test_non_finite_gradient_names_the_task_and_keeps_the_state() -> None:
    bal = make(2, [2], beta=0.5)
    bal.aggregate(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D), ONES[:2])
    before = bal.averages.clone()
    with pytest.raises(NonFiniteGradientError, match="'1'") as info:
        bal.aggregate(torch.tensor([[1.0, 2.0], [float("inf"), 4.0]], dtype=D), ONES[:2])
    assert info.value.task == "1" and torch.equal(bal.averages, before)


def test_changed_shared_parameters_are_refused() -> None:
    bal = make(2, [2, 1])
    bal.aggregate(torch.ones(2, 3, dtype=D), ONES[:2])
    bal._sizes = [3]
    with pytest.raises(BalancerUsageError, match="shared parameters changed"):
        bal.aggregate(torch.ones(2, 3, dtype=D), ONES[:2])


def test_main_and_hyper_parameters_checked() -> None:
    jac = torch.tensor([[1.0, 0.0], [4.0, 0.0]], dtype=D)
    with pytest.raises(TaskMismatchError, match="main='b' is not a task"):
        MetaBalance(["a", "x"], main="b")
    d, _ = make(2, [2], main=1, relax=1.0, beta=0.0).aggregate(jac, ONES[:2])
    torch.testing.assert_close(d, torch.tensor([8.0, 0.0], dtype=D))
    with pytest.raises(ValueError, match="relax must be in"):
        MetaBalance(2, relax=1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        MetaBalance(2, beta=1.0)


def test_through_the_engine_per_parameter_tensor() -> None:
    """backward on a TinyNet (weight and bias shared): each tensor's aux block rescaled by
    its own norm ratio, computed here from per-tensor autograd gradients."""
    model, _, losses = losses_and_features(3, seed=2)
    body = list(model.shared.parameters())
    grads = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
    model2, _, losses2 = losses_and_features(3, seed=2)
    w = tb.make("metabalance", 3, relax=0.7).backward(losses2, shared=model2.shared)
    assert w is not None and float(w[0]) == 1.0
    for t, p in enumerate(model2.shared.parameters()):
        main = grads[0][t]
        expected = main.clone()
        for i in (1, 2):
            g = grads[i][t]
            expected += (0.7 * main.norm() / g.norm() + 0.3) * g
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    # the two tensors have different scales: no single weight per task reproduces d
    ratios = [float(grads[1][t].norm() / grads[0][t].norm()) for t in range(2)]
    assert abs(ratios[0] - ratios[1]) > 1e-3


def test_features_mode_is_refused() -> None:
    model, z, losses = losses_and_features(2, seed=0)
    with pytest.raises(BalancerUsageError, match="only in \\('exact',\\) mode"):
        MetaBalance(2).backward(losses, shared=model.shared, features=z)


def test_state_round_trips() -> None:
    def fresh() -> tuple:
        model = TinyNet(3, seed=5)
        bal = tb.make("metabalance", 3, relax=0.9, beta=0.8)
        return bal, model, torch.optim.SGD(model.parameters(), lr=0.05)

    saved = check_resume(fresh, split=3, total=7)
    assert saved["bal"]["state"]["averages"].shape == (3, 2)  # K × (weight, bias)


def test_the_zero_scale_count_survives_a_state_round_trip() -> None:
    # one step with an all-zero auxiliary gradient is counted; a fresh balancer loading the
    # state continues the count (and the averages) instead of starting again from 0
    bal = make(2, [1, 1], relax=0.6, beta=0.0)
    bal.aggregate(torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=D), ONES[:2])
    assert bal.zero_scales == 1
    other = make(2, [1, 1], relax=0.6, beta=0.0)
    other.load_method_state(bal.method_state())
    assert other.zero_scales == 1
    other.aggregate(torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=D), ONES[:2])
    assert other.zero_scales == 2
