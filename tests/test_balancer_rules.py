"""Rules every balancer follows, tested on every registered method.

* A call with autograd disabled is refused (it can only be an evaluation); ``evaluate``
  gives the weighted loss and touches no state.
* ``repr`` shows the hyper-parameters; ``state_dict`` saves them; ``load_state_dict``
  restores state only, keeps the constructor's hyper-parameters and warns on a difference.
* Every balancer has ``parameters()``; ``attach`` explains itself where it does not apply.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, balancer_step, batch, kpi_from, save_load
from taskbalance.registry import constructor_parameters

K = 3
METHODS = tb.list_methods()
#: the balancers with learnable parameters, and the name of their tensor.
LEARNABLE = {"uncertainty": "log_vars", "gradnorm": "weights", "imtl_l": "s", "famo": "logits"}


def build(method: str, **kw: Any) -> tb.Balancer:
    if method == "static":
        kw.setdefault("weights", [0.5, 1.0, 2.0])
    return tb.make(method, K, **kw)


def train_step(bal: tb.Balancer, model: TinyNet, step: int) -> None:
    """One complete training step of ``bal`` on ``model`` (SGD, lr 0.01)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    x, targets = batch(step, K)
    z = torch.tanh(model.shared(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]
    ctx = {"kpi": kpi_from(losses)} if bal.method_name == "dtp" else {}
    balancer_step(bal, losses, model.shared, z, **ctx)
    opt.step()


def eval_losses(model: TinyNet, step: int) -> list[torch.Tensor]:
    x, targets = batch(step, K)
    z = torch.tanh(model.shared(x))
    return [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]


def serialized(bal: tb.Balancer) -> bytes:
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    return buf.getvalue()


def trained(method: str, steps: int = 3) -> tuple[tb.Balancer, TinyNet]:
    bal, model = build(method), TinyNet(K, seed=1)
    for step in range(steps):
        train_step(bal, model, step)
        bal.end_period()
    return bal, model


# ---------------------------------------------------------------------- no_grad / evaluate
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_call_without_autograd_is_refused_and_changes_nothing(method: str, context) -> None:
    bal, model = trained(method)
    before = serialized(bal)
    with context():
        losses = eval_losses(model, 10)
        with pytest.raises(tb.BalancerUsageError, match=r"autograd disabled.*evaluate"):
            if bal.kind == "loss":
                bal(losses)
            else:
                bal.backward(losses, shared=model.shared)
    assert serialized(bal) == before
    assert bal.steps == 3


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_touches_no_state(method: str) -> None:
    bal, model = trained(method)
    twin, twin_model = trained(method)
    before = serialized(bal)
    with torch.no_grad():
        value = bal.evaluate(eval_losses(model, 10))
    assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
    assert serialized(bal) == before
    # the next training step is the one a twin without the evaluation takes
    train_step(bal, model, 3)
    train_step(twin, twin_model, 3)
    assert torch.equal(bal.last_weights, twin.last_weights)


def test_evaluate_weights_as_the_training_step_would() -> None:
    bal = tb.make("dwa", 2, temperature=2.0, period="step")
    for pair in ([1.0, 1.0], [0.5, 2.0]):
        bal(torch.tensor(pair))
    losses = torch.tensor([3.0, 1.0])
    # r = (0.5/1, 2/1) -> w = 2 softmax(r / 2), by hand
    e = torch.exp(torch.tensor([0.25, 1.0], dtype=torch.float64))
    w = 2 * e / e.sum()
    expected = float((w * losses.double()).sum())
    assert float(bal.evaluate(losses)) == pytest.approx(expected, rel=1e-6)
    assert float(bal(losses)) == pytest.approx(expected, rel=1e-6)


def test_evaluate_of_rlw_consumes_no_draw() -> None:
    a, b = tb.make("rlw", 3, seed=4), tb.make("rlw", 3, seed=4)
    for _ in range(5):
        a.evaluate(torch.ones(3))
    a(torch.ones(3))
    b(torch.ones(3))
    assert torch.equal(a.last_weights, b.last_weights)


def test_evaluate_of_a_gradient_method_uses_the_last_weights() -> None:
    bal, _ = trained("mgda")
    losses = torch.tensor([1.0, 2.0, 4.0])
    expected = float((bal.last_weights.double() * losses.double()).sum())
    assert float(bal.evaluate(losses)) == pytest.approx(expected, rel=1e-6)
    assert float(tb.make("mgda", K).evaluate(losses)) == pytest.approx(7.0)


def test_evaluate_of_uncertainty_includes_the_regulariser() -> None:
    bal = tb.make("uncertainty", 2, init=1.0)
    losses = torch.tensor([2.0, 3.0])
    # exp(-s) L + s with s = 1, by hand
    expected = float(torch.exp(torch.tensor(-1.0)) * 5.0 + 2.0)
    assert float(bal.evaluate(losses)) == pytest.approx(expected, rel=1e-6)


def test_evaluate_of_famo_does_not_step_its_logits_or_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bal = tb.make("famo", 2)
    bal(torch.tensor([1.0, 2.0], requires_grad=True))  # awaits update(): a catch-up pending
    logits = bal.logits.detach().clone()
    with caplog.at_level("WARNING", logger="taskbalance"):
        bal.evaluate(torch.tensor([0.5, 1.0]))
    assert torch.equal(bal.logits.detach(), logits)
    assert "update" not in caplog.text


def test_evaluate_reports_a_non_finite_loss_even_when_training_skips_it() -> None:
    bal = tb.make("equal", ["a", "b"], nonfinite="skip_step")
    with pytest.raises(tb.NonFiniteLossError, match="'b'"):
        bal.evaluate(torch.tensor([1.0, float("nan")]))
    assert bal.skipped_steps == 0


# ---------------------------------------------------------------------- repr
@pytest.mark.parametrize("method", METHODS)
def test_repr_shows_every_hyperparameter_of_the_method(method: str) -> None:
    bal = build(method)
    text = repr(bal)
    assert text.startswith(type(bal).__name__ + "(tasks=['0', '1', '2']")
    common = set(constructor_parameters(tb.Balancer)) | {"task_specific", "tasks_per_step"}
    common |= {"tasks_seed", "jacobian_free"}
    for name in constructor_parameters(type(bal)):
        if name not in common:
            assert f"{name}=" in text, f"{method}: {name} missing from {text}"


def test_repr_shows_the_given_values_and_non_default_settings() -> None:
    text = repr(tb.make("cagrad", ["a", "b"], c=0.2, accumulation_steps=4))
    assert "c=0.2" in text and "accumulation_steps=4" in text
    assert "nonfinite" not in text  # a default common setting is left out
    assert repr(tb.DWA(2, 3.0)).startswith("DWA(tasks=['0', '1'], temperature=3.0,")
    assert "weights=[1, 2]" in repr(tb.StaticWeighting(2, [1, 2]))


# ---------------------------------------------------------------------- load rule
@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_with_other_hyperparameters_warns_and_the_constructor_wins(
    method: str,
) -> None:
    saved_by, _ = trained(method)
    saved = save_load(saved_by.state_dict())
    assert saved["hyperparameters"]["nonfinite"] == "raise"
    bal = build(method, nonfinite="skip_step")
    with pytest.warns(tb.TaskBalanceWarning, match=r"nonfinite='raise' in the checkpoint"):
        bal.load_state_dict(saved)
    assert bal.nonfinite == "skip_step"
    assert bal.steps == saved_by.steps


@pytest.mark.parametrize("method", METHODS)
def test_the_same_hyperparameters_load_silently(method: str) -> None:
    saved_by, _ = trained(method)
    bal = build(method, record=False)  # how a run is recorded is not a hyper-parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.load_state_dict(save_load(saved_by.state_dict()))


def test_dwa_keeps_the_constructors_temperature() -> None:
    hot = tb.make("dwa", 2, temperature=100.0, period="step")
    for pair in ([1.0, 1.0], [0.5, 2.0]):
        hot(torch.tensor(pair))
    cold = tb.make("dwa", 2, temperature=0.5, period="step")
    with pytest.warns(tb.TaskBalanceWarning, match=r"temperature=100.0 in the checkpoint"):
        cold.load_state_dict(save_load(hot.state_dict()))
    cold(torch.tensor([1.0, 1.0]))
    e = torch.exp(torch.tensor([0.5, 2.0], dtype=torch.float64) / 0.5)
    assert torch.allclose(cold.last_weights.double(), 2 * e / e.sum())


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "imtl_l", "famo"])
def test_a_learnable_balancer_keeps_the_constructors_lr(method: str) -> None:
    saved_by = build(method, lr=0.5)
    bal = build(method, lr=0.001)
    with pytest.warns(tb.TaskBalanceWarning, match=r"lr=0.5 in the checkpoint, 0.001 here"):
        bal.load_state_dict(save_load(saved_by.state_dict()))
    lrs = [
        g["lr"]
        for learnable in bal._learnables()
        for opt in learnable._optimizers.values()
        for g in opt.param_groups
    ]
    assert lrs and all(lr == 0.001 for lr in lrs)


def test_a_checkpoint_without_hyperparameters_still_loads() -> None:
    old = save_load(tb.make("dwa", 2).state_dict())
    del old["hyperparameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.make("dwa", 2, temperature=5.0).load_state_dict(old)


def test_a_refused_load_changes_nothing() -> None:
    kendall, _ = trained("uncertainty")
    positive = build("uncertainty", variant="positive")
    with pytest.raises(tb.BalancerUsageError, match="variant"):
        positive.load_state_dict(save_load(kendall.state_dict()))
    assert positive.steps == 0 and len(positive.history) == 0


# ---------------------------------------------------------------------- parameters / attach
@pytest.mark.parametrize("method", METHODS)
def test_every_balancer_has_parameters(method: str) -> None:
    params = build(method).parameters()
    assert isinstance(params, list)
    if method in LEARNABLE:
        assert params and all(isinstance(p, torch.nn.Parameter) for p in params)
    elif method != "imtl":  # IMTL-G (the default variant) has none; hybrid has s
        assert params == []


@pytest.mark.parametrize("method", [m for m in METHODS if m not in LEARNABLE and m != "imtl"])
def test_attach_without_learnable_parameters_says_so(method: str) -> None:
    model = TinyNet(K)
    with pytest.raises(tb.BalancerUsageError, match="no learnable parameters"):
        build(method).attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_famo_attach_says_it_takes_no_external_optimizer() -> None:
    model = TinyNet(K)
    with pytest.raises(tb.BalancerUsageError, match="takes no optimizer='external'"):
        build("famo").attach(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "imtl_l"])
def test_external_methods_attach_through_the_base_class(method: str) -> None:
    model = TinyNet(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    bal = build(method, optimizer="external")
    bal.attach(opt)
    group = opt.param_groups[-1]
    assert group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in bal.parameters()}
