"""SoftAdapt (Heydari, Thompson, Mehmood 2019): w = K softmax(beta * (L(t) - L(t-1)))."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, const, save_load, train


def k_softmax(logits: list[float]) -> list[float]:
    """K exp(x_i) / sum_j exp(x_j), in plain Python."""
    exps = [math.exp(x) for x in logits]
    return [len(logits) * e / sum(exps) for e in exps]


def weights_after(bal: tb.Balancer, *steps: tuple[float, ...]) -> list[list[float]]:
    seen = []
    for values in steps:
        bal(const(*values))
        seen.append(bal.last_weights.tolist())
    return seen


def test_defaults_are_the_plain_variant_with_beta_one_tenth() -> None:
    bal = tb.make("softadapt", 2)
    assert (bal.beta, bal.variant) == (0.1, "plain")
    first, second = weights_after(bal, (1.0, 2.0), (0.5, 2.5))
    assert first == [1.0, 1.0]
    assert second == pytest.approx(k_softmax([0.1 * -0.5, 0.1 * 0.5]), rel=1e-6)


def test_hand_computed_plain_over_three_steps() -> None:
    bal = tb.make("softadapt", ["a", "b"], beta=1.0)
    first, second, third = weights_after(bal, (1.0, 2.0), (0.5, 2.5), (0.4, 2.0))
    assert first == [1.0, 1.0]  # no slope yet: equal weights
    # s = (0.5 - 1, 2.5 - 2) = (-0.5, 0.5): the loss that rose gets the larger weight
    e1, e2 = math.exp(-0.5), math.exp(0.5)
    assert second == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)], rel=1e-6)
    assert second[1] > 1.0 > second[0]
    # s = (0.4 - 0.5, 2.0 - 2.5) = (-0.1, -0.5): the slope of the last step only
    assert third == pytest.approx(k_softmax([-0.1, -0.5]), rel=1e-6)
    total = bal(const(1.0, 1.0))  # s = (0.6, -1.0)
    w = k_softmax([0.6, -1.0])
    assert total.item() == pytest.approx(w[0] + w[1], rel=1e-6)


def test_hand_computed_loss_weighted() -> None:
    bal = tb.make("softadapt", 2, beta=0.5, variant="loss_weighted")
    first, second, third = weights_after(bal, (1.0, 4.0), (3.0, 2.0), (1.0, 4.0))
    assert first == [1.0, 1.0]
    # s = (2, -2); f = mean of the two losses the slope is taken over = (2, 3)
    a, b = 2 * math.exp(0.5 * 2), 3 * math.exp(0.5 * -2)
    assert second == pytest.approx([2 * a / (a + b), 2 * b / (a + b)], rel=1e-6)
    # s = (-2, 2), f = (2, 3)
    a, b = 2 * math.exp(-1.0), 3 * math.exp(1.0)
    assert third == pytest.approx([2 * a / (a + b), 2 * b / (a + b)], rel=1e-6)


def test_hand_computed_normalized() -> None:
    bal = tb.make("softadapt", 3, beta=3.0, variant="normalized")
    _, second, third = weights_after(bal, (1.0, 1.0, 1.0), (2.0, 0.5, 1.0), (2.0, 0.5, 1.0))
    # s = (1, -0.5, 0), sum |s| = 1.5: s_hat = (2/3, -1/3, 0)
    assert second == pytest.approx(k_softmax([2.0, -1.0, 0.0]), rel=1e-6)
    # no change at all: every slope 0, equal weights
    assert third == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)


def test_normalized_is_invariant_to_the_loss_scale() -> None:
    small = tb.make("softadapt", 2, beta=2.0, variant="normalized")
    large = tb.make("softadapt", 2, beta=2.0, variant="normalized")
    plain = tb.make("softadapt", 2, beta=2.0)
    for values in [(1.0, 2.0), (0.5, 2.5), (0.7, 1.0)]:
        small(const(*values))
        large(const(*(1000.0 * v for v in values)))
        plain(const(*(1000.0 * v for v in values)))
        torch.testing.assert_close(small.last_weights, large.last_weights, rtol=1e-5, atol=0)
    # the plain variant is not: slopes of +-500 put all the weight on one task
    assert plain.last_weights.tolist() == pytest.approx([2.0, 0.0], abs=1e-6)


def test_negative_beta_favours_the_task_that_improves_fastest() -> None:
    up = tb.make("softadapt", 2, beta=1.0)
    down = tb.make("softadapt", 2, beta=-1.0)
    for bal in (up, down):
        weights_after(bal, (1.0, 1.0), (0.2, 0.9))
    assert up.last_weights[1] > up.last_weights[0]
    assert down.last_weights[0] > down.last_weights[1]
    assert down.last_weights.tolist() == pytest.approx(up.last_weights.flip(0).tolist())


def test_beta_zero_is_equal_weighting() -> None:
    bal = tb.make("softadapt", 3, beta=0.0)
    for values in [(1.0, 5.0, 0.1), (9.0, 0.1, 3.0), (0.5, 0.5, 7.0)]:
        bal(const(*values))
        assert bal.last_weights.tolist() == [1.0, 1.0, 1.0]


def test_one_task_has_weight_one() -> None:
    for variant in ("plain", "loss_weighted", "normalized"):
        bal = tb.make("softadapt", 1, beta=5.0, variant=variant)
        for value in (3.0, 1.0, 2.0):
            bal(const(value))
            assert bal.last_weights.tolist() == [1.0]


def test_huge_slopes_do_not_overflow() -> None:
    bal = tb.make("softadapt", 3, beta=10.0)
    weights_after(bal, (1e-6, 1.0, 1e30), (1e30, 1.0, 1e-6))
    assert bal.last_weights.tolist() == pytest.approx([3.0, 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("variant", ["plain", "loss_weighted", "normalized"])
@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=12),
    steps=st.integers(min_value=2, max_value=5),
    beta=st.floats(min_value=-10.0, max_value=10.0),
    data=st.data(),
)
def test_weights_are_positive_and_sum_to_k(
    variant: str, k: int, steps: int, beta: float, data: st.DataObject
) -> None:
    """The defining property: a softmax over the tasks, times K (losses from 1e-6 to 1e6)."""
    bal = tb.make("softadapt", k, beta=beta, variant=variant)
    exponents = st.lists(st.floats(min_value=-6.0, max_value=6.0), min_size=k, max_size=k)
    for _ in range(steps):
        row = data.draw(exponents)
        bal(torch.tensor([10.0**u for u in row], dtype=torch.float64))
        weights = bal.last_weights
        assert weights.shape == (k,)
        assert bool((weights >= 0).all())
        assert weights.sum().item() == pytest.approx(k, rel=1e-12)


def test_plain_and_normalized_accept_zero_and_negative_losses() -> None:
    for variant in ("plain", "normalized"):
        bal = tb.make("softadapt", 2, beta=1.0, variant=variant)
        weights_after(bal, (0.0, -1.0), (-2.0, 0.0))
        assert bal.last_weights.sum().item() == pytest.approx(2.0, rel=1e-6)
        assert bal.last_weights[1] > bal.last_weights[0]


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_loss_weighted_needs_positive_losses_and_names_the_task(bad: float) -> None:
    bal = tb.make("softadapt", ["seg", "depth"], variant="loss_weighted")
    bal(const(1.0, 1.0))
    with pytest.raises(tb.NonPositiveLossError, match="task 'depth'") as info:
        bal(const(1.0, bad))
    assert "SoftAdapt" in str(info.value) and info.value.value == bad
    # the refused step left no trace: the next slope is taken from the last good losses
    bal(const(3.0, 2.0))
    a, b = 2.0 * math.exp(0.1 * 2.0), 1.5 * math.exp(0.1 * 1.0)
    assert bal.last_weights.tolist() == pytest.approx([2 * a / (a + b), 2 * b / (a + b)])
    assert bal.steps == 2


def test_nonfinite_loss_raises_naming_the_task_and_keeps_the_state() -> None:
    bal = tb.make("softadapt", ["seg", "depth"], beta=1.0)
    bal(const(1.0, 1.0))
    with pytest.raises(tb.NonFiniteLossError, match="'seg'"):
        bal(const(float("nan"), 1.0))
    bal(const(2.0, 1.0))
    assert bal.last_weights.tolist() == pytest.approx(k_softmax([1.0, 0.0]), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "weighted"}, "variant must be one of 'plain', 'loss_weighted', 'normalized'"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"beta": float("inf")}, "beta must be a finite number"),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tb.make("softadapt", 2, **kwargs)


def test_state_round_trip_continues_the_same_slopes() -> None:
    a = tb.make("softadapt", 3, beta=2.0, variant="loss_weighted")
    weights_after(a, (1.0, 2.0, 3.0), (0.5, 2.5, 3.0))
    b = tb.make("softadapt", 3, beta=2.0, variant="loss_weighted")
    b.load_state_dict(save_load(a.state_dict()))
    for values in [(0.4, 2.0, 3.5), (0.3, 1.0, 0.2)]:
        a(const(*values))
        b(const(*values))
        assert torch.equal(a.last_weights, b.last_weights)
    assert a.last_weights.tolist() != [1.0, 1.0, 1.0]


def test_a_fresh_balancer_differs_from_a_resumed_one() -> None:
    """The stored previous losses are what the resume carries (not only the step count)."""
    a = tb.make("softadapt", 2, beta=1.0)
    weights_after(a, (1.0, 2.0))
    b = tb.make("softadapt", 2, beta=1.0)
    b.load_state_dict(save_load(a.state_dict()))
    fresh = tb.make("softadapt", 2, beta=1.0)
    b(const(3.0, 1.0))
    fresh(const(3.0, 1.0))
    assert fresh.last_weights.tolist() == [1.0, 1.0]
    assert b.last_weights.tolist() == pytest.approx(k_softmax([2.0, -1.0]), rel=1e-6)


def test_evaluate_touches_no_state() -> None:
    bal = tb.make("softadapt", 2, beta=1.0)
    weights_after(bal, (1.0, 2.0))
    value = bal.evaluate(const(5.0, 1.0))
    w = k_softmax([4.0, -1.0])
    assert value.item() == pytest.approx(5.0 * w[0] + 1.0 * w[1], rel=1e-6)
    bal(const(2.0, 2.0))  # the slope is still taken from (1, 2)
    assert bal.last_weights.tolist() == pytest.approx(k_softmax([1.0, 0.0]), rel=1e-6)


def test_trains_a_model_and_records_the_weights() -> None:
    model = TinyNet(3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal = tb.make("softadapt", 3, beta=5.0)
    weights = train(bal, model, opt, 0, 6)
    assert weights[0].tolist() == [1.0, 1.0, 1.0]
    assert all(w.sum().item() == pytest.approx(3.0, rel=1e-6) for w in weights)
    assert len({tuple(w.tolist()) for w in weights[1:]}) == 5  # they move every step
    assert bal.history is not None and len(bal.history) == 6
