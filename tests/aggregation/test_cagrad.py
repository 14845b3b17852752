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

from conftest import save_load
from taskbalance import registry
from taskbalance.aggregation import cagrad
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


def test_hand_computed_two_tasks_interior() -> None:
    # g1 = (2, 0), g2 = (0, 1), c = 2: s = c ||g0|| = sqrt(5) > F'(0) = 1.5, so both weights
    # are positive. With x = 5a - 1 for w = (a, 1-a): ||g_w||² = (x² + 4) / 5 and F'(a) = 0
    # reads 5x / sqrt(x² + 4) = -1.5, i.e. x = -6/sqrt(91); then ||g_w||² = 80/91,
    # λ = s / ||g_w|| = sqrt(91)/4 and d = (1/2 + λa) g1 + (1/2 + λ(1-a)) g2
    # = ((r + 4)/20) g1 + ((r + 4)/5) g2 with r = sqrt(91): g1·d = g2·d = (r + 4)/5 and
    # ||d - g0||² = ((r - 6)² + (2r + 3)²)/100 = 5 = s².
    jac = np.array([[2.0, 0.0], [0.0, 1.0]])
    r = math.sqrt(91)
    boost, dual_w, gap = cagrad_solve(jac @ jac.T, 2.0)
    np.testing.assert_allclose(dual_w, [(1 - 6 / r) / 5, (4 + 6 / r) / 5], rtol=1e-12)
    np.testing.assert_allclose(0.5 + boost, [(r + 4) / 20, (r + 4) / 5], rtol=1e-12)
    assert gap <= 1e-14
    _, worst = check_cagrad(jac, 2.0)
    assert worst == pytest.approx((r + 4) / 5, rel=1e-12)


def structured_jacobian(seed: int, k: int, p: int = 200) -> np.ndarray:
    """Gradients that share a component, with norms over two decades and a few conflicting
    tasks: the optimum has a proper subset of the tasks as its support."""
    rng = np.random.default_rng(seed)
    jac = rng.uniform(0, 1.5, size=(k, 1)) * rng.normal(size=(1, p)) + rng.normal(size=(k, p))
    jac[rng.random(k) < 0.2] *= -0.5
    return jac * 10.0 ** rng.uniform(-1, 1, size=(k, 1))


def kkt_residuals(gram: np.ndarray, w: np.ndarray, c: float) -> tuple[float, float]:
    """``∂F/∂w = (g_i·g0 + λ g_i·g_w)_i``, ``λ = s / ||g_w||`` (units of the mean ||g_i||²)
    must be equal on the support of w and larger off it: returns (its spread on the support,
    the largest shortfall off the support below the support's level)."""
    a = gram / np.mean(np.diag(gram))
    b = a.mean(axis=1)
    s = c * math.sqrt(b.mean())
    norm = math.sqrt(w @ a @ w)
    grad = b + (s / norm) * (a @ w)
    on = w > 0
    level = grad[on].mean()
    shortfall = max(0.0, level - grad[~on].min()) if (~on).any() else 0.0
    return float(np.ptp(grad[on])), float(shortfall)


@pytest.mark.parametrize("k", [2, 10, 40])
@pytest.mark.parametrize("kind", ["random", "structured", "few_dims"])
def test_kkt_conditions_on_random_gramians(k: int, kind: str, monkeypatch) -> None:
    # every one of these is solved by the active-set pass: the interior point must not run
    def no_interior_point(*args, **kw):
        raise AssertionError("the active-set pass did not certify its answer")

    monkeypatch.setattr(cagrad, "interior_point", no_interior_point)
    tol = 1e-12  # KKT tolerance, relative to the mean ||g_i||² (the solver stops at 1e-8)
    for seed in range(10):
        if kind == "random":
            jac = random_jacobian(seed, k, 1000)
        elif kind == "structured":
            jac = structured_jacobian(seed, k)
        else:  # P = K + 2: the gradients are independent but far from orthogonal
            jac = np.random.default_rng(seed).normal(size=(k, k + 2))
        gram = jac @ jac.T
        for c in (0.4, 2.0):
            boost, w, gap = cagrad_solve(gram, c)
            assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-14)
            spread, shortfall = kkt_residuals(gram, w, c)
            assert spread <= tol and shortfall <= tol and gap <= tol
            # the update is d = g0 + λ g_w with λ = s / ||g_w||: on the sphere of radius s
            g0 = jac.mean(axis=0)
            d = (1.0 / k + boost) @ jac
            assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-9)
            np.testing.assert_allclose(boost, boost.sum() * w, rtol=1e-12, atol=1e-300)


def test_duplicated_tasks_share_their_weight(monkeypatch) -> None:
    # a singular bordered system (a task twice): least squares, still no interior point
    monkeypatch.setattr(cagrad, "interior_point", lambda *args, **kw: pytest.fail("used"))
    base = random_jacobian(4, 4, 9)
    jac = base[[0, 1, 2, 3, 0, 1]]
    for c in (0.4, 2.0):
        _, w, _ = cagrad_solve(jac @ jac.T, c)
        np.testing.assert_allclose(w[[4, 5]], w[[0, 1]], rtol=1e-9, atol=1e-12)
        check_cagrad(jac, c)


def test_warm_start_gives_the_same_update_from_any_start() -> None:
    rng = np.random.default_rng(0)
    for seed in range(20):
        k = int(rng.integers(2, 12))
        jac = structured_jacobian(seed, k, 50)
        gram = jac @ jac.T
        boost, w, _ = cagrad_solve(gram, 0.4)
        for start in (np.ones(k, bool), np.eye(k, dtype=bool)[0], rng.random(k) < 0.5, w > 0):
            boost_s, w_s, gap = cagrad_solve(gram, 0.4, start=start)
            assert gap <= 1e-8
            if (w_s > 0).tolist() == (w > 0).tolist():  # same support: the same closed form
                np.testing.assert_array_equal(boost_s, boost)
            np.testing.assert_allclose(
                (1 / k + boost_s) @ jac, (1 / k + boost) @ jac, rtol=1e-7, atol=1e-7
            )


def test_the_support_is_state_and_warm_starts_the_next_step() -> None:
    k = 6
    bal, cold = CAGrad(k), CAGrad(k)
    losses = torch.ones(k, dtype=torch.float64)
    jac = torch.from_numpy(structured_jacobian(3, k, 40))
    for step in range(5):  # nearby Gramians, as in training
        noisy = jac + 0.05 * step * torch.from_numpy(structured_jacobian(10 + step, k, 40))
        gram = noisy @ noisy.T
        warm_w = bal.weights_from_gramian(gram, losses)
        cold.support = None
        cold_w = cold.weights_from_gramian(gram, losses)
        torch.testing.assert_close(warm_w, cold_w, rtol=1e-9, atol=1e-12)
        assert bal.support is not None and bal.support.dtype == torch.bool
        assert bal.support.tolist() == (warm_w > 1 / k).tolist()  # w_i > 0 <=> boosted
    state = save_load(bal.state_dict())
    again = CAGrad(k)
    again.load_state_dict(state)
    assert torch.equal(again.support, bal.support)
    fresh = CAGrad(k)
    fresh.load_state_dict({**state, "state": {}})  # a state saved before the support was kept
    assert fresh.support is None


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


def test_the_interior_point_alone_is_certified(monkeypatch, caplog) -> None:
    # the fallback (0 in the hull at the optimum, dependent gradients, a cycle) on its own
    monkeypatch.setattr(cagrad, "active_set", lambda *args, **kw: None)
    rng = np.random.default_rng(1)
    jacobians = [random_jacobian(seed, int(rng.integers(1, 9)), 5) for seed in range(20)]
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        for jac in jacobians + [j for j in adversarial_jacobians(2) if np.abs(j).max() > 0]:
            check_cagrad(jac, 0.4)
    assert not caplog.records


def test_non_convergence_falls_back_with_a_warning(caplog) -> None:
    jac = random_jacobian(7, 6, 3)
    gram = jac @ jac.T
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        # max_iter caps both passes: one active-set step (from all six tasks, whose affine
        # hull holds 0 as P = 3) cannot finish, nor can one interior-point iteration
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
