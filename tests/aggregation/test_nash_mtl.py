"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining weights G alpha = 1/alpha."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import save_load
from taskbalance import registry
from taskbalance.aggregation import nash_mtl
from taskbalance.aggregation.nash_mtl import NashMTL

ONES = torch.ones(8, dtype=torch.float64)


def solve(jacobian: torch.Tensor, bal: NashMTL | None = None) -> torch.Tensor:
    jac = jacobian.double()
    bal = bal or NashMTL(jac.shape[0])
    return bal.weights_from_gramian(jac @ jac.T, ONES[: jac.shape[0]])


def random_jacobian(seed: int, k: int, p: int) -> torch.Tensor:
    """Rows of very different norms (1e-3 .. 1e3), full row rank with probability 1."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    return torch.from_numpy(rows)


# ---------------------------------------------------------------------- the defining property
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(0, 12))
def test_nash_condition_and_bargaining_property(seed: int, k: int, extra: int) -> None:
    jac = random_jacobian(seed, k, k + extra)
    alpha = solve(jac)
    gram = jac @ jac.T
    assert alpha.dtype == torch.float64 and bool((alpha > 0).all())
    residual = (gram @ alpha - 1 / alpha).norm() / (1 / alpha).norm()
    assert residual < 1e-8
    d = alpha @ jac
    # each task's utility g_i . d equals 1 / alpha_i; and ||d||^2 = sum_i alpha_i / alpha_i = K
    torch.testing.assert_close(jac @ d, 1 / alpha, rtol=1e-8, atol=0)
    assert float(d @ d) == pytest.approx(k, rel=1e-8)


def test_orthogonal_gradients_by_hand() -> None:
    # G = diag(a^2, b^2): a^2 alpha_1 = 1/alpha_1 -> alpha_1 = 1/a; likewise alpha_2 = 1/b
    a, b = 3.0, 0.5
    alpha = solve(torch.tensor([[a, 0.0], [0.0, b]]))
    torch.testing.assert_close(alpha, torch.tensor([1 / 3, 2.0], dtype=torch.float64))


def test_two_tasks_at_sixty_degrees_by_hand() -> None:
    # ||g1|| = 2, ||g2|| = 1, cos = 1/2. Multiplying row i of G alpha = 1/alpha by alpha_i
    # and subtracting gives G11 alpha_1^2 = G22 alpha_2^2, so alpha_i = s / ||g_i|| with
    # s^2 (1 + cos) = 1: alpha = (1 / (2 sqrt 1.5), 1 / sqrt 1.5).
    jac = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2]])
    alpha = solve(jac)
    s = 1 / math.sqrt(1.5)
    torch.testing.assert_close(alpha, torch.tensor([s / 2, s], dtype=torch.float64))


def test_single_task_normalises_the_gradient() -> None:
    alpha = solve(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(alpha, torch.tensor([0.2], dtype=torch.float64))


def test_permutation_invariance() -> None:
    jac = random_jacobian(7, 6, 20)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(solve(jac)[perm], solve(jac[perm]), rtol=1e-10, atol=0)


def test_weights_belong_to_the_unnormalised_gramian() -> None:
    jac = random_jacobian(3, 4, 9)
    torch.testing.assert_close(solve(1000.0 * jac), solve(jac) / 1000.0, rtol=1e-10, atol=0)


def test_warm_start_gives_the_same_solution() -> None:
    bal = NashMTL(5)
    first, second = random_jacobian(1, 5, 10), random_jacobian(2, 5, 10)
    solve(first, bal)
    torch.testing.assert_close(solve(second, bal), solve(second), rtol=1e-10, atol=0)
    assert bal.fallbacks == 0 and bal.last_fallback is None


def test_duplicated_gradients_are_solvable() -> None:
    # G = c [[1, 1], [1, 1]] is singular but f stays bounded: alpha_1 = alpha_2 = 1/sqrt(2c)
    alpha = solve(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    torch.testing.assert_close(alpha, torch.full((2,), 1 / math.sqrt(10), dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_newton_converges_from_far_starts(seed: int) -> None:
    """Gradient norms 1e-3..1e3 and a start 1e-4..1e4 off in every coordinate: the Newton
    steps are damped (a backtracking line search on f(a) = aᵀGa/2 - Σ log a_i, which
    rejects full steps on these draws) and still reach G a = 1/a to machine precision."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    jac = rng.standard_normal((k, int(rng.integers(k, k + 5)))) * 10.0 ** rng.uniform(
        -3, 3, size=(k, 1)
    )
    gram = jac @ jac.T / np.linalg.norm(jac @ jac.T)
    start = 10.0 ** rng.uniform(-4, 4, size=k)
    a, residual = nash_mtl.nash_solve(gram, start)
    assert residual < 1e-12
    np.testing.assert_allclose(a * (gram @ a), np.ones(k), atol=1e-12)


@pytest.mark.parametrize(
    ("max_norm", "norm", "expected"),
    [
        (1e-5, 1e-5, 1e-5 / (1e-5 + 1e-6)),  # clip_grad_norm_'s max_norm / (norm + 1e-6)
        (1.0, 3.0, 1.0 / (3.0 + 1e-6)),
        (1.0, 0.5, 1.0),  # below max_norm: unchanged
        (0.0, 3.0, 1.0),  # max_norm = 0: no clipping
    ],
)
def test_direction_scale_is_clip_grad_norms_coefficient(
    max_norm: float, norm: float, expected: float
) -> None:
    assert NashMTL(2, max_norm=max_norm).direction_scale(norm) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------- through backward
class Net(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(k))

    def losses(self, step: int, scale: float = 1.0) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=gen)
        z = torch.tanh(self.body(x))
        ys = torch.randn(16, len(self.heads), generator=gen)
        return [
            (i + 1) * scale * ((h(z).squeeze(-1) - ys[:, i]) ** 2).mean()
            for i, h in enumerate(self.heads)
        ]


def task_grads(net: Net, losses: list[torch.Tensor]) -> torch.Tensor:
    params = list(net.body.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 0.3])
def test_backward_fills_the_clipped_nash_direction(max_norm: float) -> None:
    net = Net(3)
    losses = net.losses(0)
    jac = task_grads(net, losses)
    bal = NashMTL(3, max_norm=max_norm)
    weights = bal.backward(losses, shared=net.body.parameters())
    alpha = solve(jac).float()
    expected = alpha @ jac
    coef = max_norm / (float(expected.norm()) + 1e-6) if max_norm else 1.0
    assert coef < 1.0 or not max_norm  # ||αᵀJ|| = √3 > max_norm: the clip is active
    got = torch.cat([p.grad.reshape(-1) for p in net.body.parameters()])
    torch.testing.assert_close(got, expected * coef, rtol=1e-4, atol=1e-7)
    assert float(got.norm()) == pytest.approx(max_norm or math.sqrt(3), rel=1e-4)
    # the recorded weights are those applied (d = wᵀJ), the warm start keeps the solution
    torch.testing.assert_close(weights, alpha * coef, rtol=1e-4, atol=0)
    torch.testing.assert_close(bal.history.weights[-1], (alpha * coef).double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(got, weights @ jac, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(bal.alpha.float(), alpha, rtol=1e-4, atol=0)


def test_weighted_task_specific_gradients_use_the_applied_weights() -> None:
    """``task_specific="weighted"``: head i gets ``w_i dL_i/dθ_i`` with the recorded (clipped)
    weight, so the whole update is the gradient of ``sum_i w_i L_i``."""
    net = Net(3)
    losses = net.losses(0)
    own = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, net.heads)
    ]
    bal = NashMTL(3, max_norm=0.3, task_specific="weighted")
    weights = bal.backward(losses, shared=net.body.parameters())
    assert float(weights.sum()) < float(bal.alpha.sum()) * 0.5  # clipped: c = 0.3/√3
    for w, grads, head in zip(weights, own, net.heads):
        for g, p in zip(grads, head.parameters()):
            torch.testing.assert_close(p.grad, w * g, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------- no silent failure
def check_fallback(caplog: pytest.LogCaptureFixture, bal: NashMTL, used: str, count: int) -> None:
    assert bal.fallbacks == count
    assert used in (bal.last_fallback or "")
    messages = [r.getMessage() for r in caplog.records if r.name == "taskbalance"]
    assert messages and "not solved" in messages[-1] and used in messages[-1]


def test_zero_gradient_takes_the_regularised_solve(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    bal = NashMTL(2)
    jac = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    alpha = solve(jac, bal)
    check_fallback(caplog, bal, "regularised", 1)
    assert bool(torch.isfinite(alpha).all()) and bool((alpha > 0).all())
    # the live task still gets its bargaining utility (up to the tiny ridge)
    assert float(jac[0].double() @ (alpha @ jac.double())) == pytest.approx(
        1 / float(alpha[0]), rel=1e-5
    )


def test_opposite_gradients_give_a_zero_update(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    bal = NashMTL(2)
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    alpha = solve(jac, bal)
    check_fallback(caplog, bal, "regularised", 1)
    assert float((alpha @ jac.double()).norm()) < 1e-6 * float(alpha.max())


def test_zero_loss_gradient_through_backward(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    net = Net(2)
    a, b = net.losses(0)
    bal = NashMTL(2)
    bal.backward([a, 0.0 * b], shared=net.body.parameters())
    check_fallback(caplog, bal, "regularised", 1)
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)


def test_iteration_cap_then_previous_weights(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    bal = NashMTL(4, max_iter=1)
    alpha = solve(random_jacobian(5, 4, 8), bal)  # one Newton step cannot converge
    check_fallback(caplog, bal, "equal weights", 1)
    assert alpha.tolist() == [1.0] * 4
    bal.max_iter = 100
    good = solve(random_jacobian(6, 4, 8), bal)
    assert bal.fallbacks == 1 and bal.last_fallback is None
    nan = (np.full(4, np.nan), np.nan)
    monkeypatch.setattr(nash_mtl, "nash_solve", lambda *a, **k: nan)
    stale = solve(random_jacobian(7, 4, 8), bal)
    check_fallback(caplog, bal, "previous weights", 2)
    assert torch.equal(stale, good)


def test_solver_returning_nan_without_history(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    monkeypatch.setattr(nash_mtl, "nash_solve", lambda g, *a, **k: (g[0] * np.nan, 0.0))
    bal = NashMTL(3)
    assert solve(random_jacobian(8, 3, 5), bal).tolist() == [1.0, 1.0, 1.0]
    check_fallback(caplog, bal, "equal weights", 1)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_degenerate_gramian(caplog: pytest.LogCaptureFixture, value: float) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    bal = NashMTL(2)
    alpha = bal.weights_from_gramian(torch.full((2, 2), value, dtype=torch.float64), ONES[:2])
    assert alpha.tolist() == [1.0, 1.0]
    check_fallback(caplog, bal, "equal weights", 1)
    assert "zero or not finite" in caplog.records[-1].getMessage()


# ---------------------------------------------------------------------- state, registry
def run(bal: NashMTL, net: Net, opt: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    out = []
    for step in steps:
        opt.zero_grad()
        out.append(bal.backward(net.losses(step), shared=net.body.parameters()))
        out.extend(p.grad.clone() for p in net.parameters())
        opt.step()
    return out


def test_state_round_trip_is_bit_exact() -> None:
    net = Net(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bal = NashMTL(3)
    run(bal, net, opt, range(3))
    state, net_state, opt_state = (save_load(x.state_dict()) for x in (bal, net, opt))
    expected = run(bal, net, opt, range(3, 6))
    net2 = Net(3)
    net2.load_state_dict(net_state)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    opt2.load_state_dict(opt_state)
    bal2 = NashMTL(3)
    bal2.load_state_dict(state)
    assert bal2.alpha is not None and bal2.alpha.dtype == torch.float64
    got = run(bal2, net2, opt2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert torch.equal(bal.alpha, bal2.alpha)


def test_registered_under_both_names() -> None:
    assert registry.get("nash_mtl") is NashMTL
    assert registry.get("NashMTL") is NashMTL
    assert isinstance(registry.make("nash-mtl", 2), NashMTL)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        NashMTL(2, max_iter=0)
    with pytest.raises(ValueError):
        NashMTL(2, tol=0.0)
