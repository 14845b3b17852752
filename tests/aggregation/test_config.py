"""ConFIG (Liu, Chen, Thuerey, ICLR 2025): the conflict-free inverse-gradient direction."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _gradcheck import check_engine
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import save_load
from taskbalance.aggregation.config import ConFIG, config_weights

EPS32 = float(np.finfo(np.float32).eps)


def weights(rows: list[list[float]] | np.ndarray, **kw) -> np.ndarray:
    jac = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    return config_weights(jac @ jac.T, **kw)[0].numpy()


def reference_direction(jac: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    """The paper's Eq. 2 straight from J (independent of the Gramian route):
    x = pinv(unit rows) ŵ, d = (Σ_i g_i·x̂) x̂ with x̂ = x / ||x||."""
    pref = np.ones(jac.shape[0]) if pref is None else pref
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    x = np.linalg.pinv(units) @ pref
    unit = x / np.linalg.norm(x)
    return (jac @ unit).sum() * unit


def random_jacobian(seed: int, k: int, p: int, spread: float = 3.0) -> np.ndarray:
    """Rows with norms 10^-spread..10^spread, full row rank (p >= k) with probability 1."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-spread, spread, size=(k, 1))


# ---------------------------------------------------------------------- hand-computed, K = 2
S3 = math.sqrt(3.0)


@pytest.mark.parametrize(
    ("rows", "expected_w", "expected_d"),
    [
        # orthogonal, norms 3 and 1/2: x = (1, 1), g_u = (1, 1)/√2, length (3 + 1/2)/√2, so
        # d = (7/4, 7/4) = w1 (3, 0) + w2 (0, 1/2): w = (7/12, 7/2)
        ([[3.0, 0.0], [0.0, 0.5]], [7 / 12, 7 / 2], [1.75, 1.75]),
        # 60 degrees, norms 2 and 1: u1 = (1, 0), u2 = (1/2, √3/2); x = (1, 1/√3) (u_i·x = 1),
        # g_u = (√3/2, 1/2), length = √3 + √3/2, d = (9/4, 3√3/4) = (3/4) g1 + (3/2) g2
        ([[2.0, 0.0], [0.5, S3 / 2]], [0.75, 1.5], [2.25, 3 * S3 / 4]),
        # 120 degrees (conflict), norms 2 and 1: x = (1, √3), g_u = (1/2, √3/2), length
        # 1 + 1/2, d = (3/4, 3√3/4) = (3/4) g1 + (3/2) g2; g1·d = 3/2 > 0, g2·d = 3/4 > 0
        # (the plain sum has g2·(g1 + g2) = 0)
        ([[2.0, 0.0], [-0.5, S3 / 2]], [0.75, 1.5], [0.75, 3 * S3 / 4]),
    ],
)
def test_two_tasks_by_hand(rows, expected_w, expected_d) -> None:
    w = weights(rows)
    np.testing.assert_allclose(w, expected_w, rtol=1e-12)
    np.testing.assert_allclose(w @ np.array(rows), expected_d, rtol=1e-12)


def test_conflicting_pair_gets_positive_equal_cosines() -> None:
    jac = np.array([[2.0, 0.0], [-0.5, S3 / 2]])
    d = weights(jac) @ jac
    cos = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cos, [0.5, 0.5], rtol=1e-12)


# ---------------------------------------------------------------------- the defining property
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(0, 12))
def test_equal_cosines_positive_projections_and_length(seed: int, k: int, extra: int) -> None:
    """Full row rank (P >= K), norms 1e-3..1e3: every task has the same cosine with d and a
    positive projection, ||d|| is the sum of the projections of the g_i on d/||d||, and d
    is the paper's formula computed from J. A draw whose unit rows are dependent to float32
    precision (σ_min² <= K eps32 σ_max², rare) is the documented degenerate case instead."""
    jac = random_jacobian(seed, k, k + extra)
    bal = ConFIG(k)
    w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), torch.ones(k)).numpy()
    sv = np.linalg.svd(jac / np.linalg.norm(jac, axis=1, keepdims=True), compute_uv=False)
    ratio = sv[-1] ** 2 / sv[0] ** 2  # the smallest eigenvalue of Ĝ, relative
    assume(not 0.5 * k * EPS32 < ratio < 2 * k * EPS32)  # at the cut-off rounding decides
    if ratio <= 0.5 * k * EPS32 and bal.degenerate_steps:
        assert "rank-deficient" in bal.last_degenerate
        return
    d = w @ jac
    norm = np.linalg.norm(d)
    proj = jac @ d
    cos = proj / (np.linalg.norm(jac, axis=1) * norm)
    assert (proj > 0).all()
    np.testing.assert_allclose(cos, np.full(k, cos.mean()), rtol=1e-6)
    np.testing.assert_allclose(norm, proj.sum() / norm, rtol=1e-9)
    np.testing.assert_allclose(d, reference_direction(jac), rtol=1e-6, atol=1e-9 * norm)
    assert bal.degenerate_steps == 0 and bal.last_degenerate is None


def test_preference_vector_sets_the_ratios_of_the_cosines() -> None:
    jac = random_jacobian(4, 3, 6, spread=1.0)
    pref = np.array([1.0, 2.0, 4.0])
    d = weights(jac, pref=torch.from_numpy(pref)) @ jac
    cos = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cos / cos[0], pref, rtol=1e-9)
    np.testing.assert_allclose(d, reference_direction(jac, pref), rtol=1e-9)
    # only the ratios of ŵ matter
    np.testing.assert_allclose(weights(jac, pref=torch.from_numpy(10 * pref)) @ jac, d, rtol=1e-12)


def test_scaling_and_permutation() -> None:
    jac = random_jacobian(7, 5, 9)
    w = weights(jac)
    np.testing.assert_allclose(weights(1e3 * jac), w, rtol=1e-9)  # d(cJ) = c d(J)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(weights(jac[perm]), w[perm], rtol=1e-9)


# ---------------------------------------------------------------------- edge cases
def test_single_task_is_its_own_gradient() -> None:
    np.testing.assert_allclose(weights([[3.0, 4.0]]), [1.0], rtol=1e-12)


@pytest.mark.parametrize(
    ("rows", "expected_d"),
    [
        ([[1.0, 2.0], [1.0, 2.0]], [2.0, 4.0]),  # duplicates: d = g1 + g2, exact (ŵ in range)
        ([[1.0, 2.0], [3.0, 6.0]], [4.0, 8.0]),  # same direction: d = g1 + g2
        ([[1.0, 0.0], [1.0, 1e-5]], [2.0, 1e-5]),  # within the rank cut-off of each other
    ],
)
def test_collinear_gradients_add_up_without_a_degenerate_step(rows, expected_d, caplog) -> None:
    bal = ConFIG(2)
    jac = torch.tensor(rows, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(jac @ jac.T, torch.ones(2))
    np.testing.assert_allclose((w @ jac).numpy(), expected_d, rtol=1e-6, atol=1e-12)
    assert bal.degenerate_steps == 0 and not caplog.records


def test_zero_gradient_gets_weight_zero_and_is_logged(caplog) -> None:
    bal = ConFIG(["a", "b", "c"])
    jac = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.5, S3 / 2]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(jac @ jac.T, torch.ones(3))
    # the direction of the other two tasks: the 60-degree case by hand
    np.testing.assert_allclose(w.numpy(), [0.75, 0.0, 1.5], rtol=1e-12)
    assert bal.degenerate_steps == 1 and "zero gradient of task(s) ['b']" in bal.last_degenerate
    assert any("'b'" in r.getMessage() and "ConFIG" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "rows", [[[1.0, 2.0], [-1.0, -2.0]], [[1.0, 2.0], [-3.0, -6.0]], [[0.0, 0.0], [0.0, 0.0]]]
)
def test_no_direction_helps_every_task_gives_zero(rows, caplog) -> None:
    bal = ConFIG(2)
    jac = torch.tensor(rows, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(jac @ jac.T, torch.ones(2))
    assert torch.equal(w, torch.zeros(2, dtype=torch.float64))
    assert bal.degenerate_steps == 1 and caplog.records


def test_more_tasks_than_dimensions_is_a_logged_least_squares_fit(caplog) -> None:
    # u1 = (1, 0), u2 = (0, 1), u3 = (1, 1)/√2: U x = 1 has no solution; the least-squares
    # fit (the official lstsq) is x ∝ (1, 1), so g_u = (1, 1)/√2, the length is
    # (1 + 2 + 6)/√2 and d = (9/2, 9/2)
    jac = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    bal = ConFIG(3)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), torch.ones(3)).numpy()
    np.testing.assert_allclose(w @ jac, [4.5, 4.5], rtol=1e-12)
    assert bal.degenerate_steps == 1 and "rank-deficient" in bal.last_degenerate
    assert any("rank-deficient" in r.getMessage() for r in caplog.records)


def test_unit_rows_dependent_to_float32_precision_are_cut_and_logged(caplog) -> None:
    """σ_min/σ_max of the unit rows is 5e-5 here (a square 8×8 draw): Ĝ's smallest
    eigenvalue, 2.4e-9 relative, is below the default cut-off 8·eps32 — not resolvable in a
    Gramian from float32 gradients — so it is dropped and logged. float64 gradients can
    lower ``rank_tol`` and get the exact equal cosines."""
    jac = random_jacobian(4068426477, 8, 8)
    gram = torch.from_numpy(jac @ jac.T)
    bal = ConFIG(8)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        bal.weights_from_gramian(gram, torch.ones(8))
    assert bal.degenerate_steps == 1 and "rank-deficient" in bal.last_degenerate
    exact = ConFIG(8, rank_tol=1e-15)
    d = exact.weights_from_gramian(gram, torch.ones(8)).numpy() @ jac
    cos = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cos, np.full(8, cos.mean()), rtol=1e-6)
    np.testing.assert_allclose(d, reference_direction(jac), rtol=1e-7)
    assert exact.degenerate_steps == 0


@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_huge_norm_spread_matches_the_formula(spread: float) -> None:
    jac = random_jacobian(11, 6, 8, spread=spread)
    d = weights(jac) @ jac
    np.testing.assert_allclose(d, reference_direction(jac), rtol=1e-6)


# ---------------------------------------------------------------------- misuse
@pytest.mark.parametrize("pref", [[1.0, 0.0], [1.0, -2.0]])
def test_non_positive_preference_is_refused(pref) -> None:
    with pytest.raises(ValueError, match=r"must be positive.*leave it out for equal cosines"):
        ConFIG(2, pref_vector=pref)


def test_negative_rank_tol_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank_tol must be >= 0 \(or None"):
        ConFIG(2, rank_tol=-1e-3)


def test_registered_as_config() -> None:
    assert tb.get("config") is ConFIG and tb.make("config", 2).method_name == "config"


# ---------------------------------------------------------------------- engine and state
@pytest.mark.parametrize("features", [False, True])
def test_through_backward(features: bool) -> None:
    check_engine(ConFIG(3), lambda g: config_weights(g)[0], features=features)


def test_degenerate_count_round_trips() -> None:
    bal = ConFIG(2)
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    bal.weights_from_gramian(jac @ jac.T, torch.ones(2))
    state = save_load(bal.state_dict())
    fresh = ConFIG(2)
    fresh.load_state_dict(state)
    assert fresh.degenerate_steps == 1


# ---------------------------------------------------------------------- torchjd 0.18
def torchjd_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    conflicting = np.array([[2.0, 0.0, 0.0], [-1.5, 1.0, 0.0], [-0.2, -2.0, 0.3]])
    base = rng.standard_normal(6)
    return [
        rng.standard_normal((3, 8)),  # random
        conflicting,
        np.stack([base, 2.5 * base, -0.5 * base + 1e-3 * rng.standard_normal(6)]),  # collinear
        np.vstack([rng.standard_normal((2, 5)), np.zeros((1, 5))]),  # a zero row
        random_jacobian(3, 5, 9, spread=3.0),  # norms 1e-3..1e3
    ]


@pytest.mark.parametrize("jac", torchjd_cases())
def test_matches_torchjd(jac: np.ndarray) -> None:
    torchjd = pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    j = torch.from_numpy(jac)
    ours = weights(jac) @ jac
    theirs = torchjd.aggregation.ConFIG()(j).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12 * np.abs(theirs).max())


@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_only_the_ratios_of_the_preferences_matter(scale: float) -> None:
    # ŵ and c ŵ ask for the same cosine ratios, so d (unit direction times the summed
    # projections) is the same: here the 120-degree pair by hand, d = (3/4, 3√3/4)
    jac = np.array([[2.0, 0.0], [-0.5, S3 / 2]])
    bal = ConFIG(2, pref_vector=[scale, scale])
    w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), torch.ones(2)).numpy()
    np.testing.assert_allclose(w @ jac, [0.75, 3 * S3 / 4], rtol=1e-12)
    assert bal.degenerate_steps == 0 and bal.last_degenerate is None


def test_a_tiny_preference_is_met_without_a_degenerate_step() -> None:
    # ŵ = (1, 1e-12): the cosine with g2 is 1e-12 times that with g1 (60-degree pair); the
    # rounding of the fit is judged against the largest preference, so this is exact
    jac = np.array([[2.0, 0.0], [0.5, S3 / 2]])
    bal = ConFIG(2, pref_vector=[1.0, 1e-12])
    w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), torch.ones(2)).numpy()
    d = w @ jac
    cos = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cos[1], 1e-12 * cos[0], rtol=1e-3, atol=1e-15)
    assert bal.degenerate_steps == 0


def test_orthogonality_is_judged_against_the_largest_preference(caplog) -> None:
    # g1 = e1, g2 = g3 = −e1: every d has cosines (c, −c, −c), and ŵ = (1 + 3e-7, 0.999,
    # 0.001) is orthogonal to that pattern up to 1e-7 of its largest entry (below the 1e-6
    # cut-off; the smallest entry, 0.001, would put the cut-off at 1e-9): d = 0, logged
    jac = np.array([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    bal = ConFIG(3, pref_vector=[1.0 + 3e-7, 0.999, 0.001])
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), torch.ones(3))
    assert torch.equal(w, torch.zeros(3, dtype=torch.float64))
    assert bal.degenerate_steps == 1 and "orthogonal" in bal.last_degenerate
