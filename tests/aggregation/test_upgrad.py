"""UPGrad: the mean of the task gradients projected onto the dual cone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gradcheck import adversarial_jacobians, brute_box, check_engine, conflict_scale
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance import registry
from taskbalance.aggregation.upgrad import UPGrad, upgrad_projections, upgrad_weights


def weights(rows: list[list[float]], **kw) -> np.ndarray:
    jac = torch.tensor(rows, dtype=torch.float64)
    return upgrad_weights(jac @ jac.T, **kw).numpy()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # no conflict: every gradient is already in the dual cone, w = the mean weights
        ([[1, 0], [0, 1]], [0.5, 0.5]),
        ([[1, 0], [1, 1]], [0.5, 0.5]),
        # g1 = (1,0), g2 = (-1,1): v(e1) = (1, 1/2), v(e2) = (1, 1) -> mean (1, 3/4)
        ([[1, 0], [-1, 1]], [1.0, 0.75]),
        # opposite: v(e1) = v(e2) = (1, 1) -> d = 0
        ([[1, 0], [-1, 0]], [1.0, 1.0]),
        # g1=(1,0), g2=(-1,2): v(e1)=(1, 1/5), v(e2)=(1, 1); mean (1, 3/5)
        ([[1, 0], [-1, 2]], [1.0, 0.6]),
    ],
)
def test_hand_computed(rows: list[list[float]], expected: list[float]) -> None:
    np.testing.assert_allclose(weights(rows), expected, atol=1e-12)


def test_hand_computed_three_tasks() -> None:
    # g1 = (1,0), g2 = (0,1), g3 = (-1,-1): G = [[1,0,-1],[0,1,-1],[-1,-1,2]]
    # v >= e1: free set {3}: (Gv)_3 = -1 + 2x = 0 -> (1, 0, 1/2); then (Gv)_2 = -1/2 < 0, so
    # free set {2, 3}: y - x = 0, -1 - y + 2x = 0 -> x = y = 1: v = (1, 1, 1), Gv = 0.
    # By symmetry every projection is (1, 1, 1) (the gradients sum to zero): w = (1, 1, 1).
    rows = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
    np.testing.assert_allclose(weights(rows), [1.0, 1.0, 1.0], atol=1e-12)
    # g1=(1,0), g2=(0,1), g3=(1,1): no conflict at all
    np.testing.assert_allclose(weights([[1, 0], [0, 1], [1, 1]]), [1 / 3] * 3, atol=1e-12)


@pytest.mark.parametrize("jac", adversarial_jacobians(seed=4) + adversarial_jacobians(seed=5))
def test_never_conflicts_and_each_projection_is_optimal(jac: np.ndarray) -> None:
    gram = jac @ jac.T
    k = gram.shape[0]
    proj = upgrad_projections(torch.from_numpy(gram)).numpy()
    w = proj.sum(axis=0)
    assert np.isfinite(w).all()
    assert (jac @ (w @ jac) >= -1e-8 * conflict_scale(jac, w)).all()
    for i in range(k):
        u = np.eye(k)[i] / k
        v = proj[i]
        tol = 1e-7 * conflict_scale(jac, v)
        assert (v >= u).all()
        assert (gram @ v >= -tol).all()  # Jᵀv in the dual cone
        assert (np.abs(gram @ v)[v > u] <= tol[v > u]).all()  # complementary slackness
        best, vb = brute_box(gram, u)
        n = np.linalg.norm(jac, axis=1)
        floor = (n @ v) ** 2 + (n @ vb) ** 2 + k * 1e-15 * n.max() ** 2  # rounding of vᵀGv
        assert v @ gram @ v <= best + 1e-9 * floor


def projected_gradient(gram: np.ndarray, u: np.ndarray, steps: int = 20000) -> np.ndarray:
    """An independent slow solver of min vᵀGv s.t. v >= u (projected gradient), row-wise."""
    lip = np.linalg.eigvalsh(gram)[-1]
    v = u.copy()
    for _ in range(steps):
        v = np.maximum(v - (v @ gram) / lip, u)
    return v


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 6))
def test_projections_match_an_independent_solver(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, k + 2))  # full row rank: each projection is unique
    gram = jac @ jac.T
    proj = upgrad_projections(torch.from_numpy(gram)).numpy()
    np.testing.assert_allclose(proj, projected_gradient(gram, np.eye(k) / k), atol=1e-6)


def test_preference_vector_and_permutation() -> None:
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(4, 6))
    gram = torch.from_numpy(jac @ jac.T)
    proj = upgrad_projections(gram).numpy()
    pref = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # with p = e_1 only the first gradient is projected: w = v(e_1) = K * proj[0]
    np.testing.assert_allclose(upgrad_weights(gram, pref).numpy(), 4 * proj[0], atol=1e-10)
    perm = rng.permutation(4)
    wp = upgrad_weights(torch.from_numpy(jac[perm] @ jac[perm].T)).numpy()
    np.testing.assert_allclose(wp, upgrad_weights(gram).numpy()[perm], atol=1e-10)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[3.0, 4.0]], [1.0]),
        ([[1.0, 2.0], [1.0, 2.0]], [0.5, 0.5]),
        ([[1.0, 2.0], [-2.0, -4.0]], [1.5, 0.75]),  # v(e1) = (1, 1/2)/2, v(e2) = (2, 1)/2
        ([[0.0, 0.0], [1.0, 1.0]], [0.5, 0.5]),
        ([[0.0, 0.0], [0.0, 0.0]], [0.5, 0.5]),
    ],
)
def test_degenerate_inputs(rows: list[list[float]], expected: list[float]) -> None:
    np.testing.assert_allclose(weights(rows), expected, atol=1e-12)


def test_torchjd_regularisation() -> None:
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    gram = jac @ jac.T
    # torchjd: G / trace(G) + reg I; the projection is then solved on that matrix
    reg = gram / np.trace(gram) + 1e-4 * np.eye(2)
    expected = projected_gradient(reg, np.eye(2) / 2).sum(axis=0)
    got = upgrad_weights(torch.from_numpy(gram), norm_eps=1e-4, reg_eps=1e-4).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert not np.allclose(got, [1.0, 0.75], atol=1e-6)  # the ridge moves the answer a bit
    # torchjd replaces a Gramian with trace < norm_eps by zero: the weights become p
    tiny = torch.from_numpy(gram * 1e-6)
    np.testing.assert_allclose(upgrad_weights(tiny, norm_eps=1e-4, reg_eps=1e-4), [0.5, 0.5])
    np.testing.assert_allclose(upgrad_weights(tiny), [1.0, 0.75], atol=1e-12)  # exact: scale-free


CONFLICT = torch.tensor([[1.0, -0.9], [-0.9, 1.0]], dtype=torch.float64)  # cos = -0.9


@pytest.mark.parametrize("scale", [1e-4, 0.1, 4.0])
def test_each_regulariser_alone(scale: float) -> None:
    """K = 2 with g1·g2 < 0: v(e1) = (1, -G12/G22)/2, v(e2) = (-G12/G11, 1)/2, so the
    weights are (1 - G12/G11, 1 - G12/G22)/2, on G / trace(G) + reg_eps I when regularised."""
    gram = scale * CONFLICT
    np.testing.assert_allclose(upgrad_weights(gram), [0.95, 0.95], atol=1e-12)  # scale-free
    # reg_eps alone: G / trace = [[0.5, -0.45], [-0.45, 0.5]] (any trace), + 0.5 I
    ridge = 0.5 * (1 + 0.45 / (0.5 + 0.5))
    np.testing.assert_allclose(upgrad_weights(gram, reg_eps=0.5), [ridge, ridge], atol=1e-12)
    # norm_eps alone: a Gramian with trace(G) < norm_eps is zero, the weights are p = 1/2;
    # above it the normalisation alone changes nothing (the projection is scale-free)
    small = 2 * scale < 1e-3
    expected = [0.5, 0.5] if small else [0.95, 0.95]
    np.testing.assert_allclose(upgrad_weights(gram, norm_eps=1e-3), expected, atol=1e-12)


def test_default_is_exact_at_any_scale() -> None:
    """UPGrad's defaults (norm_eps = reg_eps = 0) neither zero a tiny Gramian nor ridge it."""
    tiny = 1e-8 * CONFLICT
    weights = UPGrad(2).weights_from_gramian(tiny, torch.ones(2, dtype=torch.float64))
    np.testing.assert_allclose(weights.numpy(), [0.95, 0.95], atol=1e-12)


@pytest.mark.parametrize("features", [False, True])
def test_end_to_end_through_the_engine(features: bool) -> None:
    check_engine(UPGrad(3), lambda g: upgrad_weights(g), features=features)
    pref = [0.2, 0.3, 0.5]
    bal = UPGrad(3, pref_vector=pref)
    check_engine(bal, lambda g: upgrad_weights(g, torch.tensor(pref).double()), features=features)


def test_arguments_and_registry() -> None:
    with pytest.raises(ValueError):
        UPGrad(3, pref_vector=[1.0, 2.0])
    with pytest.raises(ValueError):
        UPGrad(2, reg_eps=-1.0)
    assert registry.get("upgrad") is UPGrad


@pytest.mark.parametrize("eps", [{"norm_eps": -1.0}, {"reg_eps": float("nan")}])
def test_a_negative_or_nan_regulariser_is_refused(eps: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"UPGrad: norm_eps and reg_eps must be >= 0.*1e-4"):
        UPGrad(2, **eps)
