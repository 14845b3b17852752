"""MoDo: λ_{t+1} = Π_Δ(λ_t − γ(J_a J_bᵀ λ_t + ρ λ_t)), update J_cᵀ λ_{t+1}."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, save_load, task_losses
from taskbalance.aggregation.modo import MoDo, modo_weights
from taskbalance.errors import (
    BalancerUsageError,
    NonFiniteGradientError,
    NonFiniteLossError,
    TaskBalanceWarning,
    TaskMismatchError,
)


def linear_losses(w: torch.Tensor, rows: list[list[float]]) -> list[torch.Tensor]:
    """Losses ``c_i · w``: row i of J is ``c_i`` exactly."""
    return [torch.tensor(row, dtype=torch.float32) @ w for row in rows]


def quiet_backward(bal: MoDo, losses, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TaskBalanceWarning)
        return bal.backward(losses, **kw)


def test_one_batch_is_one_projected_gradient_step_by_hand() -> None:
    # J = diag(1, 2): G = diag(1, 4), λ0 = (1/2, 1/2), γ = 0.1, ρ = 0.1:
    # λ0 − γ(Gλ0 + ρλ0) = (0.5 − 0.1·0.55, 0.5 − 0.1·2.05) = (0.445, 0.295); its projection
    # onto the simplex adds (1 − 0.74)/2 = 0.13: λ1 = (0.575, 0.425); d = (0.575, 0.85).
    w = torch.nn.Parameter(torch.zeros(2))
    bal = MoDo(2, gamma=0.1, rho=0.1)
    weights = quiet_backward(bal, linear_losses(w, [[1, 0], [0, 2]]), shared=[w])
    torch.testing.assert_close(weights, torch.tensor([0.575, 0.425]))
    torch.testing.assert_close(w.grad, torch.tensor([0.575, 0.85]))
    # the same batch given three times is the same step
    w2 = torch.nn.Parameter(torch.zeros(2))
    rows = [[1, 0], [0, 2]]
    three = [linear_losses(w2, rows) for _ in range(3)]
    torch.testing.assert_close(MoDo(2, gamma=0.1, rho=0.1).backward(three, shared=[w2]), weights)
    torch.testing.assert_close(w2.grad, w.grad)


def test_small_gamma_stays_near_the_uniform_weights() -> None:
    # γ → 0: λ1 → λ0 = 1/K, and d → the mean gradient
    w = torch.nn.Parameter(torch.zeros(2))
    bal = MoDo(2, gamma=1e-8, rho=0.0)
    quiet_backward(bal, linear_losses(w, [[1, 0], [0, 3]]), shared=[w])
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 1.5]), rtol=1e-6, atol=1e-6)


def test_the_cross_gramian_of_batches_a_and_b_gives_lambda_and_c_the_update() -> None:
    # J_a = I, J_b = [[0, 2], [0, 0]]: C = J_a J_bᵀ = [[0, 0], [2, 0]], Cλ0 = (0, 1);
    # γ = 0.2, ρ = 0: (0.5, 0.3) projected = (0.6, 0.4). Any other Gramian gives otherwise:
    # J_b J_aᵀ = Cᵀ -> (0.4, 0.6); J_a J_aᵀ or J_c J_cᵀ = I -> (0.5, 0.5).
    w = torch.nn.Parameter(torch.zeros(2))
    batches = [
        linear_losses(w, [[1, 0], [0, 1]]),
        linear_losses(w, [[0, 2], [0, 0]]),
        linear_losses(w, [[3, 0], [0, 5]]),
    ]
    bal = MoDo(2, gamma=0.2, rho=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)  # three batches: no warning
        weights = bal.backward(batches, shared=[w])
    torch.testing.assert_close(weights, torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(w.grad, torch.tensor([0.6 * 3, 0.4 * 5]))


def test_shared_may_be_a_generator_of_parameters() -> None:
    nets = [TinyNet(2), TinyNet(2)]
    for net, shared in zip(nets, (nets[0].shared.parameters(), list(nets[1].shared.parameters()))):
        MoDo(2, gamma=0.5).backward([task_losses(net, s) for s in (0, 1, 2)], shared=shared)
    for a, b in zip(nets[0].shared.parameters(), nets[1].shared.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_heads_get_batch_c_gradient_only() -> None:
    net = TinyNet(2)
    bal = MoDo(2)
    bal.backward([task_losses(net, s) for s in (0, 1, 2)], shared=net.shared)
    got = [p.grad.clone() for p in net.heads.parameters()]
    net.zero_grad()
    sum(task_losses(net, 2)).backward()
    for g, expected in zip(got, [p.grad for p in net.heads.parameters()]):
        torch.testing.assert_close(g, expected)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    gamma=st.floats(1e-4, 10.0),
    rho=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    scale=st.floats(-3, 3),
)
def test_lambda_stays_on_the_simplex(k: int, gamma: float, rho: float, seed: int, scale) -> None:
    gen = torch.Generator().manual_seed(seed)
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(5):
        ja, jb = (torch.randn(k, 7, generator=gen, dtype=torch.float64) * 10**scale for _ in "ab")
        lam = modo_weights(lam, ja @ jb.T, gamma, rho)
        assert bool((lam >= 0).all())
        assert abs(float(lam.sum()) - 1.0) < 1e-9


def test_one_task_gets_its_whole_gradient() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    quiet_backward(MoDo(1, gamma=5.0), linear_losses(w, [[2, -1]]), shared=[w])
    torch.testing.assert_close(w.grad, torch.tensor([2.0, -1.0]))


def test_one_set_of_losses_warns_once_with_the_fix() -> None:
    net = TinyNet(2)
    bal = MoDo(2)
    with pytest.warns(TaskBalanceWarning, match=r"modo.backward\(\[losses_a, losses_b, losses_c\]"):
        bal.backward(task_losses(net, 0), shared=net.shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)
        bal.backward(task_losses(net, 1), shared=net.shared)  # once only


def test_two_batches_are_refused() -> None:
    net = TinyNet(2)
    with pytest.raises(BalancerUsageError, match=r"one set of K losses or three"):
        MoDo(2).backward([task_losses(net, 0), task_losses(net, 1)], shared=net.shared)


def test_three_batches_with_features_are_refused() -> None:
    net = TinyNet(2)
    z = net.shared(torch.randn(8, 4))
    losses = [h(z).pow(2).mean() for h in net.heads]
    with pytest.raises(BalancerUsageError, match="pass shared= without features="):
        MoDo(2).backward([losses, losses, losses], features=z)


def test_a_batch_with_the_wrong_number_of_losses_is_refused() -> None:
    net = TinyNet(2)
    good = task_losses(net, 0)
    with pytest.raises(TaskMismatchError, match="expected 2"):
        MoDo(2).backward([good, good[:1], good], shared=net.shared)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nonfinite_loss_of_batch_a_follows_the_policy(bad: str) -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    rows = [[1, 0], [0, 1]]

    def batches() -> list[list[torch.Tensor]]:
        first = linear_losses(w, rows)
        first[1] = first[1] + float(bad)
        return [first, linear_losses(w, rows), linear_losses(w, rows)]

    with pytest.raises(NonFiniteLossError, match="'1'"):
        MoDo(2).backward(batches(), shared=[w])
    bal = MoDo(2, nonfinite="skip_step")
    assert bal.backward(batches(), shared=[w]) is None
    assert w.grad is None and bal.skipped_steps == 1 and bal.steps == 0
    torch.testing.assert_close(bal.lam, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_a_nonfinite_gradient_of_batch_b_raises_naming_the_task() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    rows = [[1, 0], [0, 1]]
    second = [torch.tensor([1.0, 0.0]) @ w, w[1].pow(2).sqrt()]  # value 0, gradient NaN
    bal = MoDo(2)
    with pytest.raises(NonFiniteGradientError, match=r"cross Gramian.*task '1' in batch b"):
        bal.backward([linear_losses(w, rows), second, linear_losses(w, rows)], shared=[w])
    torch.testing.assert_close(bal.lam, torch.tensor([0.5, 0.5], dtype=torch.float64))
    first = [w[0].pow(2).sqrt(), torch.tensor([0.0, 1.0]) @ w]
    with pytest.raises(NonFiniteGradientError, match="task '0' in batch a"):
        bal.backward([first, linear_losses(w, rows), linear_losses(w, rows)], shared=[w])


def test_state_round_trips() -> None:
    net_a, net_b = TinyNet(3), TinyNet(3)
    a = MoDo(3, gamma=0.05)
    for step in range(3):
        a.backward([task_losses(net_a, step + s) for s in (0, 10, 20)], shared=net_a.shared)
    b = MoDo(3, gamma=0.05)
    b.load_state_dict(save_load(a.state_dict()))
    for step in range(3, 5):
        wa = a.backward([task_losses(net_a, step + s) for s in (0, 10, 20)], shared=net_a.shared)
        wb = b.backward([task_losses(net_b, step + s) for s in (0, 10, 20)], shared=net_b.shared)
        assert torch.equal(wa, wb)
    assert not torch.equal(a.lam, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_a_foreign_state_is_refused() -> None:
    with pytest.raises(BalancerUsageError, match="saved by a MoDo balancer"):
        MoDo(2).load_method_state({"lambda": torch.ones(3)})


@pytest.mark.parametrize(("name", "value"), [("gamma", -1.0), ("rho", float("nan"))])
def test_bad_hyperparameters_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"finite {name} >= 0"):
        MoDo(2, **{name: value})


def test_registered() -> None:
    assert isinstance(tb.make("modo", 2), MoDo)


@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (0.5, 0.0), (1e-3, 0.1)])
def test_matches_torchjd_on_three_batches(gamma: float, rho: float) -> None:
    """torchjd 0.18's MoDoWeighting fed J_a J_bᵀ of the same two batches (its documented
    three-batch recipe), against ``backward([a, b, c])``, over 4 steps of a tiny nonlinear
    model: the same λ every step, and the update is batch c's J_cᵀλ."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from torchjd.aggregation import MoDoWeighting

    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
    heads = torch.randn(5, 3, generator=gen, dtype=torch.float64)  # fixed, one per task

    def losses(x: torch.Tensor) -> list[torch.Tensor]:
        out = torch.tanh(x @ w) @ heads  # every task reads the whole shared layer
        return [((out[:, i] - x[:, i]) ** 2).mean() for i in range(3)]

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        rows = [
            torch.autograd.grad(loss, w, retain_graph=True)[0].reshape(-1) for loss in losses(x)
        ]
        return torch.stack(rows)

    theirs, ours = MoDoWeighting(gamma=gamma, rho=rho), MoDo(3, gamma=gamma, rho=rho)
    for _ in range(4):
        xa, xb, xc = (torch.randn(8, 4, generator=gen, dtype=torch.float64) for _ in range(3))
        lam = theirs(jacobian(xa) @ jacobian(xb).T)
        w.grad = None
        got = ours.backward([losses(xa), losses(xb), losses(xc)], shared=[w])
        torch.testing.assert_close(got.double(), lam, atol=1e-12, rtol=0)
        torch.testing.assert_close(w.grad.reshape(-1), lam @ jacobian(xc), atol=1e-12, rtol=0)
        with torch.no_grad():
            w -= 0.1 * w.grad


def test_default_step_is_gamma_1e_3_and_rho_0_1_by_hand() -> None:
    # the paper's defaults γ = 1e-3, ρ = 0.1, from λ = (0.9, 0.1) with C = diag(1, 4):
    # Cλ + ρλ = (0.9 + 0.09, 0.4 + 0.01) = (0.99, 0.41); λ − γ(...) = (0.89901, 0.09959),
    # sum 0.9986; Π_Δ adds 0.0007 to both: (0.89971, 0.10029). (From λ = (½, ½) the ρ term
    # moves both entries alike and the projection undoes it.)
    bal = tb.make("modo", 2)
    bal.load_method_state({"lambda": torch.tensor([0.9, 0.1], dtype=torch.float64)})
    lam = bal.weights_from_gramian(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), None)
    torch.testing.assert_close(lam, torch.tensor([0.89971, 0.10029], dtype=torch.float64))


def test_an_overflowing_product_of_finite_gradients_names_the_task_in_a_or_b() -> None:
    # J_a = ((0, 1), (1e200, 0)), J_b = ((1e200, 0), (0, 1)), finite: only
    # (J_a J_bᵀ)_10 = 1e400 overflows, so neither a whole row (a) nor a whole column (b) is
    # bad, and the message names task 1 of row 1 and both batches
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    rows_a, rows_b = [[0.0, 1.0], [1e200, 0.0]], [[1e200, 0.0], [0.0, 1.0]]
    losses = [[torch.tensor(r, dtype=torch.float64) @ w for r in rows] for rows in (rows_a, rows_b)]
    losses.append([torch.tensor(r, dtype=torch.float64) @ w for r in [[1.0, 0.0], [0.0, 1.0]]])
    bal = MoDo(2)
    with pytest.raises(NonFiniteGradientError, match=r"task '1' in batch a or b") as err:
        bal.backward(losses, shared=[w])
    assert err.value.task == "1"
    torch.testing.assert_close(bal.lam, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("case", range(5))
def test_matches_torchjd_on_the_cross_check_jacobians(case: int) -> None:
    """The five cross-check Jacobians (random, conflicting, collinear, a zero row, norms
    1e-3..1e3), three calls each with the one-batch Gramian (torchjd's input matrix is then
    J Jᵀ): the same λ as torchjd's MoDoWeighting (γ = 1e-3 scaled to the norms, ρ = 0.1)."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from _gradcheck import cross_check_jacobians
    from torchjd.aggregation import MoDoWeighting

    for seed in range(3):
        jac = torch.from_numpy(cross_check_jacobians(seed)[case])
        gram = jac @ jac.T
        gamma = 0.5 / float(gram.diagonal().max())  # a step that moves λ at every scale
        theirs, ours = MoDoWeighting(gamma=gamma, rho=0.1), MoDo(4, gamma=gamma, rho=0.1)
        for _ in range(3):
            want = theirs(gram)
            got = ours.weights_from_gramian(gram, torch.ones(4, dtype=torch.float64))
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
