"""DualProj: the mean gradient projected onto the dual cone (GEM's projection)."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from _gradcheck import (
    adversarial_jacobians,
    brute_box,
    check_engine,
    cone_projection_brute_force,
    conflict_scale,
    cross_check_jacobians,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, save_load, task_losses
from taskbalance.aggregation import dual_proj
from taskbalance.aggregation._dual_cone import project_dual_cone
from taskbalance.aggregation.dual_proj import DualProj, dualproj_weights
from taskbalance.aggregation.upgrad import upgrad_weights


def weights(rows: list[list[float]] | np.ndarray, **kw) -> np.ndarray:
    jac = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    return dualproj_weights(jac @ jac.T, **kw).numpy()


@pytest.mark.parametrize(
    ("rows", "expected", "direction"),
    [
        # no conflict: the mean is already in the dual cone
        ([[1, 0], [0, 1]], [0.5, 0.5], [0.5, 0.5]),
        # mean (0, 1/2) is orthogonal to g1: on the border, still in the cone
        ([[1, 0], [-1, 1]], [0.5, 0.5], [0.0, 0.5]),
        # g1 = (1,0), g2 = (-2,1): mean (-1/2, 1/2) conflicts with g1 (Gp = (-1/2, 3/2)).
        # w1 free: (Gw)_1 = w1 - 2 * 1/2 = 0 -> w = (1, 1/2), Gw = (0, 1/2) >= 0, d = (0, 1/2)
        ([[1, 0], [-2, 1]], [1.0, 0.5], [0.0, 0.5]),
        # opposite and equal: the mean is 0 already
        ([[1, 0], [-1, 0]], [0.5, 0.5], [0.0, 0.0]),
        # g2 = -2 g1: mean (-1/2, 0); w1 free: w1 - 2 * 1/2 = 0 -> w = (1, 1/2), d = 0
        ([[1, 0], [-2, 0]], [1.0, 0.5], [0.0, 0.0]),
        # K = 1, a zero row, all zero: nothing to project
        ([[3, 4]], [1.0], [3.0, 4.0]),
        ([[0, 0], [1, 1]], [0.5, 0.5], [0.5, 0.5]),
        ([[0, 0], [0, 0]], [0.5, 0.5], [0.0, 0.0]),
        # K = 3: g1 = (1,0), g2 = (0,1), g3 = (-2,0), Gp = (-1, 1, 2)/3: w1 free,
        # (Gw)_1 = w1 - 2/3 = 0 -> w = (2, 1, 1)/3, Gw = (0, 1/3, 0), d = (0, 1/3)
        ([[1, 0], [0, 1], [-2, 0]], [2 / 3, 1 / 3, 1 / 3], [0.0, 1 / 3]),
    ],
)
def test_hand_computed(rows: list[list[float]], expected: list[float], direction) -> None:
    w = weights(rows)
    np.testing.assert_allclose(w, expected, atol=1e-12)
    np.testing.assert_allclose(w @ np.asarray(rows, dtype=np.float64), direction, atol=1e-12)


def test_differs_from_upgrad_when_a_task_conflicts() -> None:
    """UPGrad projects each p_i g_i and sums; DualProj projects the sum once."""
    rows = [[1.0, 0.0], [-1.0, 1.0]]
    jac = torch.tensor(rows, dtype=torch.float64)
    np.testing.assert_allclose(upgrad_weights(jac @ jac.T).numpy(), [1.0, 0.75], atol=1e-12)
    np.testing.assert_allclose(weights(rows), [0.5, 0.5], atol=1e-12)


def primal_projection(jac: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The projection of ``target`` onto ``{x : Jx >= 0}`` found in the primal."""
    return cone_projection_brute_force(jac, target)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), p=st.integers(1, 6))
def test_direction_is_the_euclidean_projection_of_the_mean(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    d = weights(jac) @ jac
    expected = primal_projection(jac, jac.mean(axis=0))
    np.testing.assert_allclose(d, expected, atol=1e-8 * np.linalg.norm(jac, axis=1).max())


@pytest.mark.parametrize("jac", adversarial_jacobians(seed=6) + adversarial_jacobians(seed=7))
def test_never_conflicts_and_satisfies_the_kkt_conditions(jac: np.ndarray) -> None:
    gram = jac @ jac.T
    k = gram.shape[0]
    u = np.full(k, 1.0 / k)
    w = weights(jac)
    tol = 1e-7 * conflict_scale(jac, w)
    assert np.isfinite(w).all()
    assert (w >= u).all()
    assert (jac @ (w @ jac) >= -1e-8 * conflict_scale(jac, w)).all()  # g_i · d >= 0
    assert (gram @ w >= -tol).all()
    assert (np.abs(gram @ w)[w > u] <= tol[w > u]).all()  # complementary slackness
    best, wb = brute_box(gram, u)
    n = np.linalg.norm(jac, axis=1)
    floor = (n @ w) ** 2 + (n @ wb) ** 2 + k * 1e-15 * n.max() ** 2
    assert w @ gram @ w <= best + 1e-9 * floor


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8), p=st.integers(1, 6))
def test_the_mean_when_no_task_conflicts(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = np.abs(rng.normal(size=(k, p))) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    np.testing.assert_array_equal(weights(jac), np.full(k, 1.0 / k))  # exactly p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(1, 6))
def test_two_tasks_in_closed_form(seed: int, p: int) -> None:
    """K = 2: if (Gp)_1 = (G11 + G12)/2 < 0, w = (-G12 / (2 G11), 1/2), and symmetrically
    for task 2 (both cannot conflict: |G12| <= max(G11, G22)); else w = p."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(2, p)) * 10.0 ** rng.uniform(-3, 3, size=(2, 1))
    (g11, g12), (_, g22) = jac @ jac.T
    if g11 + g12 < 0:
        expected = [-g12 / (2 * g11), 0.5]
    elif g22 + g12 < 0:
        expected = [0.5, -g12 / (2 * g22)]
    else:
        expected = [0.5, 0.5]
    np.testing.assert_allclose(weights(jac), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_scale_free_and_permutation_equivariant(scale: float) -> None:
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(5, 4))
    w = weights(jac)
    np.testing.assert_allclose(weights(jac * np.sqrt(scale)), w, rtol=1e-9, atol=1e-12)
    perm = rng.permutation(5)
    np.testing.assert_allclose(weights(jac[perm]), w[perm], rtol=1e-9, atol=1e-12)


def test_preference_vector() -> None:
    rows = np.array([[1.0, 0.0], [-2.0, 1.0]])
    pref = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # p = e2: Jᵀp = g2 conflicts with g1 (G12 = -2 < 0): w1 = -G12 w2 / G11 = 2 -> (2, 1)
    np.testing.assert_allclose(weights(rows, pref=pref), [2.0, 1.0], atol=1e-12)


def projected_gradient(gram: np.ndarray, u: np.ndarray, steps: int = 20000) -> np.ndarray:
    """An independent slow solver of min vᵀGv s.t. v >= u (projected gradient)."""
    lip = np.linalg.eigvalsh(gram)[-1]
    v = u.copy()
    for _ in range(steps):
        v = np.maximum(v - (gram @ v) / lip, u)
    return v


def test_torchjd_conventions() -> None:
    rows = np.array([[1.0, 0.0], [-2.0, 1.0]])
    gram = rows @ rows.T
    reg = gram / np.trace(gram) + 1e-4 * np.eye(2)
    got = weights(rows, norm_eps=1e-4, reg_eps=1e-4)
    np.testing.assert_allclose(got, projected_gradient(reg, np.full(2, 0.5)), atol=1e-9)
    # the ridge moves d off the cone: g1 · d < 0 (about -6e-4), where the exact d has 0
    assert -7e-4 < (got @ rows)[0] < -5e-4
    assert (weights(rows) @ rows)[0] == pytest.approx(0.0, abs=1e-12)
    # a Gramian whose trace is below norm_eps is replaced by zero: the weights are p
    tiny = 1e-3 * rows
    np.testing.assert_allclose(weights(tiny, norm_eps=1e-4, reg_eps=1e-4), [0.5, 0.5])
    np.testing.assert_allclose(weights(tiny), [1.0, 0.5], atol=1e-12)  # exact: scale-free


def torchjd_cases() -> list[np.ndarray]:
    return [*cross_check_jacobians(11), np.array([[1.0, 0.0], [-2.0, 1.0]])]


@pytest.mark.parametrize("jac", torchjd_cases())
def test_matches_torchjd(jac: np.ndarray) -> None:
    """torchjd's DualProj (quadprog, norm_eps = reg_eps = 1e-4) against ours with the same
    conventions; the defaults (0, exact) differ from it by the ridge only."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    pytest.importorskip("quadprog", reason="torchjd's default projector needs quadprog")
    from torchjd.aggregation import DualProj as TorchjdDualProj

    j = torch.from_numpy(jac)
    theirs = TorchjdDualProj()(j).numpy()
    ours = weights(jac, norm_eps=1e-4, reg_eps=1e-4) @ jac
    scale = np.linalg.norm(jac, axis=1).max()
    np.testing.assert_allclose(ours, theirs, atol=1e-10 * scale)


@pytest.mark.parametrize("features", [False, True])
def test_end_to_end_through_the_engine(features: bool) -> None:
    check_engine(DualProj(3), lambda g: dualproj_weights(g), features=features)
    pref = [0.2, 0.3, 0.5]
    bal = DualProj(3, pref_vector=pref)
    check_engine(bal, lambda g: dualproj_weights(g, torch.tensor(pref).double()), features=features)


def test_a_fallback_is_logged_and_counted(monkeypatch, caplog) -> None:
    """With the exact passes disabled the projection falls back to projected gradient."""
    crippled = functools.partial(project_dual_cone, pdas=False, max_iter=0)
    monkeypatch.setattr(dual_proj, "project_dual_cone", crippled)
    bal = DualProj(2)
    gram = torch.tensor([[1.0, -2.0], [-2.0, 5.0]], dtype=torch.float64)  # g1=(1,0), g2=(-2,1)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(gram, torch.ones(2, dtype=torch.float64))
    assert bal.fallbacks == 1
    assert any("dual-cone projection" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(w.numpy(), [1.0, 0.5], atol=1e-6)
    bal.weights_from_gramian(torch.eye(2, dtype=torch.float64), torch.ones(2))  # no conflict
    assert bal.fallbacks == 1
    twin = DualProj(2)
    twin.load_state_dict(save_load(bal.state_dict()))
    assert twin.fallbacks == 1


def test_no_fallback_in_training() -> None:
    model = TinyNet(3)
    bal = DualProj(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        bal.backward(task_losses(model, step), shared=model.shared)
        opt.step()
    assert bal.fallbacks == 0 and bal.steps == 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"norm_eps": -1.0}, r"norm_eps and reg_eps must be >= 0.*torchjd uses 1e-4"),
        ({"reg_eps": float("nan")}, r"norm_eps and reg_eps must be >= 0"),
        ({"pref_vector": [1.0, 2.0]}, r"pref_vector must hold 3 finite numbers"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualProj(3, **kw)


def test_registered_by_name_and_alias() -> None:
    assert tb.get("dualproj") is DualProj
    assert tb.get("dual_proj") is DualProj
    assert tb.DualProj is DualProj and "dualproj" in tb.list_methods()


def test_default_is_exact_at_any_scale() -> None:
    """The defaults (norm_eps = reg_eps = 0) neither zero a tiny Gramian nor ridge it."""
    gram = torch.tensor([[1.0, -2.0], [-2.0, 5.0]], dtype=torch.float64)  # g1=(1,0), g2=(-2,1)
    for scale in (1e-8, 1.0):
        w = DualProj(2).weights_from_gramian(scale * gram, torch.ones(2, dtype=torch.float64))
        np.testing.assert_allclose(w.numpy(), [1.0, 0.5], atol=1e-12)
