"""Learnable balancer parameters: the classic "forgot to optimise log_vars" bug cannot happen."""

from __future__ import annotations

import warnings

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, const, save_load, task_losses
from taskbalance.learnable import OwnedParameters


# ---------------------------------------------------------------------- optimizer="own"
def test_own_mode_moves_log_vars_on_backward_without_registration() -> None:
    model = TinyNet(2)
    user_opt = torch.optim.SGD(model.parameters(), lr=0.1)  # knows nothing of the balancer
    bal = tb.UncertaintyWeighting(2, lr=0.01)
    assert torch.equal(bal.log_vars.detach(), torch.zeros(2))

    user_opt.zero_grad()
    losses = task_losses(model, 0)
    total = bal(losses)
    assert torch.equal(bal.log_vars.detach(), torch.zeros(2))  # nothing moves before backward
    total.backward()
    moved = bal.log_vars.detach().clone()
    # First Adam step moves each parameter by lr against the sign of its gradient
    # d/ds (exp(-s) L + s) = 1 - L at s = 0.
    grads = torch.tensor([1.0 - loss.item() for loss in losses])
    assert bool((grads != 0).all())
    expected = -0.01 * torch.sign(grads)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-7)
    # the gradient was consumed by the balancer's own step
    assert bal.log_vars.grad is None
    # the user's optimizer never held them
    user_params = {id(p) for g in user_opt.param_groups for p in g["params"]}
    assert id(bal.log_vars) not in user_params
    before = bal.log_vars.detach().clone()
    user_opt.step()
    assert torch.equal(bal.log_vars.detach(), before)


def test_own_mode_steps_once_per_backward() -> None:
    bal = tb.UncertaintyWeighting(1, lr=0.1)
    trajectory = []
    for _ in range(3):
        bal([torch.tensor(5.0)]).backward()  # gradient 1 - 5 exp(-s) < 0 near 0: s grows
        trajectory.append(bal.log_vars.item())
    assert trajectory[0] > 0
    assert trajectory[0] < trajectory[1] < trajectory[2]
    assert trajectory[0] == pytest.approx(0.1, rel=1e-5)


def test_own_mode_has_no_weight_decay() -> None:
    """Positive variant at p = 1 with L = 1: d/dp (0.5 L / p^2 + log(1 + p^2)) = -L + 1 = 0
    exactly, so p must not move; any weight decay would pull it towards 0."""
    bal = tb.UncertaintyWeighting(2, variant="positive", lr=0.1)
    for _ in range(20):
        bal(const(1.0, 1.0)).backward()
    assert torch.equal(bal.log_vars.detach(), torch.ones(2))


def test_own_mode_balancer_parameters_are_float32_leaves() -> None:
    bal = tb.UncertaintyWeighting(3)
    (param,) = bal.parameters()
    assert param is bal.log_vars
    assert param.is_leaf and param.requires_grad
    assert param.dtype == torch.float32


def test_attach_in_own_mode_raises() -> None:
    bal = tb.UncertaintyWeighting(2)
    opt = torch.optim.SGD(TinyNet(2).parameters(), lr=0.1)
    with pytest.raises(tb.BalancerUsageError, match="external"):
        bal.attach(opt)
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------- optimizer="external"
def test_external_mode_before_attach_raises() -> None:
    bal = tb.UncertaintyWeighting(["a", "b"], optimizer="external")
    with pytest.raises(tb.BalancerUsageError, match="attach"):
        bal(const(1.0, 2.0))
    assert bal.steps == 0


def test_attach_adds_a_zero_weight_decay_group_even_to_adamw() -> None:
    model = TinyNet(2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    bal = tb.UncertaintyWeighting(2, variant="positive", optimizer="external")
    bal.attach(opt)
    assert len(opt.param_groups) == 2
    group = opt.param_groups[1]
    assert group["weight_decay"] == 0.0
    assert group["params"] == [bal.log_vars]
    assert group["lr"] == 1e-3  # the balancer's lr
    # stationary point of the positive variant (L = 1, p = 1): only weight decay could move p
    for _ in range(10):
        opt.zero_grad()
        bal(const(1.0, 1.0)).backward()
        opt.step()
    assert torch.equal(bal.log_vars.detach(), torch.ones(2))


def test_external_parameters_move_on_optimizer_step_only() -> None:
    bal = tb.UncertaintyWeighting(2, optimizer="external")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    bal.attach(opt, lr=0.25)
    assert opt.param_groups[1]["lr"] == 0.25
    opt.zero_grad()
    bal(const(3.0, 0.5)).backward()
    # backward alone does not step in external mode
    assert torch.equal(bal.log_vars.detach(), torch.zeros(2))
    # gradient of exp(-s) L + s at s = 0 is 1 - L
    torch.testing.assert_close(bal.log_vars.grad, torch.tensor([1.0 - 3.0, 1.0 - 0.5]))
    opt.step()
    torch.testing.assert_close(bal.log_vars.detach(), torch.tensor([0.25 * 2.0, -0.25 * 0.5]))


def test_attach_twice_does_not_duplicate() -> None:
    bal = tb.UncertaintyWeighting(2, optimizer="external")
    opt = torch.optim.Adam(TinyNet(2).parameters())
    bal.attach(opt)
    bal.attach(opt)
    assert len(opt.param_groups) == 2


def test_attach_refuses_an_optimizer_holding_them_with_weight_decay() -> None:
    model = TinyNet(2)
    bal = tb.UncertaintyWeighting(2, optimizer="external")
    opt = torch.optim.AdamW([*model.parameters(), *bal.parameters()], lr=0.01)
    with pytest.raises(tb.BalancerUsageError, match="weight_decay"):
        bal.attach(opt)
    with pytest.raises(tb.BalancerUsageError):
        bal(const(1.0, 1.0))  # still not attached


def test_attach_accepts_an_optimizer_holding_them_without_weight_decay() -> None:
    model = TinyNet(2)
    bal = tb.UncertaintyWeighting(2, optimizer="external")
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1, weight_decay=0.0)
    bal.attach(opt)
    assert len(opt.param_groups) == 1
    opt.zero_grad()
    bal(const(2.0, 2.0)).backward()
    opt.step()
    torch.testing.assert_close(bal.log_vars.detach(), torch.tensor([0.1, 0.1]))


# ---------------------------------------------------------------------- OwnedParameters itself
def test_owned_parameters_validation() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        OwnedParameters("x", {"p": torch.zeros(1)}, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        OwnedParameters("x", {"p": torch.zeros(1)}, lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        OwnedParameters("x", {"p": torch.zeros(1)}, lr=-1.0)


def test_owned_parameters_copy_their_init() -> None:
    init = torch.tensor([1.0, 2.0], dtype=torch.float64)
    owned = OwnedParameters("x", {"p": init})
    init.fill_(7.0)
    assert torch.equal(owned["p"].detach(), torch.tensor([1.0, 2.0]))
    assert owned["p"].dtype == torch.float32


def test_owned_parameters_step_each_tensor_in_backward() -> None:
    owned = OwnedParameters("x", {"p": torch.zeros(2), "q": torch.ones(1)}, lr=0.5)
    (owned["p"].sum() - 3 * owned["q"].sum()).backward()
    assert torch.allclose(owned["p"].detach(), torch.tensor([-0.5, -0.5]))
    assert torch.allclose(owned["q"].detach(), torch.tensor([1.5]))
    assert owned["p"].grad is None and owned["q"].grad is None


def test_owned_parameters_state_round_trip() -> None:
    def run(owned: OwnedParameters, steps: range) -> None:
        for i in steps:
            (owned["p"] * torch.tensor([1.0, -2.0]) * (i + 1)).sum().backward()

    full = OwnedParameters("x", {"p": torch.zeros(2)}, lr=0.1)
    run(full, range(6))
    first = OwnedParameters("x", {"p": torch.zeros(2)}, lr=0.1)
    run(first, range(3))
    state = save_load(first.state_dict())
    second = OwnedParameters("x", {"p": torch.zeros(2)}, lr=0.1)
    second.load_state_dict(state)
    run(second, range(3, 6))
    assert torch.equal(full["p"], second["p"])
    # without the optimizer state (Adam moments) the result differs
    no_moments = OwnedParameters("x", {"p": torch.zeros(2)}, lr=0.1)
    no_moments.load_state_dict({"params": state["params"], "optimizers": {}})
    run(no_moments, range(3, 6))
    assert not torch.equal(full["p"], no_moments["p"])


# ---------------------------------------------------------------------- foreign optimizers
def _one_step(bal: tb.Balancer, model: torch.nn.Linear, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    out = model(torch.randn(8, 2))
    bal([out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]).backward()
    opt.step()


@pytest.mark.parametrize("method", ["uncertainty", "imtl_l"])
def test_own_parameters_in_the_users_optimizer_warn_once(method: str) -> None:
    model = torch.nn.Linear(2, 2)
    bal = tb.make(method, 2)
    opt = torch.optim.AdamW([*model.parameters(), *bal.parameters()], weight_decay=0.1)
    with pytest.warns(tb.TaskBalanceWarning, match=r"steps them itself.*optimizer='external'"):
        _one_step(bal, model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_step(bal, model, opt)  # once only


def test_the_warning_names_the_parameters_and_the_optimizer() -> None:
    model = torch.nn.Linear(2, 2)
    bal = tb.make("uncertainty", 2)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": bal.parameters()}], lr=0.1)
    with pytest.warns(tb.TaskBalanceWarning, match=r"\['log_vars'\].*\(SGD\)") as record:
        _one_step(bal, model, opt)
    assert record[0].filename == __file__  # points at the user's opt.step() line


def test_famo_logits_in_the_users_optimizer_warn_without_offering_external() -> None:
    model = torch.nn.Linear(2, 2)
    bal = tb.make("famo", 2)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    with pytest.warns(tb.TaskBalanceWarning, match="FAMO takes no optimizer='external'"):
        _one_step(bal, model, opt)


def test_a_model_only_optimizer_and_an_attached_one_do_not_warn() -> None:
    model = torch.nn.Linear(2, 2)
    own = tb.make("uncertainty", 2)
    external = tb.make("uncertainty", 2, optimizer="external")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    external.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bal in (own, external):
            _one_step(bal, model, opt)


def test_parameters_added_to_a_checked_optimizer_later_are_seen() -> None:
    model = torch.nn.Linear(2, 2)
    bal = tb.make("uncertainty", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _one_step(bal, model, opt)
    opt.add_param_group({"params": bal.parameters()})
    with pytest.warns(tb.TaskBalanceWarning, match="log_vars"):
        _one_step(bal, model, opt)
