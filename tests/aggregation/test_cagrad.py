"""CAGrad (Liu et al., NeurIPS 2021): the best worst-task improvement in a ball around g0."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _gradcheck import adversarial_jacobians, check_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance import registry
from taskbalance.aggregation.cagrad import CAGrad, cagrad_solve, cagrad_weights

ONES = torch.ones(8, dtype=torch.float64)


def random_jacobian(seed: int, k: int, p: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))


def dual_objective(gram: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """F(w) = g_w·g0 + c ||g0|| ||g_w|| for weights w (..., K) on the simplex."""
    g0_norm = math.sqrt(max(gram.mean(), 0.0))
    gw = w @ gram
    return gw.mean(axis=-1) + c * g0_norm * np.sqrt(np.maximum((gw * w).sum(axis=-1), 0.0))


def check_cagrad(jac: np.ndarray, c: float, tol: float = 1e-8) -> tuple[np.ndarray, float]:
    """The paper's properties of d = wᵀJ; return the weights and min_i g_i·d."""
    gram = jac @ jac.T
    k = jac.shape[0]
    w = cagrad_weights(gram, c)
    d, g0 = w @ jac, jac.mean(axis=0)
    scale = float(np.mean(np.diag(gram)))
    # d lies in the ball ||d - g0|| <= c ||g0||
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9) + 1e-12 * math.sqrt(scale)
    # conflict-averse: the worst task improves at least as much as under the mean gradient
    worst = float((jac @ d).min())
    assert worst >= float((jac @ g0).min()) - tol * scale
    # strong duality: the worst improvement equals the dual optimum F(w*) up to the gap
    _, dual_w, gap = cagrad_solve(gram, c)
    assert gap <= tol and dual_w.shape == (k,) and abs(dual_w.sum() - 1) < 1e-12
    assert dual_objective(gram, dual_w, c) - worst <= 2 * tol * scale
    return w, worst


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.integers(1, 12),
    st.sampled_from([0.2, 0.4, 0.9, 2.0]),
)
def test_conflict_averse_property(seed: int, k: int, p: int, c: float) -> None:
    check_cagrad(random_jacobian(seed, k, p), c)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 6))
def test_c_zero_is_exactly_the_mean_gradient(seed: int, k: int, p: int) -> None:
    jac = random_jacobian(seed, k, p)
    np.testing.assert_array_equal(cagrad_weights(jac @ jac.T, 0.0), np.full(k, 1.0 / k))


def test_hand_computed_two_tasks() -> None:
    # g1 = (2, 0), g2 = (0, 1): g0 = (1, ½), ||g0|| = sqrt(5)/2, s = 0.4 sqrt(5)/2.
    # F(a, 1-a) = 2a + ½(1-a) + s sqrt(4a² + (1-a)²); F'(0) = 1.5 - s > 0 and F is convex,
    # so w* = (0, 1): g_w = g2, λ = s / ||g2|| = s, d = g0 + s g2 = ½ g1 + (½ + s) g2.
    jac = np.array([[2.0, 0.0], [0.0, 1.0]])
    s = 0.4 * math.sqrt(5) / 2
    np.testing.assert_allclose(cagrad_weights(jac @ jac.T, 0.4), [0.5, 0.5 + s], atol=1e-7)
    _, dual_w, _ = cagrad_solve(jac @ jac.T, 0.4)
    np.testing.assert_allclose(dual_w, [0.0, 1.0], atol=1e-7)
    # the worst task (2) improves from g2·g0 = ½ to ½ + s; task 1 keeps g1·d = 2
    _, worst = check_cagrad(jac, 0.4)
    assert worst == pytest.approx(0.5 + s, abs=1e-7)
    # symmetric case: orthonormal gradients, w* = (½, ½), λ = c, d = (1 + c) g0
    np.testing.assert_allclose(cagrad_weights(np.eye(2), 0.4), [0.7, 0.7], atol=1e-7)


def simplex_grid(k: int, n: int) -> np.ndarray:
    if k == 2:
        a = np.linspace(0.0, 1.0, n)
        return np.stack([a, 1 - a], axis=1)
    a, b = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    keep = a + b <= 1
    return np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], axis=1)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_inner_solve_matches_a_brute_force_grid(k: int, seed: int) -> None:
    jac = random_jacobian(seed, k, 3 if seed % 2 else 1 + k)
    gram = jac @ jac.T
    scale = float(np.mean(np.diag(gram)))
    grid = simplex_grid(k, 100_001 if k == 2 else 801)
    values = dual_objective(gram, grid, 0.5)
    best = float(values.min())
    _, dual_w, gap = cagrad_solve(gram, 0.5)
    ours = float(dual_objective(gram, dual_w, 0.5))
    assert ours <= best + 1e-8 * scale  # never worse than the best grid point (to the gap)
    step = 1.0 / (100_000 if k == 2 else 800)
    assert ours >= best - 4 * step * np.abs(gram).max()  # the grid is that fine
    assert gap <= 1e-8


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 7))
def test_permuting_tasks_permutes_the_weights(seed: int, k: int) -> None:
    jac = random_jacobian(seed, k, k + 2)  # independent gradients: unique weights
    perm = np.random.default_rng(seed).permutation(k)
    w = cagrad_weights(jac @ jac.T, 0.4)
    wp = cagrad_weights(jac[perm] @ jac[perm].T, 0.4)
    scale = np.linalg.norm(jac, axis=1)
    # compare the updates (the weights may differ where the gradients are dependent)
    np.testing.assert_allclose(wp @ jac[perm], w @ jac, rtol=1e-5, atol=1e-5 * scale.max())
    np.testing.assert_allclose(wp * scale[perm], (w * scale)[perm], rtol=1e-5, atol=1e-6)


def test_rescale_options() -> None:
    jac = random_jacobian(3, 3, 4)
    base = cagrad_weights(jac @ jac.T, 0.5)
    np.testing.assert_allclose(cagrad_weights(jac @ jac.T, 0.5, "1+c^2"), base / 1.25)
    np.testing.assert_allclose(cagrad_weights(jac @ jac.T, 0.5, "1+c"), base / 1.5)


@pytest.mark.parametrize(
    ("jac", "expected"),
    [
        (np.array([[2.0, -1.0]]), [1.4]),  # K = 1: d = (1 + c) g
        (np.array([[1.0, 2.0], [1.0, 2.0]]), [0.7, 0.7]),  # identical: d = (1 + c) g
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), [0.5, 0.5]),  # opposite: g0 = 0, d = 0
        (np.zeros((3, 2)), [1 / 3, 1 / 3, 1 / 3]),
        (np.array([[1.0, 2.0], [-1.0, -2.0], [1.0, -1.0]]), None),  # 0 in the hull
        (np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 1.0]]), None),  # a zero row
    ],
)
def test_degenerate_gradients(jac: np.ndarray, expected: list | None, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = cagrad_weights(jac @ jac.T, 0.4)
        check_cagrad(jac, 0.4)
    assert np.isfinite(w).all() and not caplog.records
    if expected is not None:
        np.testing.assert_allclose(w, expected, atol=1e-7)


def test_adversarial_jacobians_are_certified(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        for jac in adversarial_jacobians(1):  # collinear, opposite, zero, duplicated, 1e±6 norms
            if np.abs(jac).max() > 0:
                check_cagrad(jac, 0.4)
    assert not caplog.records


def test_non_convergence_falls_back_with_a_warning(caplog) -> None:
    jac = random_jacobian(7, 6, 3)
    gram = jac @ jac.T
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        boost, _, gap = cagrad_solve(gram, 0.4, max_iter=1)
    assert gap > 1e-8 and "duality gap" in caplog.text
    d = (1 / 6 + boost) @ jac
    assert np.isfinite(d).all()
    assert (jac @ d).min() >= (jac @ jac.mean(axis=0)).min() - 1e-12 * np.abs(gram).max()
    nan = gram.copy()
    nan[0, 1] = np.nan  # a non-finite Gramian: uniform weights, the engine raises on J
    np.testing.assert_array_equal(cagrad_weights(nan, 0.4), np.full(6, 1 / 6))


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("rescale", ["none", "1+c^2"])
def test_end_to_end_through_the_engine(features: bool, rescale: str) -> None:
    bal = CAGrad(3, c=0.5, rescale=rescale)

    def expected(gram: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(cagrad_weights(gram.numpy(), 0.5, rescale))

    check_engine(bal, expected, features=features)


def test_c_zero_through_the_engine_is_the_mean_gradient() -> None:
    check_engine(
        CAGrad(3, c=0.0), lambda g: torch.full((3,), 1 / 3, dtype=torch.float64), features=False
    )


def test_registered_and_validated() -> None:
    assert registry.get("cagrad") is CAGrad
    bal = registry.make("cagrad", 2)
    assert bal.c == 0.4 and bal.rescale == "none"
    assert torch.equal(
        bal.weights_from_gramian(torch.eye(2, dtype=torch.float64), ONES[:2]),
        torch.from_numpy(cagrad_weights(np.eye(2), 0.4)),
    )
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="c must"):
            CAGrad(2, c=bad)
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(2, rescale="yes")
