"""The exact QP solvers of taskbalance.aggregation._qp against brute force and KKT."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _gradcheck import adversarial_jacobians, brute_box, brute_min_norm, conflict_scale
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance.aggregation import _dual_cone, _qp
from taskbalance.aggregation._dual_cone import project_dual_cone
from taskbalance.aggregation._qp import min_norm_weights
from taskbalance.aggregation._simplex import project_simplex
from taskbalance.errors import SolverError

ADVERSARIAL = adversarial_jacobians(seed=1)


def objective_scale(jac: np.ndarray, w: np.ndarray) -> float:
    n = np.linalg.norm(jac, axis=1)
    return float((n @ np.abs(w)) ** 2 + jac.shape[0] * 1e-15 * n.max() ** 2)


def jacobians(max_k: int = 5):
    """Hypothesis strategy: a (K, P) Jacobian with rows of very different scales."""
    return st.tuples(
        st.integers(2, max_k), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans()
    ).map(_jacobian)


def _jacobian(args: tuple[int, int, int, bool]) -> np.ndarray:
    k, p, seed, scaled = args
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p))
    return jac * 10.0 ** rng.uniform(-3, 3, size=(k, 1)) if scaled else jac


def assert_min_norm_kkt(jac: np.ndarray, w: np.ndarray) -> None:
    gram = jac @ jac.T
    assert np.isfinite(w).all() and (w >= 0).all()
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    gw = gram @ w
    lam = w @ gw
    tol = 1e-7 * (conflict_scale(jac, w) + objective_scale(jac, w))
    assert (gw >= lam - tol).all()  # every task at least as aligned as the point itself
    assert (np.abs(gw[w > 0] - lam) <= tol[w > 0]).all()  # equality on the support


# ------------------------------------------------------------------ min-norm point
@pytest.mark.parametrize("pdas", [True, False])
@settings(max_examples=60, deadline=None)
@given(jac=jacobians())
def test_min_norm_matches_support_enumeration(jac: np.ndarray, pdas: bool) -> None:
    gram = jac @ jac.T
    w = min_norm_weights(gram, pdas=pdas)
    best, wb = brute_min_norm(gram)
    assert w @ gram @ w <= best + 1e-9 * (objective_scale(jac, w) + objective_scale(jac, wb))
    assert_min_norm_kkt(jac, w)


@pytest.mark.parametrize("k", [2, 3])
def test_min_norm_beats_a_dense_simplex_grid(k: int) -> None:
    rng = np.random.default_rng(k)
    steps = 200 if k == 2 else 60
    grid = np.array(
        [
            (i / steps, j / steps, 1 - (i + j) / steps)
            for i in range(steps + 1)
            for j in range(steps + 1 - i)
        ]
    )
    if k == 2:
        grid = np.array([(i / steps, 1 - i / steps) for i in range(steps + 1)])
    for _ in range(20):
        jac = rng.normal(size=(k, 3))
        gram = jac @ jac.T
        w = min_norm_weights(gram)
        values = np.einsum("ni,ij,nj->n", grid, gram, grid)
        assert w @ gram @ w <= values.min() + 1e-12
        # and the grid point nearest to w is nearly as good (w is not just a lucky vertex)
        near = grid[np.argmin(np.abs(grid - w).sum(axis=1))]
        assert near @ gram @ near - w @ gram @ w <= 4 * np.abs(gram).max() / steps


@pytest.mark.parametrize("index", range(len(ADVERSARIAL)))
def test_min_norm_adversarial(index: int) -> None:
    jac = ADVERSARIAL[index]
    gram = jac @ jac.T
    for pdas in (True, False):
        w = min_norm_weights(gram, pdas=pdas)
        best, wb = brute_min_norm(gram)
        assert w @ gram @ w <= best + 1e-9 * (objective_scale(jac, w) + objective_scale(jac, wb))
        assert (gram @ w >= -1e-8 * conflict_scale(jac, w)).all()


def test_min_norm_hand_cases() -> None:
    # g1 = (1, 0), g2 = (0, 1): the midpoint
    np.testing.assert_allclose(min_norm_weights(np.eye(2)), [0.5, 0.5])
    # g1 = (1, 0), g2 = (2, 0): g1 itself is the shortest point of the segment
    np.testing.assert_allclose(min_norm_weights(np.array([[1.0, 2.0], [2.0, 4.0]])), [1, 0])
    # g1 = (1, 0), g2 = (-1, 1): |(1-2t, t)|² is minimal at t = 2/5
    np.testing.assert_allclose(
        min_norm_weights(np.array([[1.0, -1.0], [-1.0, 2.0]])), [0.6, 0.4], atol=1e-12
    )


def test_min_norm_zero_gradient_and_single_task() -> None:
    gram = np.array([[4.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(min_norm_weights(gram), [0.0, 1.0])
    np.testing.assert_array_equal(min_norm_weights(np.array([[3.0]])), [1.0])
    np.testing.assert_array_equal(min_norm_weights(np.zeros((1, 1))), [1.0])


def test_min_norm_fallback_is_logged_and_close(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(6, 8))
    gram = jac @ jac.T
    best, _ = brute_min_norm(gram)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = min_norm_weights(gram, pdas=False, max_iter=1)
    assert "min-norm solver" in caplog.text
    assert np.isfinite(w).all() and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w @ gram @ w <= best * (1 + 1e-6) + 1e-12


def test_non_finite_gramian_raises() -> None:
    with pytest.raises(SolverError):
        min_norm_weights(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(SolverError):
        project_dual_cone(np.array([[np.inf, 0.0], [0.0, 1.0]]), np.eye(2))


# ------------------------------------------------------------------ dual-cone projection
def assert_box_kkt(jac: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    gram = jac @ jac.T
    assert np.isfinite(v).all()
    assert (v >= u - 1e-15 * np.abs(u)).all()
    tol = 1e-7 * conflict_scale(jac, v)
    gv = gram @ v
    assert (gv >= -tol).all()  # Jᵀv lies in the dual cone
    assert (np.abs(gv[v > u]) <= tol[v > u]).all()  # complementary slackness


@pytest.mark.parametrize("pdas", [True, False])
@settings(max_examples=40, deadline=None)
@given(jac=jacobians())
def test_dual_cone_matches_support_enumeration(jac: np.ndarray, pdas: bool) -> None:
    gram = jac @ jac.T
    k = gram.shape[0]
    v = project_dual_cone(gram, np.eye(k), pdas=pdas)
    for i in range(k):
        best, vb = brute_box(gram, np.eye(k)[i])
        tol = 1e-9 * (objective_scale(jac, v[i]) + objective_scale(jac, vb))
        assert v[i] @ gram @ v[i] <= best + tol
        assert_box_kkt(jac, np.eye(k)[i], v[i])


def pgd_box(gram: np.ndarray, u: np.ndarray, steps: int = 20000) -> np.ndarray:
    """Independent slow reference: projected gradient descent on min vᵀGv, v >= u."""
    lip = np.linalg.eigvalsh(gram)[-1]
    v = u.copy()
    for _ in range(steps):
        v = np.maximum(v - v @ gram / lip, u)  # rows of u are independent problems
    return v


def test_dual_cone_matches_projected_gradient_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        jac = rng.normal(size=(7, 9))  # G positive definite, so the projection is unique
        gram = jac @ jac.T
        u = rng.uniform(-1, 1, size=(3, 7))
        np.testing.assert_allclose(project_dual_cone(gram, u), pgd_box(gram, u), atol=1e-6)


@pytest.mark.parametrize("index", range(len(ADVERSARIAL)))
def test_dual_cone_adversarial(index: int) -> None:
    jac = ADVERSARIAL[index]
    gram = jac @ jac.T
    k = gram.shape[0]
    for pdas in (True, False):
        v = project_dual_cone(gram, np.eye(k), pdas=pdas)
        for i in range(k):
            best, vb = brute_box(gram, np.eye(k)[i])
            tol = 1e-9 * (objective_scale(jac, v[i]) + objective_scale(jac, vb))
            assert v[i] @ gram @ v[i] <= best + tol
            assert_box_kkt(jac, np.eye(k)[i], v[i])


def test_dual_cone_rows_are_independent_problems() -> None:
    rng = np.random.default_rng(11)
    jac = rng.normal(size=(6, 4))  # rank 4 < K = 6
    gram = jac @ jac.T
    u = rng.uniform(-1, 2, size=(5, 6))
    together = project_dual_cone(gram, u)
    for row, value in zip(u, together):
        np.testing.assert_allclose(project_dual_cone(gram, row[None])[0], value, atol=1e-9)


def test_dual_cone_hand_case() -> None:
    # g1 = (1, 0), g2 = (-1, 1): G = [[1, -1], [-1, 2]]
    # v >= e1: v = (1, x), (Gv)_2 = -1 + 2x = 0 -> x = 1/2;  v >= e2: v = (y, 1), y - 1 = 0
    gram = np.array([[1.0, -1.0], [-1.0, 2.0]])
    np.testing.assert_allclose(project_dual_cone(gram, np.eye(2)), [[1, 0.5], [1, 1]])


def test_dual_cone_fallback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    jac = rng.normal(size=(6, 8))
    gram = jac @ jac.T
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        v = project_dual_cone(gram, np.eye(6), pdas=False, max_iter=1)
    assert "dual-cone projection" in caplog.text
    for i in range(6):
        best, _ = brute_box(gram, np.eye(6)[i])
        assert (v[i] >= np.eye(6)[i]).all()
        assert v[i] @ gram @ v[i] <= best * (1 + 1e-5) + 1e-12


def test_float32_gramian_of_rank_deficient_jacobian(caplog: pytest.LogCaptureFixture) -> None:
    """A float32 Gramian of a rank-3 J is indefinite at 1e-7; the solvers stay exact on the
    repaired matrix: no fallback, and the objectives match float64 brute force closely."""
    rng = np.random.default_rng(2)
    jac = (rng.normal(size=(6, 3)) @ rng.normal(size=(3, 50))).astype(np.float32)
    gram32 = (jac @ jac.T).astype(np.float64)
    exact = jac.astype(np.float64) @ jac.T.astype(np.float64)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = min_norm_weights(gram32)
        v = project_dual_cone(gram32, np.eye(6))
    assert caplog.text == ""
    scale = np.abs(exact).max()
    assert w @ exact @ w <= brute_min_norm(exact)[0] + 1e-5 * scale
    for i in range(6):
        assert v[i] @ exact @ v[i] <= brute_box(exact, np.eye(6)[i])[0] + 1e-5 * scale


# ------------------------------------------------------------------ each exact path alone
def _random_jacobians(count: int = 40) -> list[np.ndarray]:
    """Full row rank, K = 2..8, gradient norms 1e-3..1e3."""
    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 9))
        out.append(rng.normal(size=(k, k + 3)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1)))
    return out


def _minor_cycle_jacobians() -> list[np.ndarray]:
    """K = 3..8, P = 2..K+3: draws on which Wolfe's method or Lawson–Hanson steps back
    (a minor cycle: the new support's minimiser leaves the feasible set)."""
    out = []
    for seed in (2, 6, 8, 12, 13, 18, 20, 22, 33, 35, 36, 71, 86):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(3, 9))
        p = int(rng.integers(2, k + 4))
        out.append(rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-1, 1, size=(k, 1)))
    return out


PROBLEMS = _random_jacobians() + ADVERSARIAL


def _must_not_run(name: str):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran")

    return refuse


def test_the_primal_dual_pass_alone_solves_these_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module docstring's fast path: on these problems (random, and the adversarial ones:
    collinear, opposite, zero, duplicated, rank one, norms 1e-6..1e6) the primal-dual
    active-set point passes the KKT check, so neither Wolfe / Lawson–Hanson nor the
    fallback runs. A broken fast path would otherwise only cost time."""
    monkeypatch.setattr(_qp._MinNorm, "wolfe", _must_not_run("Wolfe"))
    monkeypatch.setattr(_dual_cone, "_lawson_hanson", _must_not_run("Lawson-Hanson"))
    monkeypatch.setattr(_qp, "_fista", _must_not_run("the fallback"))
    monkeypatch.setattr(_dual_cone, "_fista", _must_not_run("the fallback"))
    for jac in PROBLEMS:
        gram = jac @ jac.T
        k = gram.shape[0]
        assert_min_norm_kkt(jac, min_norm_weights(gram))
        v = project_dual_cone(gram, np.eye(k))
        for i in range(k):
            assert_box_kkt(jac, np.eye(k)[i], v[i])


def test_the_finite_active_set_methods_need_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the primal-dual pass, Wolfe's method and Lawson–Hanson (finite, exact) reach
    a KKT point on the same problems, and on draws where they step back, without the
    accelerated-gradient fallback."""
    monkeypatch.setattr(_qp, "_fista", _must_not_run("the fallback"))
    monkeypatch.setattr(_dual_cone, "_fista", _must_not_run("the fallback"))
    for jac in PROBLEMS + _minor_cycle_jacobians():
        gram = jac @ jac.T
        k = gram.shape[0]
        assert_min_norm_kkt(jac, min_norm_weights(gram, pdas=False))
        v = project_dual_cone(gram, np.eye(k), pdas=False)
        for i in range(k):
            assert_box_kkt(jac, np.eye(k)[i], v[i])


@pytest.mark.parametrize(
    ("v", "total", "expected"),
    [
        ([0.2, 0.3, 0.1], 1.0, [0.2 + 0.4 / 3, 0.3 + 0.4 / 3, 0.1 + 0.4 / 3]),  # shift up
        ([0.5, 0.5, 2.0], 1.0, [0.0, 0.0, 1.0]),  # one coordinate dominates
        ([1.0, 0.8, -3.0], 1.0, [0.6, 0.4, 0.0]),  # θ = 0.4 on the top two
        ([1.0, 2.0], 4.0, [1.5, 2.5]),  # another total
    ],
)
def test_simplex_projection_by_hand(v: list[float], total: float, expected: list[float]) -> None:
    np.testing.assert_allclose(project_simplex(np.array(v), total), expected, atol=1e-15)


def test_kkt_check_of_the_dual_cone_projection() -> None:
    """``_box_violations`` flags exactly the rows that break a KKT condition."""
    gram = np.array([[1.0, -1.0], [-1.0, 2.0]])  # g1 = (1, 0), g2 = (-1, 1)
    _, d, hat = _qp._prepare(gram)
    low = np.eye(2)[:1] * d  # the row u = e1 in scaled variables
    exact = np.array([[0.0, 0.5]]) * d  # v = (1, 1/2): (Gv)_2 = 0 on the free index
    assert not _dual_cone._box_violations(hat, low, exact).any()
    for bad in (
        [0.0, 0.0],  # v = u: (Gv)_2 = -1 < 0, Jᵀv is outside the dual cone
        [0.0, 0.75],  # free index with (Gv)_2 = 0.5 != 0: not complementary
        [0.0, 0.6],  # the same, with x_2 = 0.6 √2 < 1 in scaled variables
        [0.0, np.nan],
        [-0.1, 0.5],  # below the lower bound
    ):
        assert _dual_cone._box_violations(hat, low, np.array([bad]) * d).all(), bad


def test_fallbacks_on_nearly_collinear_gradients(caplog: pytest.LogCaptureFixture) -> None:
    """Capped at one step, both solvers fall back to accelerated projected gradient; on
    nearly collinear gradients (the largest eigenvalue of the scaled Gramian near K) its
    step must follow that eigenvalue, or it diverges and the best point stays far off."""
    rng = np.random.default_rng(8)
    jac = rng.normal(size=(1, 8)) + 0.3 * rng.normal(size=(6, 8))
    jac[1] = -jac[1]  # some conflict, so that the projections move
    gram = jac @ jac.T
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = min_norm_weights(gram, pdas=False, max_iter=1)
        v = project_dual_cone(gram, np.eye(6), pdas=False, max_iter=1)
    assert "min-norm solver" in caplog.text and "dual-cone projection" in caplog.text
    best, _ = brute_min_norm(gram)
    assert w @ gram @ w <= best * (1 + 1e-6) + 1e-12
    for i in range(6):
        best_i, _ = brute_box(gram, np.eye(6)[i])
        assert (v[i] >= np.eye(6)[i]).all()
        assert v[i] @ gram @ v[i] <= best_i * (1 + 1e-5) + 1e-12


def test_many_tasks_take_the_gathered_solves() -> None:
    """K = 24 > DENSE_MAX_K: the masked systems are gathered to their free indices."""
    assert _dual_cone.DENSE_MAX_K < 24
    rng = np.random.default_rng(4)
    jac = rng.normal(size=(24, 30))
    gram = jac @ jac.T
    u = np.eye(24)[:4]
    np.testing.assert_allclose(project_dual_cone(gram, u), pgd_box(gram, u), atol=1e-6)
    for pdas in (True, False):
        v = project_dual_cone(gram, u, pdas=pdas)
        for i in range(4):
            assert_box_kkt(jac, u[i], v[i])
