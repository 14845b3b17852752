"""Learning-rate annealing (Wang, Teng & Perdikaris 2021): λ from max |g_r| / mean |g_i|."""

from __future__ import annotations

import logging

import pytest
import torch
from _gradcheck import check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet
from taskbalance.aggregation.lr_annealing import LRAnnealing
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, TaskMismatchError

D = torch.float64
LOSSES = torch.ones(3, dtype=D)


def test_hand_computed_two_steps() -> None:
    # reference row 0: max |g_r| = 2; mean |g_1| = 0.5 -> λ̂_1 = 4; mean |g_2| = 2 -> λ̂_2 = 1
    jac = torch.tensor([[1.0, -2.0], [0.5, 0.5], [0.0, 4.0]], dtype=D)
    bal = LRAnnealing(3)
    d, w = bal.aggregate(jac, LOSSES)
    # λ = 0.1 · 1 + 0.9 · λ̂ = (1, 3.7, 1); d = g_0 + 3.7 g_1 + g_2
    torch.testing.assert_close(w, torch.tensor([1.0, 3.7, 1.0], dtype=D))
    torch.testing.assert_close(d, torch.tensor([2.85, 3.85], dtype=D))
    _, w2 = bal.aggregate(jac, LOSSES)
    torch.testing.assert_close(w2, torch.tensor([1.0, 0.1 * 3.7 + 0.9 * 4.0, 1.0], dtype=D))


def test_code_variant_hand_computed() -> None:
    # two tensors of sizes 1 and 2; reference max |g_r| = 2
    # task 1 = (3 | 0, 0): tensor means 3 and 0 -> m = 1.5 (the plain mean would be 1)
    # task 2 = (0 | 3, 3): tensor means 0 and 3 -> m = 1.5 (the plain mean would be 2)
    jac = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 3.0]], dtype=D)
    bal = LRAnnealing(3, variant="code", alpha=0.1)
    bal._sizes = [1, 2]
    _, w = bal.aggregate(jac, LOSSES)
    first = 0.9 + 0.1 * 2.0 / 1.5  # λ̂ = max / (λ m) with λ = 1
    torch.testing.assert_close(w, torch.tensor([1.0, first, first], dtype=D))
    _, w2 = bal.aggregate(jac, LOSSES)
    second = 0.9 * first + 0.1 * 2.0 / (first * 1.5)  # the old λ divides the estimate
    torch.testing.assert_close(w2, torch.tensor([1.0, second, second], dtype=D))


def test_code_variant_converges_to_the_square_root() -> None:
    # λ̂ = max / (λ m) has the fixed point λ = sqrt(max / m): here sqrt(4 / 1) = 2
    jac = torch.tensor([[4.0, 0.0], [1.0, 1.0]], dtype=D)
    bal = LRAnnealing(2, variant="code", alpha=0.5)
    for _ in range(60):
        _, w = bal.aggregate(jac, LOSSES[:2])
    assert float(w[1]) == pytest.approx(2.0, rel=1e-9)
    paper = LRAnnealing(2, alpha=0.5)
    for _ in range(60):
        _, w = paper.aggregate(jac, LOSSES[:2])
    assert float(w[1]) == pytest.approx(2.0 / 0.5, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.integers(1, 12), st.integers(0, 5))
def test_one_update_with_alpha_one_matches_the_reference_max(
    seed: int, k: int, p: int, main: int
) -> None:
    """The defining property: after one update with α = 1, λ_i mean |g_i| = max |g_r|,
    for rows whose norms span 1e-3..1e3."""
    main = main % k
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.empty(k, 1, dtype=D).uniform_(-3, 3, generator=gen)
    jac = torch.randn(k, p, generator=gen, dtype=D) * scales
    d, w = LRAnnealing(k, main=main, alpha=1.0).aggregate(jac, torch.ones(k, dtype=D))
    reference = jac[main].abs().max()
    for i in range(k):
        if i != main:
            torch.testing.assert_close(w[i] * jac[i].abs().mean(), reference, rtol=1e-12, atol=0)
    assert float(w[main]) == 1.0
    torch.testing.assert_close(d, w @ jac, rtol=1e-12, atol=0)


def test_every_keeps_the_weights_between_updates() -> None:
    bal = LRAnnealing(2, alpha=1.0, every=2)
    one = torch.ones(2, dtype=D)
    _, w0 = bal.aggregate(torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=D), one)
    _, w1 = bal.aggregate(torch.tensor([[8.0, 0.0], [1.0, 1.0]], dtype=D), one)
    _, w2 = bal.aggregate(torch.tensor([[6.0, 0.0], [1.0, 1.0]], dtype=D), one)
    assert [float(w0[1]), float(w1[1]), float(w2[1])] == [2.0, 2.0, 6.0]


def test_zero_gradient_keeps_the_weight_logs_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    bal = LRAnnealing(["r", "a", "b"], alpha=1.0)
    bal.aggregate(torch.tensor([[2.0, 0.0], [1.0, 1.0], [4.0, 4.0]], dtype=D), LOSSES)
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        d, w = bal.aggregate(torch.tensor([[4.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=D), LOSSES)
    # task a: zero gradient, λ_a stays 2; task b: λ̂ = 4 / 2
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 2.0], dtype=D))
    assert bool(torch.isfinite(d).all())
    assert bal.fallbacks == 1
    assert "zero gradient" in caplog.text and "'a'" in caplog.text


def test_zero_reference_gradient_keeps_every_weight(caplog: pytest.LogCaptureFixture) -> None:
    bal = LRAnnealing(["r", "a"], alpha=1.0)
    bal.aggregate(torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=D), LOSSES[:2])
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        d, w = bal.aggregate(torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=D), LOSSES[:2])
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], dtype=D))
    torch.testing.assert_close(d, torch.tensor([6.0, 6.0], dtype=D))
    assert bal.fallbacks == 1 and "reference task" in caplog.text


def test_one_task_is_the_plain_gradient() -> None:
    jac = torch.tensor([[2.0, -1.0]], dtype=D)
    d, w = LRAnnealing(1).aggregate(jac, LOSSES[:1])
    assert w.tolist() == [1.0] and torch.equal(d, jac[0])


def test_non_finite_gradient_names_the_task_and_keeps_the_state() -> None:
    bal = LRAnnealing(["r", "a", "b"])
    jac = torch.tensor([[1.0, 2.0], [1.0, 1.0], [float("nan"), 1.0]], dtype=D)
    with pytest.raises(NonFiniteGradientError, match="'b'") as info:
        bal.aggregate(jac, LOSSES)
    assert info.value.task == "b"
    assert bal.t == 0 and bal.lam.tolist() == [1.0, 1.0, 1.0]


def test_main_by_name_and_checked() -> None:
    jac = torch.tensor([[1.0, 1.0], [4.0, 0.0]], dtype=D)
    _, w = LRAnnealing(["a", "pde"], main="pde", alpha=1.0).aggregate(jac, LOSSES[:2])
    torch.testing.assert_close(w, torch.tensor([4.0, 1.0], dtype=D))
    with pytest.raises(TaskMismatchError, match="main='x' is not a task"):
        LRAnnealing(["a", "b"], main="x")
    with pytest.raises(ValueError, match="out of range"):
        LRAnnealing(2, main=2)
    with pytest.raises(TypeError, match="main must be"):
        LRAnnealing(2, main=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"every": 0}, "every must be a positive int"),
        ({"every": 2.0}, "every must be a positive int"),
        ({"variant": "keras"}, "variant must be"),
    ],
)
def test_bad_hyper_parameters_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LRAnnealing(2, **kw)


def test_through_the_engine_per_parameter_tensor() -> None:
    """backward on a TinyNet (weight and bias shared): λ from the rows of J computed here
    with autograd, the body's .grad = Σ λ_i g_i; the code variant uses the tensors' means."""
    model, _, losses = losses_and_features(3, seed=1)
    body = list(model.shared.parameters())
    grads = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
    rows = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]).double()
    peak = rows[0].abs().max()
    for variant, means in (
        ("paper", rows.abs().mean(dim=1)),
        ("code", torch.stack([(g[0].abs().mean() + g[1].abs().mean()) / 2 for g in grads])),
    ):
        expected = torch.ones(3, dtype=D)
        expected[1:] = 0.1 + 0.9 * peak / means[1:].double()
        model2, _, losses2 = losses_and_features(3, seed=1)
        w = tb.make("lr_annealing", 3, variant=variant).backward(losses2, shared=model2.shared)
        torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
        direction = expected.to(rows) @ rows
        got = torch.cat([p.grad.reshape(-1) for p in model2.shared.parameters()]).double()
        torch.testing.assert_close(got, direction, rtol=1e-5, atol=1e-7)


def test_features_mode_is_refused() -> None:
    model, z, losses = losses_and_features(2, seed=0)
    with pytest.raises(BalancerUsageError, match="only in \\('exact',\\) mode"):
        LRAnnealing(2).backward(losses, shared=model.shared, features=z)


def test_state_round_trips() -> None:
    def fresh() -> tuple:
        model = TinyNet(3, seed=4)
        bal = tb.make("gradient_pathologies", 3, alpha=0.5, every=2)
        return bal, model, torch.optim.SGD(model.parameters(), lr=0.05)

    saved = check_resume(fresh, split=3, total=7)
    state = saved["bal"]["state"]
    assert state["t"] == 3 and state["lam"].shape == (3,) and float(state["lam"][0]) == 1.0
    assert not torch.equal(state["lam"], torch.ones(3, dtype=D))
