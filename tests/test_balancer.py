"""The Balancer base class: input checking, non-finite policy, history, state round trips."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, assert_same, const, kpi_from, save_load, task_losses, train
from taskbalance.balancer import task_names

# Every loss-weighting method (with non-default hyper-parameters where they matter), as
# (make kwargs, train kwargs). Three tasks named a, b, c.
TASKS = ["a", "b", "c"]
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "equal": ({"name": "equal"}, {}),
    "equal-mean": ({"name": "equal", "reduction": "mean"}, {}),
    "static": ({"name": "static", "weights": [0.5, 2.0, 1.25]}, {}),
    "dwa-epoch": ({"name": "dwa", "temperature": 0.5}, {"period": 3}),
    "dwa-step": ({"name": "dwa", "period": "step", "temperature": 0.5}, {}),
    "uncertainty-kendall": ({"name": "uncertainty", "lr": 0.05}, {}),
    "uncertainty-paper": (
        {
            "name": "uncertainty",
            "variant": "paper",
            "task_types": ["regression", "classification", "regression"],
            "lr": 0.05,
        },
        {},
    ),
    "uncertainty-positive": ({"name": "uncertainty", "variant": "positive", "lr": 0.05}, {}),
    "dtp": ({"name": "dtp", "gamma": [1.0, 2.0, 0.5], "alpha": 0.3}, {"with_kpi": True}),
    "rlw": ({"name": "rlw", "seed": 7}, {}),
    "gls": ({"name": "gls"}, {}),
}


def build(cfg: dict[str, Any], **extra: Any) -> tb.Balancer:
    kwargs = dict(cfg)
    name = kwargs.pop("name")
    return tb.make(name, TASKS, **kwargs, **extra)


def fresh_setup(cfg: dict[str, Any], seed: int = 0, **extra: Any):
    model = TinyNet(len(TASKS), seed=seed)
    balancer = build(cfg, **extra)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    return model, balancer, optimizer


# ---------------------------------------------------------------------- task names
def test_task_names_from_count_and_names() -> None:
    assert task_names(3) == ("0", "1", "2")
    assert task_names(["seg", "depth"]) == ("seg", "depth")
    assert task_names(("x",)) == ("x",)


@pytest.mark.parametrize(
    ("tasks", "error"),
    [
        (0, ValueError),
        (-2, ValueError),
        (True, TypeError),
        ("ab", TypeError),
        ([], ValueError),
        (["a", "a"], ValueError),
    ],
)
def test_task_names_rejects_bad_tasks(tasks: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        task_names(tasks)
    with pytest.raises(error):
        tb.EqualWeighting(tasks)


def test_bad_nonfinite_policy_rejected() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        tb.EqualWeighting(2, nonfinite="ignore")  # type: ignore[arg-type]


def test_repr_and_num_tasks() -> None:
    bal = tb.EqualWeighting(["seg", "depth"])
    assert bal.num_tasks == 2
    assert "seg" in repr(bal) and "depth" in repr(bal)


# ---------------------------------------------------------------------- input formats
FORMAT_CONFIGS = ["equal", "equal-mean", "static", "dwa-step", "uncertainty-paper", "gls", "dtp"]


@pytest.mark.parametrize("name", FORMAT_CONFIGS)
def test_dict_list_tuple_tensor_give_the_same_result(name: str) -> None:
    cfg, _ = CONFIGS[name]
    values = [(1.5, 0.25, 3.0), (1.0, 0.5, 2.0), (0.75, 0.5, 2.5)]
    kpis = [[0.5, 0.9, 0.2], [0.6, 0.8, 0.3], [0.7, 0.7, 0.4]]
    outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for fmt in ("dict", "reversed-dict", "list", "tuple", "tensor"):
        bal = build(cfg)
        results = []
        for vals, kpi in zip(values, kpis):
            losses = const(*vals)
            given: Any
            if fmt == "dict":
                given = dict(zip(TASKS, losses))
            elif fmt == "reversed-dict":
                given = dict(reversed(list(zip(TASKS, losses))))
            elif fmt == "list":
                given = losses
            elif fmt == "tuple":
                given = tuple(losses)
            else:
                given = torch.tensor(vals)
            context = {"kpi": kpi} if name == "dtp" else {}
            total = bal(given, **context)
            results.append((total.detach(), bal.last_weights))
        outputs[fmt] = results
    reference = outputs["list"]
    for fmt, results in outputs.items():
        for (total, weights), (ref_total, ref_weights) in zip(results, reference):
            assert torch.equal(total, ref_total), fmt
            assert torch.equal(weights, ref_weights), fmt


def test_dict_losses_are_matched_by_name_not_order() -> None:
    bal = tb.StaticWeighting(["a", "b"], weights=[1.0, 3.0])
    total = bal({"b": torch.tensor(2.0), "a": torch.tensor(5.0)})
    assert total.item() == 1.0 * 5.0 + 3.0 * 2.0


def test_one_element_tensors_of_any_shape_are_accepted() -> None:
    bal = tb.EqualWeighting(2)
    total = bal([torch.tensor([2.0]), torch.tensor([[3.0]])])
    assert total.shape == ()
    assert total.item() == 5.0


def test_integer_loss_tensor_is_promoted_to_float() -> None:
    bal = tb.EqualWeighting(2, reduction="mean")
    total = bal(torch.tensor([1, 2]))
    assert total.dtype == torch.float32
    assert total.item() == 1.5


def test_float64_losses_keep_float64() -> None:
    bal = tb.StaticWeighting(2, weights=[0.1, 0.2])
    total = bal([torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0)])
    assert total.dtype == torch.float64
    assert total.item() == pytest.approx(0.1 + 0.2, abs=1e-15)


def test_half_losses_are_combined_in_float32() -> None:
    bal = tb.EqualWeighting(2)
    total = bal([torch.tensor(1.0, dtype=torch.float16), torch.tensor(2.0, dtype=torch.bfloat16)])
    assert total.dtype == torch.float32
    assert total.item() == 3.0


def test_gradient_flows_to_each_loss() -> None:
    bal = tb.StaticWeighting(3, weights=[2.0, 0.5, -1.0])
    losses = const(1.0, 2.0, 3.0, requires_grad=True)
    bal(losses).backward()
    assert [loss.grad.item() for loss in losses] == [2.0, 0.5, -1.0]


# ---------------------------------------------------------------------- mismatches
def test_wrong_number_of_losses_in_a_list() -> None:
    bal = tb.EqualWeighting(["a", "b", "c"])
    with pytest.raises(tb.TaskMismatchError, match=r"expected 3 losses.*got 2"):
        bal(const(1.0, 2.0))
    with pytest.raises(tb.TaskMismatchError, match="got 4"):
        bal(const(1.0, 2.0, 3.0, 4.0))


def test_wrong_tensor_shape() -> None:
    bal = tb.EqualWeighting(3)
    with pytest.raises(tb.TaskMismatchError, match=r"\(2,\)"):
        bal(torch.tensor([1.0, 2.0]))
    with pytest.raises(tb.TaskMismatchError, match=r"\(3, 1\)"):
        bal(torch.ones(3, 1))


def test_missing_and_unexpected_names_are_listed() -> None:
    bal = tb.EqualWeighting(["seg", "depth", "normal"])
    with pytest.raises(tb.TaskMismatchError) as info:
        bal({"seg": torch.tensor(1.0), "dpeth": torch.tensor(1.0), "normal": torch.tensor(1.0)})
    message = str(info.value)
    assert "missing ['depth']" in message
    assert "unexpected ['dpeth']" in message
    with pytest.raises(tb.TaskMismatchError, match=r"missing \['normal'\]"):
        bal({"seg": torch.tensor(1.0), "depth": torch.tensor(1.0)})
    with pytest.raises(tb.TaskMismatchError, match=r"unexpected \['extra'\]"):
        bal({t: torch.tensor(1.0) for t in ["seg", "depth", "normal", "extra"]})


def test_task_mismatch_is_a_value_error() -> None:
    assert issubclass(tb.TaskMismatchError, ValueError)
    assert issubclass(tb.TaskMismatchError, tb.TaskBalanceError)


def test_non_scalar_loss() -> None:
    bal = tb.EqualWeighting(["a", "b"])
    with pytest.raises(tb.NotScalarLossError, match=r"'b'.*\(2,\)"):
        bal([torch.tensor(1.0), torch.tensor([1.0, 2.0])])
    with pytest.raises(tb.NotScalarLossError, match="'a'"):
        bal([torch.empty(0), torch.tensor(1.0)])


def test_non_tensor_loss() -> None:
    bal = tb.EqualWeighting(["a", "b"])
    with pytest.raises(TypeError, match=r"'b'.*float"):
        bal([torch.tensor(1.0), 2.0])
    with pytest.raises(TypeError):
        bal(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bal("ab")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- non-finite losses
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_nonfinite_loss_raises_naming_the_task(bad: float, as_tensor: bool) -> None:
    bal = tb.EqualWeighting(["seg", "depth", "normal"])
    values = [1.0, bad, 2.0]
    losses: Any = torch.tensor(values) if as_tensor else const(*values)
    with pytest.raises(tb.NonFiniteLossError) as info:
        bal(losses)
    err = info.value
    assert err.task == "depth"
    assert "'depth'" in str(err)
    assert str(bad) in str(err)
    assert (math.isnan(err.value) and math.isnan(bad)) or err.value == bad
    assert bal.steps == 0
    assert bal.history is not None and len(bal.history) == 0


def test_nonfinite_error_names_the_first_bad_task() -> None:
    bal = tb.EqualWeighting(["a", "b", "c"])
    with pytest.raises(tb.NonFiniteLossError) as info:
        bal(const(1.0, 2.0, float("nan")))
    assert info.value.task == "c"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skip_step_leaves_state_untouched(name: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg, kw = CONFIGS[name]
    model, bal, opt = fresh_setup(cfg, nonfinite="skip_step")
    train(bal, model, opt, 0, 4, **kw)
    before = save_load(bal.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]

    opt.zero_grad(set_to_none=True)
    losses = task_losses(model, 4)
    kpi = kpi_from(losses)
    losses[1] = losses[1] * float("nan")
    context = {"kpi": kpi} if kw.get("with_kpi") else {}
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        total = bal(losses, **context)
    assert bal.last_step_skipped
    total.backward()  # backward-able
    assert all(p.grad is None for p in model.parameters())
    assert bal.skipped_steps == 1
    assert bal.steps == 4
    assert "'b'" in caplog.text

    after = bal.state_dict()
    assert after["skipped_steps"] == 1
    after["skipped_steps"] = before["skipped_steps"]
    assert_same(save_load(after), before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))

    # The run then goes on exactly like a run that never saw the bad step.
    resumed = train(bal, model, opt, 4, 9, **kw)
    assert not bal.last_step_skipped
    ref_model, ref_bal, ref_opt = fresh_setup(cfg)
    train(ref_bal, ref_model, ref_opt, 0, 4, **kw)
    reference = train(ref_bal, ref_model, ref_opt, 4, 9, **kw)
    for w, r in zip(resumed, reference):
        assert torch.equal(w, r)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_skip_step_backward_returns_none_and_fills_no_grad() -> None:
    model = TinyNet(3)
    bal = tb.EqualWeighting(TASKS, nonfinite="skip_step")
    losses = task_losses(model, 0)
    losses[2] = losses[2] + float("inf")
    assert bal.backward(losses) is None
    assert all(p.grad is None for p in model.parameters())
    assert bal.skipped_steps == 1
    assert bal.last_skip_reason == "loss"
    # a good step afterwards clears the flag and counts
    weights = bal.backward(task_losses(model, 1))
    assert weights is not None and torch.equal(weights, torch.ones(3))
    assert not bal.last_step_skipped and bal.last_skip_reason is None
    assert bal.steps == 1
    assert all(p.grad is not None for p in model.parameters())


def test_backward_fills_the_gradient_of_the_weighted_sum() -> None:
    model = TinyNet(2)
    bal = tb.StaticWeighting(2, weights=[0.25, 3.0])
    weights = bal.backward(task_losses(model, 0), shared=None, features=None)
    assert weights is not None
    assert torch.equal(weights, torch.tensor([0.25, 3.0]))
    grads = [p.grad.clone() for p in model.parameters()]

    ref = TinyNet(2)
    l0, l1 = task_losses(ref, 0)
    (0.25 * l0 + 3.0 * l1).backward()
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)


def test_bare_subclass_is_a_gradient_method() -> None:
    class Gradienty(tb.Balancer):
        kind = "gradient"

    with pytest.raises(tb.BalancerUsageError, match="backward"):
        Gradienty(2)(const(1.0, 2.0))


# ---------------------------------------------------------------------- history
def test_history_records_losses_and_weights() -> None:
    bal = tb.StaticWeighting(["a", "b"], weights=[2.0, 0.5])
    bal(const(1.0, 4.0))
    bal(const(3.0, 2.0))
    assert bal.history is not None
    assert bal.history.steps == [0, 1]
    assert torch.equal(
        bal.history.losses, torch.tensor([[1.0, 4.0], [3.0, 2.0]], dtype=torch.float64)
    )
    assert torch.equal(
        bal.history.weights, torch.tensor([[2.0, 0.5], [2.0, 0.5]], dtype=torch.float64)
    )
    assert bal.steps == 2


def test_record_false_keeps_no_history_but_round_trips() -> None:
    bal = tb.EqualWeighting(2, record=False)
    bal(const(1.0, 2.0))
    assert bal.history is None
    assert torch.equal(bal.last_weights, torch.ones(2))
    state = save_load(bal.state_dict())
    assert state["history"] is None
    other = tb.EqualWeighting(2)
    other.load_state_dict(state)
    assert other.steps == 1


# ---------------------------------------------------------------------- state round trips
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_run_is_bit_exact(name: str) -> None:
    cfg, kw = CONFIGS[name]
    n, m = 7, 8

    model, bal, opt = fresh_setup(cfg)
    full = train(bal, model, opt, 0, n + m, **kw)

    model_a, bal_a, opt_a = fresh_setup(cfg)
    first = train(bal_a, model_a, opt_a, 0, n, **kw)
    checkpoint = save_load(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "bal": bal_a.state_dict()}
    )
    del model_a, bal_a, opt_a

    # a fresh model with a different init, a fresh optimizer and a fresh balancer
    model_b, bal_b, opt_b = fresh_setup(cfg, seed=123)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    bal_b.load_state_dict(checkpoint["bal"])
    second = train(bal_b, model_b, opt_b, n, n + m, **kw)

    assert len(full) == len(first) + len(second)
    for step, (w, r) in enumerate(zip(full, first + second)):
        assert torch.equal(w, r), f"step {step}: {w} != {r}"
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert bal_b.steps == bal.steps == n + m
    assert bal.history is not None and bal_b.history is not None
    assert torch.equal(bal.history.weights, bal_b.history.weights)
    assert torch.equal(bal.history.losses, bal_b.history.losses)
    assert bal.history.steps == bal_b.history.steps
    for extra in bal.history.extra_names:
        assert torch.equal(bal.history.extra(extra), bal_b.history.extra(extra))
    assert_same(save_load(bal.state_dict()), save_load(bal_b.state_dict()))
    if name.startswith("uncertainty"):
        assert torch.equal(bal.log_vars, bal_b.log_vars)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["dwa-epoch", "uncertainty-kendall", "rlw", "dtp"])
def test_the_state_is_not_trivial(name: str) -> None:
    """The resumed run above would pass vacuously if the state did not matter: check that a
    fresh balancer without the loaded state gives different weights."""
    cfg, kw = CONFIGS[name]
    n, m = 7, 8
    model, bal, opt = fresh_setup(cfg)
    full = train(bal, model, opt, 0, n + m, **kw)
    model_a, bal_a, opt_a = fresh_setup(cfg)
    train(bal_a, model_a, opt_a, 0, n, **kw)
    other = build(cfg)  # no load_state_dict
    second = train(other, model_a, opt_a, n, n + m, **kw)
    assert any(not torch.equal(w, r) for w, r in zip(full[n:], second))


def test_external_uncertainty_resumes_through_the_user_optimizer() -> None:
    cfg = {"name": "uncertainty", "optimizer": "external"}
    n, m = 5, 6

    def setup(seed: int = 0):
        model = TinyNet(3, seed=seed)
        bal = build(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        bal.attach(opt, lr=0.05)  # type: ignore[attr-defined]
        return model, bal, opt

    model, bal, opt = setup()
    full = train(bal, model, opt, 0, n + m)
    model_a, bal_a, opt_a = setup()
    train(bal_a, model_a, opt_a, 0, n)
    ckpt = save_load({"m": model_a.state_dict(), "o": opt_a.state_dict(), "b": bal_a.state_dict()})
    model_b, bal_b, opt_b = setup(seed=5)
    model_b.load_state_dict(ckpt["m"])
    opt_b.load_state_dict(ckpt["o"])
    bal_b.load_state_dict(ckpt["b"])
    second = train(bal_b, model_b, opt_b, n, n + m)
    for w, r in zip(full[n:], second):
        assert torch.equal(w, r)
    assert torch.equal(bal.log_vars, bal_b.log_vars)  # type: ignore[attr-defined]
    assert not torch.equal(bal.log_vars.detach(), torch.zeros(3))  # type: ignore[attr-defined]


def test_state_dict_is_loadable_with_weights_only() -> None:
    for cfg, kw in CONFIGS.values():
        model, bal, opt = fresh_setup(cfg)
        train(bal, model, opt, 0, 4, **kw)
        state = save_load(bal.state_dict())
        assert state["method"] == bal.method_name
        assert state["tasks"] == TASKS
        assert state["steps"] == 4


def test_loading_a_state_of_another_method_raises() -> None:
    dwa = tb.DWA(TASKS)
    dwa(const(1.0, 2.0, 3.0))
    state = save_load(dwa.state_dict())
    with pytest.raises(tb.BalancerUsageError, match="'dwa'"):
        tb.GLS(TASKS).load_state_dict(state)
    with pytest.raises(tb.BalancerUsageError):
        tb.EqualWeighting(TASKS).load_state_dict(state)


@pytest.mark.parametrize("other_tasks", [["a", "b"], ["a", "b", "d"], ["c", "b", "a"], 3])
def test_loading_a_state_of_other_tasks_raises(other_tasks: Any) -> None:
    bal = tb.EqualWeighting(TASKS)
    bal(const(1.0, 2.0, 3.0))
    state = save_load(bal.state_dict())
    target = tb.EqualWeighting(other_tasks)
    with pytest.raises(tb.TaskMismatchError) as info:
        target.load_state_dict(state)
    assert "['a', 'b', 'c']" in str(info.value)
    assert target.steps == 0


def test_steps_and_skipped_steps_are_restored() -> None:
    bal = tb.EqualWeighting(2, nonfinite="skip_step")
    bal(const(1.0, 2.0))
    bal(const(float("nan"), 2.0))
    bal(const(1.0, 2.0))
    other = tb.EqualWeighting(2, nonfinite="skip_step")
    other.load_state_dict(save_load(bal.state_dict()))
    assert (other.steps, other.skipped_steps) == (2, 1)
    assert torch.equal(other.last_weights, torch.ones(2))


def test_integer_dict_keys_are_matched_to_counted_tasks() -> None:
    """Counted tasks are named "0", "1", ...: a dict with integer keys is matched by name."""
    bal = tb.StaticWeighting(2, weights=[1.0, 10.0])
    total = bal({1: torch.tensor(2.0), 0: torch.tensor(1.0)})  # not in task order
    assert total.item() == 1.0 * 1.0 + 10.0 * 2.0
    with pytest.raises(tb.TaskMismatchError, match=r"missing \['1'\], unexpected \['2'\]"):
        bal({0: torch.tensor(1.0), 2: torch.tensor(2.0)})
