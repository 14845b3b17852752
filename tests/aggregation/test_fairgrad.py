"""FairGrad (Ban & Ji, ICML 2024): α-fair weights, G w = w^(-1/α)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _gradcheck import check_engine
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import save_load
from taskbalance.aggregation import fairgrad
from taskbalance.aggregation.fairgrad import FairGrad
from taskbalance.aggregation.nash_mtl import NashMTL

ONES = torch.ones(16, dtype=torch.float64)


def solve(jac: np.ndarray | torch.Tensor, alpha: float = 1.0, bal: FairGrad | None = None):
    j = torch.as_tensor(np.asarray(jac, dtype=np.float64))
    bal = bal or FairGrad(j.shape[0], alpha=alpha)
    return bal.weights_from_gramian(j @ j.T, ONES[: j.shape[0]]).numpy()


def random_jacobian(seed: int, k: int, p: int, spread: float = 3.0) -> np.ndarray:
    """Rows with norms 10^-spread..10^spread, full row rank (p >= k) with probability 1."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-spread, spread, size=(k, 1))


def relative_residual(jac: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """``||G w − w^(−1/α)|| / ||w^(−1/α)||``."""
    target = w ** (-1.0 / alpha)
    return float(np.linalg.norm(jac @ jac.T @ w - target) / np.linalg.norm(target))


# ---------------------------------------------------------------------- the defining property
@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.integers(0, 10),
    st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0]),
)
def test_solves_the_alpha_fair_condition(seed: int, k: int, extra: int, alpha: float) -> None:
    """Norms 1e-3..1e3: w > 0 with G w = w^(−1/α), i.e. each task's utility g_i·d equals
    w_i^(−1/α), without a fallback."""
    jac = random_jacobian(seed, k, k + extra)
    bal = FairGrad(k, alpha=alpha)
    w = solve(jac, bal=bal)
    assert (w > 0).all()
    assert relative_residual(jac, w, alpha) < 1e-9
    np.testing.assert_allclose(jac @ (w @ jac), w ** (-1.0 / alpha), rtol=1e-8)
    assert bal.fallbacks == 0 and bal.last_fallback is None


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 8), st.sampled_from([0.25, 4.0, 10.0]))
def test_wider_alpha_on_moderate_norms(seed: int, k: int, alpha: float) -> None:
    jac = random_jacobian(seed, k, k + 3, spread=1.5)
    bal = FairGrad(k, alpha=alpha)
    w = solve(jac, bal=bal)
    assert bal.fallbacks == 0 and relative_residual(jac, w, alpha) < 1e-8


# ---------------------------------------------------------------------- by hand, K = 2
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_orthogonal_gradients_by_hand(alpha: float) -> None:
    # G = diag(9, 1/4): 9 w1 = w1^(-1/α) -> w1^((1+α)/α) = 1/9 -> w1 = 9^(-α/(1+α)); same for w2
    w = solve([[3.0, 0.0], [0.0, 0.5]], alpha)
    e = alpha / (1.0 + alpha)
    np.testing.assert_allclose(w, [9.0**-e, 0.25**-e], rtol=1e-10)


def test_alpha_two_by_hand() -> None:
    # α = 2, G = diag(9, 1/4): w1 = 9^(-2/3) = 0.2311, w2 = 4^(2/3) = 2.5198; check both equations
    w = solve([[3.0, 0.0], [0.0, 0.5]], 2.0)
    np.testing.assert_allclose(w, [0.23112042478354, 2.51984209978975], rtol=1e-10)
    np.testing.assert_allclose([9 * w[0], 0.25 * w[1]], w**-0.5, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_symmetric_pair_at_sixty_degrees(alpha: float) -> None:
    # G = [[1, 1/2], [1/2, 1]]: by symmetry w1 = w2 = w with (3/2) w = w^(-1/α),
    # so w = (3/2)^(-α/(1+α))
    w = solve([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], alpha)
    np.testing.assert_allclose(w, np.full(2, 1.5 ** (-alpha / (1 + alpha))), rtol=1e-10)


# ---------------------------------------------------------------------- the paper's special cases
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_one_is_nash_mtl(seed: int) -> None:
    jac = random_jacobian(seed, 5, 9)
    nash = NashMTL(5, max_norm=0.0).weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES[:5])
    np.testing.assert_allclose(solve(jac, 1.0), nash.numpy(), rtol=1e-9)


def test_large_alpha_approaches_max_min_fairness() -> None:
    # α -> ∞: G w = 1, equal utilities g_i·d = 1 (here G⁻¹1 > 0)
    jac = np.array([[2.0, 0.0], [0.5, math.sqrt(3) / 2], [0.3, 0.4]])
    jac = np.hstack([jac, np.eye(3)])
    limit = np.linalg.solve(jac @ jac.T, np.ones(3))
    assert (limit > 0).all()
    w = solve(jac, 1e4)
    np.testing.assert_allclose(w, limit, rtol=1e-3)
    np.testing.assert_allclose(jac @ (w @ jac), np.ones(3), rtol=1e-3)
    assert np.abs(solve(jac, 1.0) - limit).max() > 0.1  # the limit is not the α = 1 answer


def test_small_alpha_approaches_equal_weights() -> None:
    # α -> 0: w_i = (Gw)_i^(-α) -> 1 (non-conflicting gradients: every utility positive)
    jac = np.array([[2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(solve(jac, 1e-3), np.ones(3), rtol=1e-2)
    assert np.abs(solve(jac, 1.0) - 1.0).max() > 0.1


def test_scaling_and_permutation() -> None:
    jac = random_jacobian(5, 4, 7)
    for alpha in (0.5, 2.0):
        w = solve(jac, alpha)
        # G -> c G multiplies the weights by c^(-α/(1+α)); here c = 1e4 (J -> 100 J)
        np.testing.assert_allclose(
            solve(100 * jac, alpha), w * 1e4 ** (-alpha / (1 + alpha)), rtol=1e-9
        )
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(solve(jac[perm], 2.0), solve(jac, 2.0)[perm], rtol=1e-9)


@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.5), (1, 2.0), (5, 2.0), (7, 1.5)])
def test_newton_converges_from_far_starts(seed: int, alpha: float) -> None:
    """Starts off by 1e-4..1e4 in every coordinate: the damped steps reach the solution."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    jac = random_jacobian(seed, k, k + 3)
    gram = jac @ jac.T / np.linalg.norm(jac @ jac.T)
    start = 10.0 ** rng.uniform(-4, 4, size=k)
    w, residual = fairgrad.fairgrad_solve(gram, start, alpha)
    assert residual < 1e-12
    np.testing.assert_allclose(w ** (1 / alpha) * (gram @ w), np.ones(k), atol=1e-12)


def test_warm_start_gives_the_same_solution() -> None:
    bal = FairGrad(5, alpha=2.0)
    first, second = random_jacobian(1, 5, 10), random_jacobian(2, 5, 10)
    solve(first, bal=bal)
    np.testing.assert_allclose(solve(second, bal=bal), solve(second, 2.0), rtol=1e-10)
    assert bal.fallbacks == 0


# ---------------------------------------------------------------------- no solution: fallbacks
@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 2.0], [0.0, 0.0]],  # a zero gradient: (Gw)_2 = 0 can never equal w_2^(-1/α)
        [[1.0, 2.0], [-1.0, -2.0]],  # opposite: g1 + g2 = 0
    ],
)
def test_no_solution_uses_the_ridge_and_logs_it(rows, caplog) -> None:
    bal = FairGrad(["a", "b"], alpha=2.0)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = solve(rows, bal=bal)
    assert np.isfinite(w).all() and (w > 0).all()
    assert bal.fallbacks == 1 and "regularised" in bal.last_fallback
    assert any(
        "FairGrad" in r.getMessage() and "fallback 1" in r.getMessage() for r in caplog.records
    )


def test_zero_gramian_uses_equal_weights_and_logs_it(caplog) -> None:
    bal = FairGrad(3)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = solve(np.zeros((3, 2)), bal=bal)
    np.testing.assert_array_equal(w, np.ones(3))
    assert bal.fallbacks == 1 and bal.last_fallback == "equal weights"
    assert any("Gramian is zero" in r.getMessage() for r in caplog.records)


def test_failed_solves_fall_back_to_the_previous_weights(monkeypatch, caplog) -> None:
    bal = FairGrad(3, alpha=2.0)
    jac = random_jacobian(3, 3, 5, spread=1.0)
    first = solve(jac, bal=bal)
    monkeypatch.setattr(fairgrad, "fairgrad_solve", lambda G, s, a, m: (s, 1.0))  # never converges
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        again = solve(2 * jac, bal=bal)
    np.testing.assert_array_equal(again, first)
    assert bal.fallbacks == 1 and bal.last_fallback == "the previous weights"
    assert any("previous weights" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- misuse
@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_positive_and_finite(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"FairGrad needs alpha > 0 \(finite\).*alpha=1"):
        FairGrad(2, alpha=alpha)


@pytest.mark.parametrize("kw", [{"max_iter": 0}, {"tol": 0.0}, {"ridge": -1.0}])
def test_solver_settings_are_checked(kw) -> None:
    with pytest.raises(ValueError, match="max_iter >= 1, tol > 0 and ridge > 0"):
        FairGrad(2, **kw)


def test_registered_as_fairgrad() -> None:
    assert tb.get("fairgrad") is FairGrad and tb.make("fairgrad", 2).method_name == "fairgrad"


# ---------------------------------------------------------------------- engine and state
@pytest.mark.parametrize("features", [False, True])
def test_through_backward(features: bool) -> None:
    check_engine(
        FairGrad(3, alpha=2.0),
        lambda g: FairGrad(3, alpha=2.0).weights_from_gramian(g, ONES[:3]),
        features=features,
    )


def test_state_round_trips() -> None:
    bal = FairGrad(2)
    solve([[1.0, 2.0], [0.5, -1.0]], bal=bal)
    solve(np.zeros((2, 2)), bal=bal)  # one fallback (the previous weights)
    state = save_load(bal.state_dict())
    fresh = FairGrad(2)
    fresh.load_state_dict(state)
    assert fresh.fallbacks == 1 and torch.equal(fresh.solution, bal.solution)


# ---------------------------------------------------------------------- torchjd 0.18
def torchjd_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((3, 8)),  # random
        np.array([[2.0, 0.0, 0.0], [-1.5, 1.0, 0.0], [-0.2, -2.0, 0.3]]),  # conflicting
        random_jacobian(3, 4, 9, spread=1.0),  # norms 0.1..10
    ]


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("jac", torchjd_cases())
def test_matches_torchjd(jac: np.ndarray, alpha: float) -> None:
    """torchjd (scipy's least_squares from 1/K, as the official code) on the same Gramian:
    the same weights where its solve converges."""
    torchjd = pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    pytest.importorskip("scipy", reason="torchjd's FairGrad needs scipy")
    gram = torch.from_numpy(jac @ jac.T)
    theirs = torchjd.aggregation.FairGrad(alpha=alpha).gramian_weighting(gram).numpy()
    assert relative_residual(jac, theirs, alpha) < 1e-8  # their solve converged
    np.testing.assert_allclose(solve(jac, alpha), theirs, rtol=1e-8)
