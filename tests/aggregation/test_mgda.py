"""MGDA / MGDA-UB: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _gradcheck import (
    adversarial_jacobians,
    brute_min_norm,
    check_engine,
    conflict_scale,
    losses_and_features,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance import registry
from taskbalance.aggregation.mgda import MGDA, MGDAUB, gradient_normalizers, mgda_weights
from taskbalance.errors import BalancerUsageError, NonPositiveLossError


def weights(rows: list[list[float]], **kw) -> np.ndarray:
    jac = torch.tensor(rows, dtype=torch.float64)
    return mgda_weights(jac @ jac.T, **kw).numpy()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1, 0], [0, 1]], [0.5, 0.5]),  # orthogonal, equal norms: the midpoint
        ([[1, 0], [2, 0]], [1.0, 0.0]),  # collinear: the shorter gradient
        ([[1, 0], [-1, 1]], [0.6, 0.4]),  # |(1-2t, t)|² is minimal at t = 2/5
        ([[2, 0], [0, 1]], [0.2, 0.8]),  # w ∝ 1/|g_i|² for orthogonal gradients
        ([[1, 0], [-1, 0]], [0.5, 0.5]),  # opposite: d = 0, Pareto-stationary
        ([[1, 0], [0, 1], [1, 1]], [0.5, 0.5, 0.0]),  # g3 = g1 + g2 lies outside the support
        ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_hand_computed(rows: list[list[float]], expected: list[float]) -> None:
    np.testing.assert_allclose(weights(rows), expected, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 3), seed=st.integers(0, 2**31 - 1))
def test_min_norm_point_against_grid_and_enumeration(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, 3)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    gram = jac @ jac.T
    w = mgda_weights(torch.from_numpy(gram)).numpy()
    steps = 300 if k == 2 else 60
    ticks = np.linspace(0, 1, steps + 1)
    grid = np.array([(a, b, 1 - a - b) for a in ticks for b in ticks if a + b <= 1 + 1e-12])
    if k == 2:
        grid = np.stack([ticks, 1 - ticks], axis=1)
    grid = np.clip(grid, 0, None)
    value = w @ gram @ w
    assert value <= np.einsum("ni,ij,nj->n", grid, gram, grid).min() + 1e-12 * np.abs(gram).max()
    assert value == pytest.approx(brute_min_norm(gram)[0], rel=1e-9, abs=1e-12 * gram.max())


@pytest.mark.parametrize("jac", adversarial_jacobians(seed=2) + adversarial_jacobians(seed=3))
def test_direction_never_conflicts(jac: np.ndarray) -> None:
    w = mgda_weights(torch.from_numpy(jac @ jac.T)).numpy()
    d = w @ jac
    assert np.isfinite(w).all() and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert (jac @ d >= -1e-8 * conflict_scale(jac, w)).all()
    # and g_i · d >= |d|² (the KKT condition of the min-norm point)
    assert (jac @ d >= d @ d - 1e-8 * conflict_scale(jac, w) - 1e-12 * (d @ d)).all()


def test_permuting_tasks_permutes_weights() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        jac = rng.normal(size=(5, 8))  # G positive definite: the weights are unique
        perm = rng.permutation(5)
        w = mgda_weights(torch.from_numpy(jac @ jac.T)).numpy()
        wp = mgda_weights(torch.from_numpy(jac[perm] @ jac[perm].T)).numpy()
        np.testing.assert_allclose(wp, w[perm], atol=1e-10)


@pytest.mark.parametrize(
    "rows",
    [[[3.0, 4.0]], [[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [-1.0, -2.0]], [[0.0, 0.0], [1.0, 1.0]]],
)
def test_degenerate_inputs_give_finite_weights(rows: list[list[float]]) -> None:
    w = weights(rows)
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    d = w @ np.array(rows)
    assert np.linalg.norm(d) <= min(np.linalg.norm(r) for r in rows) + 1e-12


def test_normalizations() -> None:
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    gram = jac @ jac.T
    losses = torch.tensor([4.0, 0.5], dtype=torch.float64)
    # l2: unit gradients (1,0), (0,1) -> (1/2, 1/2), applied to the raw losses
    np.testing.assert_allclose(mgda_weights(gram, losses, "l2").numpy(), [0.5, 0.5])
    # loss: g/L = (0.5, 0), (0, 2) -> w ∝ (1/0.25, 1/4) = (4, 0.25)
    np.testing.assert_allclose(mgda_weights(gram, losses, "loss").numpy(), [16 / 17, 1 / 17])
    # loss+: g/(L |g|) = (1/4, 0), (0, 2) -> w ∝ (16, 1/4)
    np.testing.assert_allclose(mgda_weights(gram, losses, "loss+").numpy(), [64 / 65, 1 / 65])
    np.testing.assert_allclose(
        gradient_normalizers(gram.numpy(), losses.numpy(), "loss+"), [8.0, 0.5], atol=1e-15
    )
    with pytest.raises(NonPositiveLossError, match="'b'"):
        gradient_normalizers(gram.numpy(), np.array([1.0, 0.0]), "loss", ["a", "b"])
    with pytest.raises(NonPositiveLossError, match="'1'"):
        MGDA(2, normalization="loss").weights_from_gramian(gram, torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError):
        MGDA(2, normalization="l1")  # type: ignore[arg-type]


def test_l2_normalization_of_short_and_zero_gradients() -> None:
    """``"l2"`` divides by the gradient norm also below 1, and a zero norm counts as 1."""
    short = torch.tensor([[0.5, 0.0], [0.0, 0.25]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    # unit gradients (1,0), (0,1) -> the midpoint; unnormalised it would be w ∝ (4, 16)
    np.testing.assert_allclose(mgda_weights(short @ short.T, ones, "l2").numpy(), [0.5, 0.5])
    zero = np.array([[0.0, 0.0], [0.0, 9.0]])  # the Gramian of g1 = 0, g2 = (0, 3)
    np.testing.assert_allclose(gradient_normalizers(zero, np.ones(2), "l2"), [1.0, 3.0])
    # g1 / 1 = 0 is the min-norm point: all weight on the task already at a stationary point
    w = mgda_weights(torch.from_numpy(zero), torch.ones(2, dtype=torch.float64), "l2")
    np.testing.assert_allclose(w.numpy(), [1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("normalization", ["none", "l2", "loss+"])
def test_end_to_end_through_the_engine(features: bool, normalization: str) -> None:
    bal = MGDA(3, normalization=normalization)  # type: ignore[arg-type]
    losses = torch.stack([loss.detach() for loss in losses_and_features(3, 0)[2]]).double()
    w = check_engine(bal, lambda g: mgda_weights(g, losses, normalization), features=features)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert bal.mode == ("features" if features else "exact")


def test_mgda_ub_needs_features() -> None:
    with pytest.raises(BalancerUsageError, match="features"):
        check_engine(MGDAUB(3), lambda g: mgda_weights(g), features=False)
    w = check_engine(MGDAUB(3), lambda g: mgda_weights(g), features=True)
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-6)


def test_registered() -> None:
    assert registry.get("mgda") is MGDA
    assert registry.get("mgda_ub") is MGDAUB
    assert registry.get("MGDA-UB") is MGDAUB
    assert isinstance(registry.make("mgda", 2, normalization="l2"), MGDA)
