"""Auto-Lambda: λ ← λ − β Adam(∇_λ Σ_{i∈P} L_i^val(θ − α ∇_θ Σ_i λ_i L_i^train))."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pytest
import torch

import taskbalance as tb
from conftest import save_load
from taskbalance.errors import (
    BalancerUsageError,
    NonFiniteGradientError,
    NonFiniteLossError,
    TaskBalanceWarning,
    TaskMismatchError,
)
from taskbalance.weighting import auto_lambda
from taskbalance.weighting.auto_lambda import AutoLambda, adam_step

D = torch.float64
Fn = Callable[[torch.Tensor], list[torch.Tensor]]


def regression(seed: int, k: int = 3, n: int = 6, p: int = 4) -> Fn:
    """K least-squares losses of a linear model θ ∈ R^p (quadratic in θ)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, n, p, generator=gen, dtype=D)
    b = torch.randn(k, n, generator=gen, dtype=D)
    return lambda theta: [((a[i] @ theta - b[i]) ** 2).mean() for i in range(k)]


def mlp(seed: int, k: int = 3) -> Fn:
    """K non-quadratic losses of θ ∈ R^4 (tanh of a linear map)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, 5, 4, generator=gen, dtype=D)
    return lambda theta: [torch.tanh(a[i] @ theta).pow(2).sum() + theta.sum() for i in range(k)]


def reference_gradient(
    theta: torch.Tensor, lam: torch.Tensor, alpha: float, train: Fn, val: Fn, primary: list[int]
) -> torch.Tensor:
    """``∇_λ Σ_P L_val(θ − α ∇_θ Σ λ_i L_i)`` by double backward through the virtual step."""
    lam = lam.clone().requires_grad_(True)
    theta = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((lam * torch.stack(train(theta))).sum(), theta, create_graph=True)
    ahead = theta - alpha * g
    (grad,) = torch.autograd.grad(sum(val(ahead)[i] for i in primary), lam)
    return grad


@pytest.mark.parametrize(
    ("hvp", "make_fn", "primary", "rtol"),
    [
        ("finite_difference", regression, None, 1e-7),  # exact on quadratics (up to rounding)
        ("finite_difference", regression, ["1"], 1e-7),
        ("exact", regression, None, 1e-10),
        ("exact", mlp, [0, 2], 1e-10),
        ("finite_difference", mlp, None, 1e-3),  # a second-order approximation
    ],
)
def test_meta_gradient_matches_double_backward(hvp, make_fn, primary, rtol) -> None:
    train, val = make_fn(0), make_fn(1)
    theta = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=D))
    bal = AutoLambda(3, primary=primary, hvp=hvp, init=0.3)
    lam = torch.tensor([0.3, 0.3, 0.3], dtype=D)
    indices = [0, 1, 2] if primary is None else [int(p) for p in primary]
    expected = reference_gradient(theta, lam, 0.05, train, val, indices)
    bal.meta_step([theta], lambda: train(theta), lambda: val(theta), lr=0.05)
    torch.testing.assert_close(bal.last_meta_gradient, expected, rtol=rtol, atol=1e-12)
    assert float(expected.abs().min()) > 1e-4  # a case where every entry means something


def test_lambda_moves_towards_the_task_that_helps_the_primary() -> None:
    # primary task 0 wants θ0 = 1; task 1 pulls θ0 towards 1 as well, task 2 towards -1:
    # g_1·v > 0 and g_2·v < 0, so λ_1 must grow and λ_2 shrink.
    theta = torch.nn.Parameter(torch.zeros(2, dtype=D))

    def train() -> list[torch.Tensor]:
        return [(theta[0] - 1) ** 2, (theta[0] - 1) ** 2 + theta[1] ** 2, (theta[0] + 1) ** 2]

    def val() -> list[torch.Tensor]:
        return [(theta[0] - 1) ** 2, theta[1] ** 2, (theta[0] + 1) ** 2]

    bal = AutoLambda(3, primary=[0], lr=0.01)
    for _ in range(20):
        bal.meta_step([theta], train, val, lr=0.1)
    lam = bal.lam
    assert lam[1] > 0.1 + 0.1 > 0.1 - 0.05 > lam[2]
    assert torch.equal(theta.detach(), torch.zeros(2, dtype=D))  # θ itself never moved


def test_adam_step_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=D))
    opt = torch.optim.Adam([p], lr=0.01)
    mine, avg, avg_sq = p.detach().clone(), torch.zeros(5, dtype=D), torch.zeros(5, dtype=D)
    for step in range(1, 6):
        grad = torch.randn(5, generator=gen, dtype=D)
        p.grad = grad.clone()
        opt.step()
        mine, avg, avg_sq = adam_step(mine, grad, avg, avg_sq, step, 0.01)
        torch.testing.assert_close(mine, p.detach(), rtol=1e-12, atol=1e-14)


def test_meta_step_leaves_parameters_and_grads_untouched() -> None:
    model = torch.nn.Linear(3, 2)
    x, xv = torch.randn(4, 3), torch.randn(4, 3)
    model(x).sum().backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]

    def losses(inp: torch.Tensor) -> list[torch.Tensor]:
        out = model(inp)
        return [out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]

    bal = tb.make("auto_lambda", 2)
    assert (
        bal.meta_step(model.parameters(), lambda: losses(x), lambda: losses(xv), lr=0.5) is not None
    )
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)


def test_the_combined_loss_is_the_weighted_sum() -> None:
    bal = AutoLambda(2, init=0.25)
    loss = bal([torch.tensor(2.0), torch.tensor(6.0)])
    assert float(loss) == pytest.approx(0.25 * 8.0)


def test_negative_weights_are_clamped_counted_and_logged(caplog) -> None:
    theta = torch.nn.Parameter(torch.zeros(1, dtype=D))

    def train() -> list[torch.Tensor]:
        return [(theta[0] - 1) ** 2, (theta[0] + 1) ** 2]

    bal = AutoLambda(2, primary=[0], lr=1.0, init=0.1)
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        bal.meta_step([theta], train, train, lr=0.1)
    assert float(bal.lam[1]) == 0.0 and float(bal.lam[0]) > 0.1
    assert bal.clamped_steps == 1 and "clamped" in caplog.text


def test_a_nonfinite_meta_gradient_raises_or_is_skipped(caplog) -> None:
    theta = torch.nn.Parameter(torch.zeros(1, dtype=D))
    calls = []

    def train() -> list[torch.Tensor]:
        # finite at θ, overflowing at the finite-difference points θ ± εv
        calls.append(1)
        big = 1.0 if len(calls) % 3 == 1 else float("inf")
        return [(theta[0] - 1) ** 2 * big, (theta[0] + 1) ** 2]

    def val() -> list[torch.Tensor]:
        return [(theta[0] - 1) ** 2, (theta[0] + 1) ** 2]

    with pytest.raises(NonFiniteGradientError, match="meta-gradient of task '0'"):
        AutoLambda(2, primary=[0]).meta_step([theta], train, val, lr=0.1)
    bal = AutoLambda(2, primary=[0], nonfinite="skip_step")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        assert bal.meta_step([theta], train, val, lr=0.1) is None
    assert bal.skipped_meta_steps == 1 and bal.meta_steps == 0
    assert "skipped a meta step" in caplog.text
    torch.testing.assert_close(bal.lam, torch.full((2,), 0.1, dtype=D))
    assert torch.equal(theta.detach(), torch.zeros(1, dtype=D))


def test_a_nonfinite_validation_loss_follows_the_policy() -> None:
    theta = torch.nn.Parameter(torch.zeros(1, dtype=D))

    def train() -> list[torch.Tensor]:
        return [theta[0] ** 2 + 1, theta[0] ** 2 + 2]

    def val() -> list[torch.Tensor]:
        return [theta[0] ** 2, theta[0] * float("nan")]

    with pytest.raises(NonFiniteLossError, match="'1'"):
        AutoLambda(2, primary=[0]).meta_step([theta], train, val, lr=0.1)
    bal = AutoLambda(2, nonfinite="skip_step")
    assert bal.meta_step([theta], train, val, lr=0.1) is None
    assert bal.skipped_meta_steps == 1 and torch.equal(theta.detach(), torch.zeros(1, dtype=D))


def test_forgotten_meta_step_warns_once_at_the_end_of_the_first_period() -> None:
    bal = AutoLambda(2)
    bal([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)])
    with pytest.warns(TaskBalanceWarning, match=r"meta_step\(\) was never called.*autol.meta_step"):
        bal.end_period()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)
        bal.end_period()


def test_forgotten_meta_step_warns_at_the_nth_step(monkeypatch) -> None:
    monkeypatch.setattr(auto_lambda, "FORGOTTEN_META_STEPS", 3)
    bal = AutoLambda(2)
    losses = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)
        bal(losses), bal(losses)
    with pytest.warns(TaskBalanceWarning, match="static weighting, not Auto-Lambda"):
        bal(losses)


def test_no_warning_when_meta_step_is_called() -> None:
    theta = torch.nn.Parameter(torch.zeros(1, dtype=D))

    def losses() -> list[torch.Tensor]:
        return [(theta[0] - 1) ** 2, (theta[0] + 1) ** 2]

    bal = AutoLambda(2)
    bal.meta_step([theta], losses, losses, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)
        bal(losses())
        bal.end_period()


def test_misuse_is_refused() -> None:
    theta = torch.nn.Parameter(torch.zeros(1))

    def losses() -> list[torch.Tensor]:
        return [theta[0] ** 2, theta[0] ** 2]

    bal = AutoLambda(2, accumulation_steps=2)
    bal(losses()).backward()
    with pytest.raises(BalancerUsageError, match="inside an accumulated step"):
        bal.meta_step([theta], losses, losses, lr=0.1)
    with torch.no_grad(), pytest.raises(BalancerUsageError, match="needs autograd"):
        AutoLambda(2).meta_step([theta], losses, losses, lr=0.1)
    with pytest.raises(TypeError, match="closures"):
        AutoLambda(2).meta_step([theta], losses(), losses, lr=0.1)
    with pytest.raises(ValueError, match="lr > 0"):
        AutoLambda(2).meta_step([theta], losses, losses, lr=0.0)
    with pytest.raises(BalancerUsageError, match="does not require grad"):
        AutoLambda(2).meta_step([theta], lambda: [torch.tensor(1.0)] * 2, losses, lr=0.1)
    with pytest.raises(TaskMismatchError, match="'c' is not one of"):
        AutoLambda(["a", "b"], primary="c")
    with pytest.raises(ValueError, match="lr > 0 and init >= 0"):
        AutoLambda(2, init=-1.0)


def test_state_round_trips() -> None:
    train, val = regression(0, k=2), regression(1, k=2)
    thetas = [torch.nn.Parameter(torch.ones(4, dtype=D)) for _ in range(2)]
    a = AutoLambda(2, lr=0.01)
    for _ in range(3):
        a.meta_step([thetas[0]], lambda: train(thetas[0]), lambda: val(thetas[0]), lr=0.1)
    b = AutoLambda(2, lr=0.01)
    b.load_state_dict(save_load(a.state_dict()))
    for _ in range(3):
        for bal, theta in zip((a, b), thetas):
            bal.meta_step([theta], lambda t=theta: train(t), lambda t=theta: val(t), lr=0.1)
        assert torch.equal(a.lam, b.lam)
    assert b.meta_steps == 6 and not torch.equal(a.lam, torch.full((2,), 0.1, dtype=D))
    with pytest.raises(BalancerUsageError, match="saved by an AutoLambda balancer"):
        AutoLambda(3).load_method_state(a.method_state())


def test_the_supervised_comparison_problems_call_meta_step() -> None:
    from taskbalance.compare.problem import make_problem

    problem = make_problem("penguins", size="small")
    made: list[AutoLambda] = []

    def factory() -> AutoLambda:
        made.append(AutoLambda(list(problem.tasks), lr=1e-2))
        return made[-1]

    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskBalanceWarning)  # no "meta_step never called"
        result = problem.run(factory, seed=0, epochs=1)
    assert made[0].meta_steps == result.steps > 0
    assert not torch.equal(made[0].lam, torch.full((3,), 0.1, dtype=D))


DDP_WORKER = """
import sys
import torch
import torch.distributed as dist
from torch import nn
import taskbalance as tb

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
out = {}
for setting in ("auto", "local"):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    model = nn.parallel.DistributedDataParallel(net)
    bal = tb.make("auto_lambda", 2, lr=0.05, distributed=setting)
    gen = torch.Generator().manual_seed(10 + rank)  # every rank has its own batches
    for _ in range(3):
        x, xv = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)

        def losses(inp):
            o = model(inp)
            return [(o[:, 0] - inp[:, 0]).pow(2).mean(), (o[:, 1] + inp[:, 1]).pow(2).mean()]

        bal.meta_step(net.parameters(), lambda: losses(x), lambda: losses(xv), lr=0.1)
    out[setting] = bal.lam
torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_ranks_take_the_same_meta_step_under_ddp(tmp_path) -> None:
    import os
    import subprocess

    from conftest import torchrun_command

    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        torchrun_command(script, str(tmp_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(first["auto"], second["auto"])  # the averaged meta-gradient
    assert not torch.equal(first["local"], second["local"])  # ... which is what makes them agree
    assert not torch.equal(first["auto"], torch.full((2,), 0.1, dtype=D))


@pytest.mark.parametrize(
    "kw", [{"lr": 0.0}, {"lr": -1e-4}, {"lr": float("inf")}, {"init": float("nan")}]
)
def test_a_zero_or_non_finite_meta_learning_rate_is_refused(kw: dict) -> None:
    # lr = 0 would never move λ (static weighting under Auto-Lambda's name)
    with pytest.raises(ValueError, match="lr > 0 and init >= 0"):
        AutoLambda(2, **kw)


def test_training_and_evaluation_use_the_learned_unequal_weights() -> None:
    # λ = (0.3, 0.1), as a few meta steps may leave it: L = 0.3·2 + 0.1·6 = 1.2 both in
    # training and in evaluate() (the mean weight 0.2 would give 1.6)
    bal = AutoLambda(2)
    state = bal.method_state()
    state["lambda"] = torch.tensor([0.3, 0.1], dtype=D)
    bal.load_method_state(state)
    losses = [torch.tensor(2.0), torch.tensor(6.0)]
    assert float(bal.evaluate(losses)) == pytest.approx(1.2)
    assert float(bal(losses)) == pytest.approx(1.2)


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_weight_decay_enters_the_virtual_step_by_hand(hvp: str) -> None:
    # L_1 = ½θ², L_2 = ½(θ − 2)², primary task 0's L_val = ½(θ − 3)², θ = 1,
    # λ = (0.1, 0.1), α = 0.5, weight decay 0.2: g = (1, −1),
    # θ' = 1 − 0.5 (0.1 − 0.1 + 0.2·1) = 0.9,
    # v = θ' − 3 = −2.1, ∂L_val/∂λ_i = −α g_i v = (1.05, −1.05) (no decay: θ' = 1, ±1)
    theta = torch.nn.Parameter(torch.ones(1, dtype=D))

    def train() -> list[torch.Tensor]:
        return [0.5 * theta[0] ** 2, 0.5 * (theta[0] - 2.0) ** 2]

    bal = AutoLambda(2, primary=0, hvp=hvp)  # L_val: task 0 only
    bal.meta_step(
        [theta], train, lambda: [0.5 * (theta[0] - 3.0) ** 2] * 2, lr=0.5, weight_decay=0.2
    )
    torch.testing.assert_close(bal.last_meta_gradient, torch.tensor([1.05, -1.05], dtype=D))
    assert theta.item() == 1.0
