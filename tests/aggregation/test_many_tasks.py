"""K = 100: MGDA, Aligned-MTL, ConFIG and M-ConFIG against references computed another way.

The K×K factorizations of these methods run through ``torch.linalg``
(:mod:`taskbalance.aggregation._linalg`) instead of ``np.linalg`` (whose own BLAS thread
pool stalled a call for 90-400 ms at K = 100 on a loaded machine), and Aligned-MTL and ConFIG
take the eigendecomposition of their symmetric K×K matrix instead of an SVD. Here each is
checked at K = 100 on random and structured Jacobians (collinear and opposite rows, a zero
row, row norms 1e-3..1e3, rank 40 < K) against a reference that does not share its route:

* MGDA: the previous solver (the same active-set algorithm with NumPy's LAPACK, patched
  in), a KKT certificate written here, and quadprog where the Gramian is positive definite;
* Aligned-MTL: ``B`` from the SVD of J (K×P) instead of the eigenpairs of G;
* ConFIG: the paper's Eq. 2 from the pseudo-inverse of the unit rows (K×P);
* M-ConFIG: momenta kept by a hand loop, then the ConFIG reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskbalance.aggregation import _linalg
from taskbalance.aggregation.aligned_mtl import aligned_mtl_weights
from taskbalance.aggregation.config import config_weights
from taskbalance.aggregation.m_config import MConFIG
from taskbalance.aggregation.mgda import mgda_weights

K, P = 100, 1000
EPS32 = float(np.finfo(np.float32).eps)


def jacobian(case: str) -> np.ndarray:
    """K×P Jacobians: random ones and the structured cases of the module docstring."""
    rng = np.random.default_rng(["random", "collinear", "zero", "scales", "mixed"].index(case))
    jac = rng.standard_normal((K, P))
    if case == "collinear":  # positive multiples and opposite copies of other rows
        jac[50:60] = jac[:10] * rng.uniform(0.5, 2.0, (10, 1))
        jac[60:65] = -3.0 * jac[10:15]
    elif case == "zero":
        jac[7] = 0.0
    elif case == "scales":
        jac *= 10.0 ** rng.uniform(-3.0, 3.0, (K, 1))
    elif case == "mixed":
        jac *= 10.0 ** rng.uniform(-3.0, 3.0, (K, 1))
        jac[20:30] = jac[:10] * rng.uniform(0.5, 2.0, (10, 1))
        jac[3] = 0.0
    return jac


CASES = ["random", "collinear", "zero", "scales", "mixed"]


def low_rank() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((K, 40)) @ rng.standard_normal((40, P))


def shared_component() -> np.ndarray:
    """Every gradient has a large common part: MGDA's solution has a proper support."""
    rng = np.random.default_rng(8)
    return rng.standard_normal((K, P)) + 3.0 * rng.standard_normal(P)


ALL = {**{c: jacobian(c) for c in CASES}, "rank40": low_rank(), "shared": shared_component()}


def gram(jac: np.ndarray) -> torch.Tensor:
    j = torch.from_numpy(jac)
    return j @ j.T


# ---------------------------------------------------------------------- MGDA
def numpy_solve(m: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    try:
        return np.linalg.solve(m, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return None


def numpy_lstsq(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    if m.ndim == 2:
        return np.linalg.lstsq(m, rhs, rcond=None)[0]
    return np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(m, rhs)])


def numpy_positive_definite(a: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return False
    return True


def previous_mgda(monkeypatch: pytest.MonkeyPatch, g: torch.Tensor, **kw) -> np.ndarray:
    """The solver as it was before its LAPACK calls moved to torch: NumPy's, patched in."""
    with monkeypatch.context() as patch:
        patch.setattr(_linalg, "solve", numpy_solve)
        patch.setattr(_linalg, "lstsq", numpy_lstsq)
        patch.setattr(_linalg, "is_positive_definite", numpy_positive_definite)
        patch.setattr(_linalg, "eigvalsh", np.linalg.eigvalsh)
        patch.setattr(_linalg, "eigh", np.linalg.eigh)
        return mgda_weights(g, **kw).numpy()


def assert_min_norm_kkt(g: np.ndarray, w: np.ndarray) -> None:
    """w on the simplex with ``(Gw)_j >= wᵀGw`` for every j, equality where ``w_j > 0``, up
    to the rounding floor ``||g_j|| Σ_k w_k ||g_k||`` of ``(Gw)_j`` (times 1e-8)."""
    norms = np.sqrt(np.diag(g))
    assert (w >= 0).all() and abs(w.sum() - 1.0) < 1e-12
    slack = g @ w - w @ g @ w
    unit = 1e-8 * norms * (norms @ w) + 1e-300
    assert (slack >= -unit).all(), float((slack / unit).min())
    assert (np.abs(slack[w > 1e-12]) <= unit[w > 1e-12]).all()


@pytest.mark.parametrize("normalization", ["none", "l2"])
@pytest.mark.parametrize("case", list(ALL))
def test_mgda_at_100_tasks_matches_the_previous_solver(
    case: str, normalization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jac = ALL[case]
    g = gram(jac)
    new = mgda_weights(g, normalization=normalization).numpy()
    old = previous_mgda(monkeypatch, g, normalization=normalization)
    rows = jac
    if normalization == "l2":  # the solved problem: unit rows (a zero row stays zero)
        norms = np.linalg.norm(jac, axis=1)
        rows = jac / np.where(norms > 0, norms, 1.0)[:, None]
    g_solved = rows @ rows.T
    assert_min_norm_kkt(g_solved, new)
    # the min-norm point d = wᵀJ is unique (w is not where G is singular)
    d_new, d_old = new @ rows, old @ rows
    scale = np.sqrt(np.diag(g_solved)).max()
    assert np.abs(d_new - d_old).max() <= 1e-9 * scale
    if np.linalg.eigvalsh(g_solved)[0] > 1e-6 * np.linalg.eigvalsh(g_solved)[-1]:
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["random", "scales", "shared"])
def test_mgda_at_100_tasks_matches_quadprog(case: str) -> None:
    quadprog = pytest.importorskip("quadprog", reason="quadprog comes with the 'bench' extra")
    jac = ALL[case]
    if case == "scales":  # quadprog needs a well-conditioned G: solve on unit rows
        jac = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    g = jac @ jac.T
    constraints = np.hstack([np.ones((K, 1)), np.eye(K)])
    bounds = np.concatenate([[1.0], np.zeros(K)])
    reference = quadprog.solve_qp(g, np.zeros(K), constraints, bounds, meq=1)[0]
    mine = mgda_weights(torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(mine, np.maximum(reference, 0.0), rtol=0, atol=1e-8)
    assert mine @ g @ mine <= reference @ g @ reference * (1 + 1e-10)


# ---------------------------------------------------------------------- Aligned-MTL
def aligned_reference(jac: np.ndarray, pref: np.ndarray) -> np.ndarray:
    """``w = σ U_R S_R⁻¹ U_Rᵀ p`` from the SVD ``J = U S Vᵀ`` (the eigenvalues of G are S²)."""
    u, s, _ = np.linalg.svd(jac, full_matrices=False)
    lam = s**2
    keep = lam > lam.max() * K * EPS32
    u, s = u[:, keep], s[keep]
    return s.min() * (u / s) @ (u.T @ pref)


@pytest.mark.parametrize("case", list(ALL))
def test_aligned_mtl_at_100_tasks_matches_the_svd_of_the_jacobian(case: str) -> None:
    jac = ALL[case]
    pref = np.random.default_rng(3).uniform(0.5, 2.0, K)
    w = aligned_mtl_weights(gram(jac), torch.from_numpy(pref)).numpy()
    expected = aligned_reference(jac, pref)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-8 * np.abs(expected).max())
    np.testing.assert_allclose(
        w @ jac, expected @ jac, rtol=0, atol=1e-8 * np.abs(expected @ jac).max()
    )


# ---------------------------------------------------------------------- ConFIG
def config_reference(jac: np.ndarray, pref: np.ndarray) -> np.ndarray:
    """Eq. 2 from J: ``x = U⁺ŵ`` on the unit rows (a zero row stays zero), with U's
    singular values cut at ``sqrt(K eps32)`` σ_max (Ĝ = UUᵀ cut at ``K eps32`` λ_max)."""
    norms = np.linalg.norm(jac, axis=1, keepdims=True)
    units = jac / np.where(norms > 0, norms, 1.0)
    x = np.linalg.pinv(units, rcond=np.sqrt(K * EPS32)) @ pref
    unit = x / np.linalg.norm(x)
    return (jac @ unit).sum() * unit


@pytest.mark.parametrize("case", list(ALL))
def test_config_at_100_tasks_matches_the_pseudo_inverse_of_the_unit_rows(case: str) -> None:
    jac = ALL[case]
    pref = np.random.default_rng(4).uniform(0.5, 2.0, K)
    w, _ = config_weights(gram(jac), torch.from_numpy(pref))
    expected = config_reference(jac, pref)
    d = w.numpy() @ jac
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-8 * np.abs(expected).max())


# ---------------------------------------------------------------------- M-ConFIG
def test_m_config_at_100_tasks_matches_a_hand_loop_and_the_config_reference() -> None:
    """Seven tasks per step over 16 steps of changing Jacobians (every task seen from step
    15 on), no adaptive scaling: ``d`` is ConFIG's direction of the bias-corrected momenta."""
    rng = np.random.default_rng(5)
    beta, per_step = 0.9, 7
    balancer = MConFIG(K, per_step=per_step, beta1=beta, adaptive=False)
    momenta, counts = np.zeros((K, P)), np.zeros(K)
    scales = 10.0 ** rng.uniform(-2.0, 2.0, (K, 1))
    for step in range(16):
        jac = rng.standard_normal((K, P)) * scales
        subset = [(step * per_step + j) % K for j in range(per_step)]
        balancer.current_subset = subset
        direction, _ = balancer.aggregate(torch.from_numpy(jac), torch.ones(K, dtype=torch.float64))
        balancer.steps += 1
        momenta[subset] = beta * momenta[subset] + (1 - beta) * jac[subset]
        counts[subset] += 1
    hats = momenta / (1 - beta**counts)[:, None]
    expected = config_reference(hats, np.ones(K))
    d = direction.numpy()
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-8 * np.abs(expected).max())


# ---------------------------------------------------------------------- the thread pools
def test_the_k_by_k_factorizations_do_not_use_numpys_blas_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NumPy's BLAS has a thread pool of its own, outside ``torch.set_num_threads``; at
    K = 100 its factorizations stalled on a loaded machine. None of these methods calls it."""

    def refuse(*args, **kwargs):
        raise AssertionError("np.linalg called by a K×K solver")

    for name in ("svd", "eigh", "eigvalsh", "solve", "lstsq", "cholesky", "pinv", "eig"):
        monkeypatch.setattr(np.linalg, name, refuse)
    for case in ("random", "mixed"):
        g = gram(ALL[case])
        assert torch.isfinite(mgda_weights(g)).all()
        assert torch.isfinite(aligned_mtl_weights(g)).all()
        assert torch.isfinite(config_weights(g)[0]).all()
    balancer = MConFIG(K, per_step=K)
    direction, _ = balancer.aggregate(
        torch.from_numpy(ALL["random"]), torch.ones(K, dtype=torch.float64)
    )
    assert torch.isfinite(direction).all() and direction.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gramian_still_raises_in_the_direct_calls(bad: float) -> None:
    """Called directly (the balancers refuse a non-finite Gramian before), the eigensolver
    raises as NumPy's SVD did, rather than returning weights computed from NaN."""
    g = torch.eye(3, dtype=torch.float64)
    g[0, 1] = g[1, 0] = bad
    with pytest.raises(np.linalg.LinAlgError, match="NaN or inf"):
        aligned_mtl_weights(g)
    with pytest.raises(np.linalg.LinAlgError, match="NaN or inf"):
        config_weights(g)
