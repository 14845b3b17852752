"""STCH (Lin et al., ICML 2024): L = K mu log sum_i exp(pref_i log(L_i / n_i) / mu)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import const, save_load
from taskbalance.errors import BalancerUsageError, NonFiniteLossError, NonPositiveLossError

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


def step(bal: tb.Balancer, *values: float) -> tuple[float, list[float], list[float]]:
    """One call: (returned scalar, recorded weights, d scalar / d L_i by autograd)."""
    losses = const(*values, requires_grad=True)
    total = bal(losses)
    total.backward()
    return total.item(), bal.last_weights.tolist(), [loss.grad.item() for loss in losses]


def test_defaults_are_the_authors() -> None:
    bal = tb.make("stch", 3)
    assert (bal.mu, bal.warmup_periods, bal.steps_per_period) == (1.0, 5, None)
    assert bal.preference.tolist() == [1.0, 1.0, 1.0]
    assert bal.nadir is None


def test_warmup_is_the_sum_of_log_losses_and_records_the_last_period() -> None:
    bal = tb.make("stch", ["a", "b"], warmup_periods=2, steps_per_period=2)
    total, weights, grads = step(bal, 2.0, 4.0)
    assert total == pytest.approx(math.log(2.0) + math.log(4.0), rel=1e-6)
    assert weights == pytest.approx([0.5, 0.25]) and grads == pytest.approx(weights)
    step(bal, 1.0, 1.0)  # closes period 1: not recorded in the nadir
    assert bal.nadir is None
    step(bal, 1.0, 2.0)
    step(bal, 3.0, 6.0)  # closes period 2, the last of the warm-up
    assert bal.nadir.tolist() == pytest.approx([2.0, 4.0])


def test_hand_computed_k2() -> None:
    bal = tb.make("stch", 2, mu=0.5, nadir=[1.0, 2.0])
    total, weights, grads = step(bal, 2.0, 1.0)
    # log(L / n) = (log 2, -log 2); / mu: (2 log 2, -2 log 2); exp: (4, 1/4)
    s = [4.0 / 4.25, 0.25 / 4.25]
    assert total == pytest.approx(2 * 0.5 * math.log(4.25), rel=1e-6)
    assert weights == pytest.approx([2 * s[0] / 2.0, 2 * s[1] / 1.0], rel=1e-6)
    assert grads == pytest.approx(weights, rel=1e-5)


def test_end_period_closes_the_warmup() -> None:
    bal = tb.make("stch", 2, warmup_periods=1)
    step(bal, 1.0, 3.0)
    step(bal, 3.0, 5.0)
    bal.end_period()
    assert bal.nadir.tolist() == pytest.approx([2.0, 4.0])
    _, weights, _ = step(bal, 2.0, 4.0)  # at the nadir: log(L/n) = 0, equal shares
    assert weights == pytest.approx([2 * 0.5 / 2.0, 2 * 0.5 / 4.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(positive, min_size=1, max_size=6), st.floats(min_value=0.05, max_value=20))
def test_weights_on_the_log_losses_sum_to_k_and_are_the_gradient(
    values: list[float], mu: float
) -> None:
    k = len(values)
    bal = tb.make("stch", k, mu=mu, nadir=[1.0] * k)
    _, weights, grads = step(bal, *values)
    on_logs = [w * loss for w, loss in zip(weights, values)]
    assert sum(on_logs) == pytest.approx(k, rel=1e-5)
    assert grads == pytest.approx(weights, rel=1e-4, abs=1e-9)


def test_small_mu_is_tchebycheff_large_mu_is_the_weighted_sum() -> None:
    values, nadir, pref = (3.0, 1.0, 2.0), [1.0, 0.5, 1.0], [1.0, 1.0, 2.0]
    # pref rescaled to mean 1: (0.75, 0.75, 1.5); pref * log(L/n) = (0.82, 0.52, 1.04)
    sharp = tb.make("stch", 3, mu=1e-3, nadir=nadir, preference=pref)
    _, weights, _ = step(sharp, *values)
    # all on the task of largest pref * log(L/n): K * its rescaled preference, 3 * 1.5
    assert [w * v for w, v in zip(weights, values)] == pytest.approx([0, 0, 4.5], abs=1e-6)
    uniform = tb.make("stch", 3, mu=1e-3, nadir=nadir)  # log(L/n) = (1.10, 0.69, 0.69)
    _, weights, _ = step(uniform, *values)
    assert [w * v for w, v in zip(weights, values)] == pytest.approx([3, 0, 0], abs=1e-6)
    flat = tb.make("stch", 3, mu=1e6, nadir=nadir, preference=pref)
    _, weights, _ = step(flat, *values)
    assert [w * v for w, v in zip(weights, values)] == pytest.approx([0.75, 0.75, 1.5], rel=1e-5)


def test_the_worst_normalised_task_weighs_most() -> None:
    bal = tb.make("stch", 2, nadir=[10.0, 0.01])
    _, weights, _ = step(bal, 5.0, 0.02)  # task 1 is at half its nadir, task 2 at twice
    assert weights[1] * 0.02 > 1.0 > weights[0] * 5.0


def test_preference_is_rescaled_to_mean_one() -> None:
    a = tb.make("stch", 2, nadir=[1.0, 1.0], preference=[1.0, 3.0])
    b = tb.make("stch", 2, nadir=[1.0, 1.0], preference=[0.25, 0.75])
    assert a.preference.tolist() == [0.5, 1.5]
    assert step(a, 2.0, 0.5)[1] == step(b, 2.0, 0.5)[1]


def test_scaling_a_loss_and_its_nadir_changes_nothing_on_the_log_losses() -> None:
    small = tb.make("stch", 2, nadir=[1e-3, 1.0])
    large = tb.make("stch", 2, nadir=[1e3, 1.0])
    _, ws, _ = step(small, 2e-3, 0.5)
    _, wl, _ = step(large, 2e3, 0.5)
    assert ws[0] * 2e-3 == pytest.approx(wl[0] * 2e3, rel=1e-6)
    assert ws[1] == pytest.approx(wl[1], rel=1e-6)


@pytest.mark.parametrize("nadir", [None, [1.0, 1.0]], ids=["warmup", "stch"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_names_the_task_and_leaves_no_trace(
    nadir: list[float] | None, bad: float
) -> None:
    bal = tb.make("stch", ["seg", "depth"], nadir=nadir)
    step(bal, 1.0, 2.0)
    before = save_load(bal.state_dict())
    with pytest.raises(NonPositiveLossError, match="task 'depth'"):
        bal(const(1.0, bad))
    assert _same_state(bal, before)


def _same_state(bal: tb.Balancer, saved: dict) -> bool:
    now, old = bal.state_dict()["state"], saved["state"]
    return all(
        torch.equal(now[k], old[k]) if isinstance(now[k], torch.Tensor) else now[k] == old[k]
        for k in now
    )


def test_non_finite_loss_raises() -> None:
    bal = tb.make("stch", ["a", "b"], nadir=[1.0, 1.0])
    with pytest.raises(NonFiniteLossError, match="'b'"):
        bal(const(1.0, float("nan")))


@pytest.mark.parametrize(
    "kw",
    [
        {"mu": 0.0},
        {"mu": float("inf")},
        {"warmup_periods": 0},
        {"steps_per_period": 0},
        {"preference": [1.0]},
        {"preference": [1.0, -1.0]},
        {"nadir": [1.0, 0.0]},
    ],
)
def test_bad_hyperparameters_raise(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        tb.make("stch", 2, **kw)


def test_state_round_trips_in_the_warmup_and_after() -> None:
    seq = [(1.0, 2.0), (2.0, 3.0), (0.5, 1.5), (0.7, 2.5), (0.4, 1.0), (0.3, 0.9)]
    straight = tb.make("stch", 2, warmup_periods=2, steps_per_period=2)
    expected = [step(straight, *v)[1] for v in seq]
    for cut in (1, 3, 4):
        first = tb.make("stch", 2, warmup_periods=2, steps_per_period=2)
        seen = [step(first, *v)[1] for v in seq[:cut]]
        resumed = tb.make("stch", 2, warmup_periods=2, steps_per_period=2)
        resumed.load_state_dict(save_load(first.state_dict()))
        seen += [step(resumed, *v)[1] for v in seq[cut:]]
        assert seen == expected
        assert torch.equal(resumed.nadir, straight.nadir)


def test_forgotten_end_period_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskbalance.weighting.stch.FORGOTTEN_END_PERIOD_STEPS", 3)
    bal = tb.make("stch", 2)
    step(bal, 1.0, 1.0)
    step(bal, 1.0, 1.0)
    with pytest.warns(tb.TaskBalanceWarning, match="end_period"):
        step(bal, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(bal, 1.0, 1.0)


def test_end_period_inside_an_accumulated_step_raises() -> None:
    bal = tb.make("stch", 2, accumulation_steps=2)
    bal(const(1.0, 2.0, requires_grad=True))
    with pytest.raises(BalancerUsageError, match="flush"):
        bal.end_period()


def test_evaluate_touches_no_state() -> None:
    bal = tb.make("stch", 2, warmup_periods=1, steps_per_period=2)
    step(bal, 1.0, 2.0)
    value = bal.evaluate(const(1.0, 2.0))
    assert value.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert bal.nadir is None and bal.state_dict()["state"]["count"] == 1
