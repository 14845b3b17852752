"""PCD: the primary gradient projected onto {x : g_j · x >= 0}, rescaled to its norm."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from _gradcheck import (
    adversarial_jacobians,
    check_engine,
    cone_projection_brute_force,
    conflict_scale,
    cross_check_jacobians,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, save_load, task_losses
from taskbalance.aggregation import pcd
from taskbalance.aggregation._dual_cone import project_dual_cone
from taskbalance.aggregation.pcd import PCD, pcd_projection_weights, rescale_to_primary
from taskbalance.errors import TaskMismatchError

ONES = torch.ones


def weights(rows, primary: int = 0, rescale: bool = True) -> np.ndarray:
    jac = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    bal = PCD(jac.shape[0], primary=primary, rescale=rescale)
    return bal.weights_from_gramian(jac @ jac.T, ONES(jac.shape[0], dtype=torch.float64)).numpy()


R = 1.0 / np.sqrt(2.0)
S = 1.0 / np.sqrt(3.0)


@pytest.mark.parametrize(
    ("rows", "primary", "v", "d"),
    [
        # no conflict: g_p itself
        ([[1, 0], [0, 1]], 0, [1.0, 0.0], [1.0, 0.0]),
        ([[1, 0], [0, 1]], 1, [0.0, 1.0], [0.0, 1.0]),
        # g1=(1,0), g2=(-1,1): G12=-1 < 0, d* = g1 + g2/2 = (1/2, 1/2), rescaled to norm 1
        ([[1, 0], [-1, 1]], 0, [1.0, 0.5], [R, R]),
        # primary g2: d* = g2 - (G21/G11) g1 = (0, 1), rescaled to norm sqrt(2)
        ([[1, 0], [-1, 1]], 1, [1.0, 1.0], [0.0, np.sqrt(2.0)]),
        # g2 = -2 g1: d* = g1 + g2/2 = 0, the update is zero
        ([[1, 0], [-2, 0]], 0, [1.0, 0.5], [0.0, 0.0]),
        # K = 1, a zero secondary, a zero primary
        ([[3, 4]], 0, [1.0], [3.0, 4.0]),
        ([[1, 1], [0, 0]], 0, [1.0, 0.0], [1.0, 1.0]),
        ([[0, 0], [1, 1]], 0, [1.0, 0.0], [0.0, 0.0]),
        # K = 3: g1=(1,0,0), g2=(-1,1,0), g3=(-1,0,1); both active: -1 + 2a + b = 0 and
        # -1 + a + 2b = 0 -> a = b = 1/3, d* = (1/3, 1/3, 1/3), rescaled to norm 1
        ([[1, 0, 0], [-1, 1, 0], [-1, 0, 1]], 0, [1.0, 1 / 3, 1 / 3], [S, S, S]),
    ],
)
def test_hand_computed(rows, primary: int, v, d) -> None:
    jac = np.asarray(rows, dtype=np.float64)
    np.testing.assert_allclose(weights(rows, primary, rescale=False), v, atol=1e-12)
    np.testing.assert_allclose(weights(rows, primary) @ jac, d, atol=1e-12)


def primal_projection(jac: np.ndarray, primary: int) -> np.ndarray:
    """The projection of g_p onto ``{x : g_j · x >= 0, j != p}`` found in the primal."""
    others = [j for j in range(jac.shape[0]) if j != primary]
    return cone_projection_brute_force(jac, jac[primary], others)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), p=st.integers(1, 6))
def test_projection_is_the_closest_point_that_hurts_no_task(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    primary = int(rng.integers(k))
    d = weights(jac, primary, rescale=False) @ jac
    expected = primal_projection(jac, primary)
    np.testing.assert_allclose(d, expected, atol=1e-8 * np.linalg.norm(jac, axis=1).max())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), p=st.integers(1, 6))
def test_no_task_gets_worse_and_the_norm_is_the_primary_norm(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    primary = int(rng.integers(k))
    w = weights(jac, primary)
    d = w @ jac
    assert (jac @ d >= -1e-8 * conflict_scale(jac, w)).all()  # g_j · d >= 0, primary too
    if np.any(w):
        assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(jac[primary]), rel=1e-9)


@pytest.mark.parametrize("jac", adversarial_jacobians(seed=8) + adversarial_jacobians(seed=9))
def test_kkt_conditions(jac: np.ndarray) -> None:
    gram = jac @ jac.T
    k = gram.shape[0]
    for primary in range(k):
        e = np.eye(k)[primary]
        v = weights(jac, primary, rescale=False)
        tol = 1e-7 * conflict_scale(jac, v)
        assert np.isfinite(v).all() and (v >= e).all()
        assert (gram @ v >= -tol).all()  # no task conflicts with d*
        free = v > e
        assert (np.abs(gram @ v)[free] <= tol[free]).all()  # complementary slackness


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8), p=st.integers(1, 6))
def test_the_primary_gradient_when_it_conflicts_with_no_task(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = np.abs(rng.normal(size=(k, p))) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    primary = int(rng.integers(k))
    np.testing.assert_array_equal(weights(jac, primary), np.eye(k)[primary])  # exactly e_p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(2, 6))
def test_two_tasks_in_closed_form(seed: int, p: int) -> None:
    """K = 2, primary 1: d = g1 if G12 >= 0, else d* = g1 - (G12/G22) g2 rescaled by
    sqrt(G11 / (G11 - G12²/G22))."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(2, p)) * 10.0 ** rng.uniform(-3, 3, size=(2, 1))
    (g11, g12), (_, g22) = jac @ jac.T
    if g12 >= 0:
        expected = [1.0, 0.0]
    else:
        expected = np.array([1.0, -g12 / g22]) * np.sqrt(g11 / (g11 - g12 * g12 / g22))
    np.testing.assert_allclose(weights(jac), expected, rtol=1e-7, atol=1e-12)


def test_secondary_scales_do_not_matter() -> None:
    rng = np.random.default_rng(4)
    jac = rng.normal(size=(5, 4))
    d = weights(jac, 2) @ jac
    scaled = jac * np.array([[1e-3], [1e3], [1.0], [1e2], [1e-2]])
    np.testing.assert_allclose(weights(scaled, 2) @ scaled, d, rtol=1e-9, atol=1e-12)


def test_primary_by_name_and_index() -> None:
    rows = [[1.0, 0.0], [-1.0, 1.0]]
    jac = torch.tensor(rows, dtype=torch.float64)
    by_name = tb.make("pcd", tasks=["seg", "depth"], primary="depth", rescale=False)
    w = by_name.weights_from_gramian(jac @ jac.T, ONES(2, dtype=torch.float64))
    np.testing.assert_allclose(w.numpy(), [1.0, 1.0], atol=1e-12)  # primary g2, see above
    assert PCD(["seg", "depth"]).primary_index == 0
    assert PCD(3, primary="2").primary_index == 2
    assert "primary='depth'" in repr(by_name)


def torchjd_cases() -> list[np.ndarray]:
    conflicts = {1: (-2.0, 0.1), 3: (-0.5, 0.2)}
    return [*cross_check_jacobians(12, conflicts), np.array([[1.0, 0.0], [-1.0, 1.0]])]


@pytest.mark.parametrize("jac", torchjd_cases())
@pytest.mark.parametrize("primary", [0, 1])
def test_matches_torchjd(jac: np.ndarray, primary: int) -> None:
    """torchjd's PCD with tau = 0 (its primary is the first row) against ours."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from torchjd.aggregation import PCD as TORCHJD_PCD

    order = [primary] + [j for j in range(jac.shape[0]) if j != primary]
    theirs = TORCHJD_PCD(tau=0.0)(torch.from_numpy(jac[order])).numpy()
    ours = weights(jac, primary) @ jac
    scale = np.linalg.norm(jac[primary])
    np.testing.assert_allclose(ours, theirs, atol=1e-7 * scale + 1e-300)


@pytest.mark.parametrize(
    ("dtype", "expected"), [(torch.float64, [0.0, 1.0]), (torch.float32, [0, 0])]
)
def test_a_tiny_projection_is_zero_only_below_the_precision_of_j(dtype, expected) -> None:
    """g1 = (1, 1e-4), g2 = (-1, 0): d* = (0, 1e-4), ||d*||² = 1e-8 of its rounding scale 4.
    Exact in float64 (rescaled to norm ||g1||); below 10 eps32 of it in float32: zero."""
    jac = torch.tensor([[1.0, 1e-4], [-1.0, 0.0]], dtype=dtype)
    bal = PCD(2)
    direction, _ = bal.aggregate(jac, ONES(2, dtype=dtype))
    np.testing.assert_allclose(direction.double().numpy(), expected, atol=1e-7)
    assert bal.zero_steps == (dtype == torch.float32)
    torchjd = pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    theirs = torchjd.aggregation.PCD(tau=0.0)(jac).double().numpy()
    np.testing.assert_allclose(theirs, expected, atol=1e-7)


@pytest.mark.parametrize("features", [False, True])
def test_end_to_end_through_the_engine(features: bool) -> None:
    def expected(g: torch.Tensor, p: int) -> torch.Tensor:
        w = rescale_to_primary(g, pcd_projection_weights(g, p), p)
        return torch.zeros(3, dtype=torch.float64) if w is None else w

    check_engine(PCD(3), lambda g: expected(g, 0), features=features)
    check_engine(PCD(3, primary=2), lambda g: expected(g, 2), features=features)


def test_a_fallback_is_logged_and_counted(monkeypatch, caplog) -> None:
    """With the exact passes disabled the projection falls back to projected gradient."""
    crippled = functools.partial(project_dual_cone, pdas=False, max_iter=0)
    monkeypatch.setattr(pcd, "project_dual_cone", crippled)
    bal = PCD(2, rescale=False)
    gram = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)  # g1=(1,0), g2=(-1,1)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(gram, ONES(2, dtype=torch.float64))
    assert bal.fallbacks == 1
    assert any("dual-cone projection" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(w.numpy(), [1.0, 0.5], atol=1e-6)
    bal.weights_from_gramian(torch.eye(2, dtype=torch.float64), ONES(2))  # no conflict
    assert bal.fallbacks == 1
    twin = PCD(2, rescale=False)
    twin.load_state_dict(save_load(bal.state_dict()))
    assert twin.fallbacks == 1


def test_a_zero_update_is_logged_and_counted(caplog) -> None:
    bal = PCD(["main", "aux"])
    gram = torch.tensor([[1.0, -2.0], [-2.0, 4.0]], dtype=torch.float64)  # g2 = -2 g1
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        w = bal.weights_from_gramian(gram, ONES(2, dtype=torch.float64))
    assert w.tolist() == [0.0, 0.0] and bal.zero_steps == 1
    assert any("'main'" in r.getMessage() and "zero" in r.getMessage() for r in caplog.records)
    twin = PCD(["main", "aux"])
    twin.load_state_dict(save_load(bal.state_dict()))
    assert twin.zero_steps == 1


def test_no_fallback_in_training() -> None:
    model = TinyNet(3)
    bal = PCD(3, primary=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        bal.backward(task_losses(model, step), shared=model.shared)
        opt.step()
    assert bal.fallbacks == 0 and bal.steps == 3


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"primary": "cls"}, TaskMismatchError, r"primary='cls' is not a task.*\['seg', 'depth'"),
        ({"primary": 2}, ValueError, r"primary=2 is out of range for 2 tasks.*0\.\.1"),
        ({"primary": -1}, ValueError, r"primary=-1 is out of range"),
        ({"primary": True}, TypeError, r"primary must be a task name or an int index"),
        ({"primary": 0.0}, TypeError, r"primary must be a task name or an int index"),
        ({"rescale": 1}, TypeError, r"rescale must be True or False"),
    ],
)
def test_bad_arguments(kw: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PCD(["seg", "depth"], **kw)


def test_registered_by_name() -> None:
    assert tb.get("pcd") is PCD
    assert tb.PCD is PCD and "pcd" in tb.list_methods()
