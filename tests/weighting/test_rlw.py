"""Random Loss Weighting (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import const, save_load


def draw(bal: tb.RLW, steps: int) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        bal(torch.ones(bal.num_tasks))
        out.append(bal.last_weights.clone())
    return out


def test_weights_are_softmax_of_standard_normal_from_the_seeded_generator() -> None:
    bal = tb.RLW(3, seed=11)
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        losses = const(1.0, 2.0, 3.0)
        total = bal(losses)
        z = torch.randn(3, generator=gen, dtype=torch.float64)
        e = torch.exp(z - z.max())
        expected = (e / e.sum()).float()
        torch.testing.assert_close(bal.last_weights, expected, rtol=1e-6, atol=1e-7)
        assert total.item() == pytest.approx(
            float(expected[0] + 2 * expected[1] + 3 * expected[2]), rel=1e-6
        )


def test_weights_differ_step_to_step() -> None:
    weights = draw(tb.RLW(4), 20)
    for a, b in itertools.pairwise(weights):
        assert not torch.equal(a, b)


def test_same_seed_same_sequence() -> None:
    a = draw(tb.RLW(["x", "y", "z"], seed=3), 10)
    b = draw(tb.RLW(["x", "y", "z"], seed=3), 10)
    c = draw(tb.RLW(["x", "y", "z"], seed=4), 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_independent_of_the_global_rng() -> None:
    torch.manual_seed(0)
    a = draw(tb.RLW(3, seed=5), 5)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = draw(tb.RLW(3, seed=5), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_a)  # RLW did not consume the global stream


def test_weights_are_symmetric_on_average() -> None:
    weights = torch.stack(draw(tb.RLW(3, seed=0), 3000))
    mean = weights.mean(0)
    assert mean.tolist() == pytest.approx([1 / 3] * 3, abs=0.02)
    assert weights.std(0).min() > 0.05


def test_generator_state_round_trip() -> None:
    a = tb.RLW(3, seed=9)
    draw(a, 3)
    b = tb.RLW(3, seed=1)  # a different seed: only the loaded state can make it agree
    b.load_state_dict(save_load(a.state_dict()))
    for x, y in zip(draw(a, 5), draw(b, 5)):
        assert torch.equal(x, y)


def test_weights_follow_the_loss_dtype() -> None:
    bal = tb.RLW(2)
    bal(torch.ones(2, dtype=torch.float64))
    assert bal.last_weights.dtype == torch.float64
    bal(const(1.0, 1.0))
    assert bal.last_weights.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(k=st.integers(min_value=1, max_value=16), seed=st.integers(min_value=0, max_value=2**31))
def test_weights_are_a_distribution(k: int, seed: int) -> None:
    bal = tb.RLW(k, seed=seed)
    for _ in range(3):
        bal(torch.ones(k, dtype=torch.float64))
        weights = bal.last_weights
        assert weights.shape == (k,)
        assert bool((weights >= 0).all())
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    if k == 1:
        assert bal.last_weights.item() == 1.0


def test_the_default_seed_is_zero() -> None:
    """RLW(k) reproduces the same draws run after run: those of seed=0."""
    torch.testing.assert_close(draw(tb.RLW(3), 5), draw(tb.RLW(3, seed=0), 5), rtol=0, atol=0)
    assert not torch.equal(draw(tb.RLW(3), 1)[0], draw(tb.RLW(3, seed=1), 1)[0])
