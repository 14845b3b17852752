"""ReLoBRaLo (Bischof & Kraus 2021): relative loss balancing with random lookback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, const, save_load, train


def balance(now: list[float], then: list[float], temperature: float) -> list[float]:
    """K softmax_i(L_i(t) / (T L_i(t'))), in plain Python."""
    exps = [math.exp(a / (temperature * b)) for a, b in zip(now, then)]
    return [len(now) * e / sum(exps) for e in exps]


def mix(*terms: tuple[float, list[float]]) -> list[float]:
    """sum_j c_j v_j for (c_j, v_j) pairs."""
    return [sum(c * v[i] for c, v in terms) for i in range(len(terms[0][1]))]


def relobralo(tasks: object = 2, **kw: object) -> tb.Balancer:
    return tb.make("relobralo", tasks, **kw)


def step(bal: tb.Balancer, *values: float) -> list[float]:
    bal(const(*values))
    return bal.last_weights.tolist()


def test_defaults() -> None:
    bal = relobralo()
    assert (bal.alpha, bal.expected_rho, bal.temperature) == (0.999, 0.99, 0.1)
    assert bal.start == "paper"


def test_hand_computed_without_lookback() -> None:
    """E[rho] = 1: rho is always 1, lambda(t) = a lambda(t-1) + (1-a) bal(t-1 -> t)."""
    bal = relobralo(["a", "b"], alpha=0.5, expected_rho=1.0, temperature=1.0)
    assert step(bal, 1.0, 1.0) == [1.0, 1.0]  # no history: equal weights
    w1 = mix((0.5, [1.0, 1.0]), (0.5, balance([2.0, 1.0], [1.0, 1.0], 1.0)))
    assert step(bal, 2.0, 1.0) == pytest.approx(w1, rel=1e-6)
    assert w1[0] > 1.0 > w1[1]  # the loss that grew relative to its past gets more weight
    w2 = mix((0.5, w1), (0.5, balance([1.0, 2.0], [2.0, 1.0], 1.0)))
    assert step(bal, 1.0, 2.0) == pytest.approx(w2, rel=1e-6)
    total = bal(const(3.0, 1.0))
    w3 = mix((0.5, w2), (0.5, balance([3.0, 1.0], [1.0, 2.0], 1.0)))
    assert total.item() == pytest.approx(3.0 * w3[0] + 1.0 * w3[1], rel=1e-6)


def test_hand_computed_always_looking_back() -> None:
    """E[rho] = 0: rho is always 0, lambda(t) = a bal(0 -> t) + (1-a) bal(t-1 -> t)."""
    bal = relobralo(3, alpha=0.75, expected_rho=0.0, temperature=0.5)
    first = [4.0, 1.0, 2.0]
    assert step(bal, *first) == [1.0, 1.0, 1.0]
    second = [2.0, 1.0, 3.0]
    expected = mix((0.75, balance(second, first, 0.5)), (0.25, balance(second, first, 0.5)))
    assert step(bal, *second) == pytest.approx(expected, rel=1e-6)
    third = [1.0, 0.5, 2.0]
    expected = mix((0.75, balance(third, first, 0.5)), (0.25, balance(third, second, 0.5)))
    assert step(bal, *third) == pytest.approx(expected, rel=1e-6)
    # the temperature divides the ratio: at T = 1 the same losses give other weights
    other = relobralo(3, alpha=0.75, expected_rho=0.0, temperature=1.0)
    for values in (first, second, third):
        other(const(*values))
    assert other.last_weights.tolist() != pytest.approx(expected, rel=1e-3)


def test_the_draws_come_from_the_seeded_generator() -> None:
    """rho(t) = [u(t) < E[rho]], u(t) ~ U[0, 1) drawn from the balancer's own generator from
    the second step on; lookbacks counts the steps with rho = 0."""
    alpha, p, temp = 0.6, 0.5, 2.0
    bal = relobralo(2, alpha=alpha, expected_rho=p, temperature=temp, seed=5)
    gen = torch.Generator().manual_seed(5)
    losses = [[1.0, 2.0], [0.8, 1.5], [0.9, 1.0], [0.5, 1.2], [0.4, 0.6], [0.45, 0.5], [0.3, 0.2]]
    weights, lookbacks = [1.0, 1.0], 0
    assert step(bal, *losses[0]) == weights
    for t in range(1, len(losses)):
        rho = 1.0 if float(torch.rand((), generator=gen, dtype=torch.float64)) < p else 0.0
        lookbacks += rho == 0.0
        history = mix((rho, weights), (1 - rho, balance(losses[t], losses[0], temp)))
        weights = mix((alpha, history), (1 - alpha, balance(losses[t], losses[t - 1], temp)))
        assert step(bal, *losses[t]) == pytest.approx(weights, rel=1e-6)
    assert bal.lookbacks == lookbacks
    assert 0 < lookbacks < len(losses) - 1  # both branches were taken


def test_lookback_frequency_is_one_minus_the_expected_rho() -> None:
    bal = relobralo(2, expected_rho=0.7, seed=1, record=False)
    for _ in range(2001):
        bal(torch.ones(2))
    assert bal.lookbacks / 2000 == pytest.approx(0.3, abs=0.03)


def test_independent_of_the_global_rng() -> None:
    def run() -> list[float]:
        bal = relobralo(2, alpha=0.5, expected_rho=0.5, seed=3)
        for values in [(1.0, 2.0), (0.5, 1.0), (0.4, 1.5), (0.3, 0.2)]:
            bal(const(*values))
        return bal.last_weights.tolist()

    torch.manual_seed(0)
    a = run()
    after = torch.rand(1)
    torch.manual_seed(99)
    assert run() == a
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # ReLoBRaLo did not consume the global stream


def test_code_start_follows_the_authors_reference_code() -> None:
    """start="code": the second step takes alpha = 0 and rho = 1 (no draw), so lambda(1) =
    bal(0 -> 1); later steps as the paper."""
    code = relobralo(2, alpha=0.5, expected_rho=1.0, temperature=1.0, start="code")
    paper = relobralo(2, alpha=0.5, expected_rho=1.0, temperature=1.0)
    for bal in (code, paper):
        bal(const(1.0, 1.0))
        bal(const(2.0, 1.0))
    w1 = balance([2.0, 1.0], [1.0, 1.0], 1.0)
    assert code.last_weights.tolist() == pytest.approx(w1, rel=1e-6)
    assert paper.last_weights.tolist() == pytest.approx(mix((0.5, [1, 1]), (0.5, w1)), rel=1e-6)
    w2 = mix((0.5, w1), (0.5, balance([1.0, 3.0], [2.0, 1.0], 1.0)))
    assert step(code, 1.0, 3.0) == pytest.approx(w2, rel=1e-6)


def test_code_start_draws_nothing_at_the_second_step() -> None:
    code = relobralo(2, alpha=0.5, expected_rho=0.5, seed=2, start="code")
    reference = relobralo(2, alpha=0.5, expected_rho=0.5, seed=2)
    code(const(1.0, 1.0))
    code(const(2.0, 1.0))
    reference(const(1.0, 1.0))  # the paper's start draws once per step from the second on
    assert torch.equal(code.generator.get_state(), reference.generator.get_state())


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=12),
    steps=st.integers(min_value=1, max_value=6),
    alpha=st.floats(min_value=0.0, max_value=1.0),
    p=st.floats(min_value=0.0, max_value=1.0),
    temperature=st.floats(min_value=0.01, max_value=10.0),
    seed=st.integers(min_value=0, max_value=2**31),
    data=st.data(),
)
def test_weights_are_positive_and_sum_to_k(
    k: int, steps: int, alpha: float, p: float, temperature: float, seed: int, data: st.DataObject
) -> None:
    """The defining property: a convex mixture of K softmax(...) terms sums to K
    (losses from 1e-6 to 1e6)."""
    bal = relobralo(k, alpha=alpha, expected_rho=p, temperature=temperature, seed=seed)
    exponents = st.lists(st.floats(min_value=-6.0, max_value=6.0), min_size=k, max_size=k)
    for _ in range(steps):
        row = data.draw(exponents)
        bal(torch.tensor([10.0**u for u in row], dtype=torch.float64))
        weights = bal.last_weights
        assert weights.shape == (k,)
        assert bool((weights >= 0).all())
        assert weights.sum().item() == pytest.approx(k, rel=1e-12)


def test_one_task_has_weight_one() -> None:
    bal = relobralo(1, alpha=0.3, expected_rho=0.5)
    for value in (3.0, 1.0, 2.0, 0.1):
        assert step(bal, value) == [1.0]


def test_scale_free_the_losses_enter_only_as_ratios() -> None:
    small = relobralo(2, alpha=0.5, expected_rho=0.5, seed=4)
    large = relobralo(2, alpha=0.5, expected_rho=0.5, seed=4)
    for values in [(1.0, 2.0), (0.5, 1.0), (0.4, 1.5), (0.3, 0.2)]:
        small(const(*values))
        large(const(values[0] * 1e6, values[1] * 1e-3))
        torch.testing.assert_close(small.last_weights, large.last_weights, rtol=1e-5, atol=0)
    assert small.last_weights.tolist() != [1.0, 1.0]


@pytest.mark.parametrize("bad", [0.0, -1.0])
@pytest.mark.parametrize("at_step", [0, 2])
def test_non_positive_loss_raises_naming_the_task(bad: float, at_step: int) -> None:
    bal = relobralo(["seg", "depth"], alpha=0.5, expected_rho=0.5, seed=1)
    twin = relobralo(["seg", "depth"], alpha=0.5, expected_rho=0.5, seed=1)
    good = [(1.0, 2.0), (0.5, 1.0), (0.4, 1.5), (0.3, 0.2)]
    for values in good[:at_step]:
        bal(const(*values))
        twin(const(*values))
    with pytest.raises(tb.NonPositiveLossError, match="task 'depth'") as info:
        bal(const(1.0, bad))
    assert "ReLoBRaLo" in str(info.value) and info.value.value == bad
    # the refused step left no trace (no draw consumed, no loss stored)
    for values in good[at_step:]:
        bal(const(*values))
        twin(const(*values))
        assert torch.equal(bal.last_weights, twin.last_weights)
    assert bal.steps == twin.steps


def test_nonfinite_loss_raises_naming_the_task() -> None:
    bal = relobralo(["seg", "depth"])
    bal(const(1.0, 1.0))
    with pytest.raises(tb.NonFiniteLossError, match="'seg'"):
        bal(const(float("inf"), 1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": float("nan")}, r"alpha must be in \[0, 1\]"),
        ({"expected_rho": -0.1}, r"expected_rho must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"temperature": float("inf")}, "temperature must be positive and finite"),
        ({"start": "authors"}, "start must be 'paper' or 'code'"),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        relobralo(2, **kwargs)


def test_state_round_trip_continues_the_same_draws() -> None:
    a = relobralo(3, alpha=0.5, expected_rho=0.5, seed=8)
    losses = [(1.0, 2.0, 3.0), (0.5, 2.5, 3.0), (0.4, 2.0, 3.5), (0.3, 1.0, 0.2)]
    for values in losses[:2]:
        a(const(*values))
    b = relobralo(3, alpha=0.5, expected_rho=0.5, seed=1)  # only the state can make it agree
    b.load_state_dict(save_load(a.state_dict()))
    assert b.lookbacks == a.lookbacks
    for values in losses[2:] * 5:
        a(const(*values))
        b(const(*values))
        assert torch.equal(a.last_weights, b.last_weights)
    assert a.lookbacks == b.lookbacks > 0


def test_evaluate_touches_no_state() -> None:
    bal = relobralo(2, alpha=0.5, expected_rho=0.5, seed=6)
    twin = relobralo(2, alpha=0.5, expected_rho=0.5, seed=6)
    for b in (bal, twin):
        b(const(1.0, 2.0))
        b(const(0.5, 1.0))
    bal.evaluate(const(5.0, 1.0))
    for values in [(0.4, 1.5), (0.3, 0.2), (0.2, 0.3)]:
        bal(const(*values))
        twin(const(*values))
        assert torch.equal(bal.last_weights, twin.last_weights)


def test_trains_a_model_and_records_the_weights() -> None:
    model = TinyNet(3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal = relobralo(3, alpha=0.9, expected_rho=0.5)
    weights = train(bal, model, opt, 0, 6)
    assert weights[0].tolist() == [1.0, 1.0, 1.0]
    assert all(w.sum().item() == pytest.approx(3.0, rel=1e-6) for w in weights)
    assert len({tuple(w.tolist()) for w in weights[1:]}) == 5
    assert bal.history is not None and len(bal.history) == 6


def test_the_default_seed_is_zero() -> None:
    # runs that give no seed draw the ρ sequence of seed=0 (reproducible by default)
    bal = relobralo(2)
    assert torch.equal(bal.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_a_code_start_resumed_after_its_first_step_takes_the_special_second_step() -> None:
    # start="code": the second step is λ̂(t-1→t) alone, with no draw; a balancer resumed
    # from a state saved after the first step must know it is at the second step
    kw = {"alpha": 0.5, "expected_rho": 0.5, "seed": 2, "start": "code"}
    run = relobralo(2, **kw)
    run(const(1.0, 1.0))
    resumed = relobralo(2, **kw)
    resumed.load_state_dict(save_load(run.state_dict()))
    assert step(resumed, 2.0, 1.0) == pytest.approx(step(run, 2.0, 1.0), rel=1e-12)
    assert torch.equal(resumed.generator.get_state(), run.generator.get_state())
