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


def weights(rows, primary: int = 0, rescale: bool = True, tau: float = 0.0) -> np.ndarray:
    """One step of PCD on ``rows`` (tau = 0 unless given: the cone projection)."""
    jac = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    bal = PCD(jac.shape[0], primary=primary, rescale=rescale, tau=tau)
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
    scaled = jac * np.array([[1e-3], [1e3], [1.0], [1e2], [1e-2]])
    for tau in (0.0, 0.3):  # tau > 0: the normalisation makes the margins scale-free too
        d = weights(jac, 2, tau=tau) @ jac
        np.testing.assert_allclose(weights(scaled, 2, tau=tau) @ scaled, d, rtol=1e-6)


def test_primary_by_name_and_index() -> None:
    rows = [[1.0, 0.0], [-1.0, 1.0]]
    jac = torch.tensor(rows, dtype=torch.float64)
    by_name = tb.make("pcd", tasks=["seg", "depth"], primary="depth", rescale=False, tau=0.0)
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
def test_matches_torchjd_without_margin(jac: np.ndarray, primary: int) -> None:
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
    bal = PCD(2, tau=0.0)
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

    check_engine(PCD(3, tau=0.0), lambda g: expected(g, 0), features=features)
    check_engine(PCD(3, primary=2, tau=0.0), lambda g: expected(g, 2), features=features)


def test_a_fallback_is_logged_and_counted(monkeypatch, caplog) -> None:
    """With the exact passes disabled the projection falls back to projected gradient."""
    crippled = functools.partial(project_dual_cone, pdas=False, max_iter=0)
    monkeypatch.setattr(pcd, "project_dual_cone", crippled)
    bal = PCD(2, rescale=False, tau=0.0)
    gram = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)  # g1=(1,0), g2=(-1,1)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(gram, ONES(2, dtype=torch.float64))
    assert bal.fallbacks == 1
    assert any("dual-cone projection" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(w.numpy(), [1.0, 0.5], atol=1e-6)
    bal.weights_from_gramian(torch.eye(2, dtype=torch.float64), ONES(2))  # no conflict
    assert bal.fallbacks == 1
    twin = PCD(2, rescale=False, tau=0.0)
    twin.load_state_dict(save_load(bal.state_dict()))
    assert twin.fallbacks == 1


def test_a_zero_update_is_logged_and_counted(caplog) -> None:
    bal = PCD(["main", "aux"], tau=0.0)
    gram = torch.tensor([[1.0, -2.0], [-2.0, 4.0]], dtype=torch.float64)  # g2 = -2 g1
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        w = bal.weights_from_gramian(gram, ONES(2, dtype=torch.float64))
    assert w.tolist() == [0.0, 0.0] and bal.zero_steps == 1
    assert any("'main'" in r.getMessage() and "zero" in r.getMessage() for r in caplog.records)
    twin = PCD(["main", "aux"], tau=0.0)
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
        ({"tau": 1.5}, ValueError, r"tau must be a number in \[0, 1\] or 1 such number"),
        ({"tau": [0.1, 0.2]}, ValueError, r"one per secondary task.*without 'seg'"),
        ({"beta": 1.0}, ValueError, r"beta in \[0, 1\)"),
    ],
)
def test_bad_arguments(kw: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PCD(["seg", "depth"], **kw)


def test_registered_by_name() -> None:
    assert tb.get("pcd") is PCD
    assert tb.PCD is PCD and "pcd" in tb.list_methods()


# ---------------------------------------------------------------------- the margin tau


def test_margin_hand_computed() -> None:
    """g1 = (1, 0), g2 = (-1, 1) (unit ĝ2 = (-1, 1)/√2 after the first step's
    normalisation, eps = 0), tau = 0.5: the constraint ĝ2·d >= 0.5 is active, d = ĝ1 + μ ĝ2
    with -1/√2 + μ = 0.5, so d̃ = (1 - μ/√2, μ/√2) = (0.14645, 0.85355), ||d̃||² = 0.75;
    rescaled to ||g1|| = 1: d = d̃ / √0.75."""
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    bal = PCD(2, tau=0.5, eps=0.0)
    w = bal.weights_from_gramian(jac @ jac.T, ONES(2, dtype=torch.float64))
    mu = 0.5 + R
    expected = np.array([1 - mu * R, mu * R]) / np.sqrt(0.75)
    np.testing.assert_allclose((w @ jac).numpy(), expected, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 6), tau=st.floats(0.01, 0.5))
def test_margin_kkt_each_secondary_gains_its_share(seed: int, k: int, tau: float) -> None:
    """Over a few steps: g̃_j·d̃ >= tau ||g̃_j||² for every secondary (the primary may lose),
    equality where the multiplier is positive, and ||d|| = ||g_p||."""
    rng = np.random.default_rng(seed)
    bal = PCD(k, primary=int(rng.integers(k)), tau=tau)
    p = bal.primary_index
    for _ in range(3):
        jac = rng.normal(size=(k, 3 + k)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
        w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES(k)).numpy()
        if bal.infeasible_steps or not w.any():
            return  # dropped constraints (logged): the update is g_p (tested below)
        s = 1.0 / np.sqrt(bal._sq_norm_ema / (1 - bal.beta**bal._ema_steps) + bal.eps)
        normalised = jac * s[:, None]
        d = w @ jac
        mu = w / s * s[p] / w[p]  # the multipliers, w̃ = μ with w̃_p = 1
        d_tilde = mu @ normalised
        slack = normalised @ d_tilde - tau * (normalised**2).sum(axis=1)
        scale = 1e-7 * (np.abs(mu).sum() + 1)
        rest = np.arange(k) != p
        assert (slack[rest] >= -scale).all()
        assert (np.abs(slack[rest & (mu > 1e-9)]) <= scale).all()
        assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(jac[p]), rel=1e-9)


def test_margin_infeasible_constraints_are_dropped_logged_and_counted(caplog) -> None:
    """Secondaries (0, 1) and (0, -1) with tau > 0 need d_y >= 0.1 and -d_y >= 0.1."""
    jac = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    bal = PCD(["main", "up", "down"], tau=0.1)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(jac @ jac.T, ONES(3, dtype=torch.float64))
    np.testing.assert_allclose((w @ jac).numpy(), [1.0, 0.0], atol=1e-12)
    assert bal.infeasible_steps == 1
    assert any(
        "cannot all hold" in r.getMessage() and "'main'" in r.getMessage() for r in caplog.records
    )


def test_margin_per_task_tau_and_state_round_trip() -> None:
    rng = np.random.default_rng(3)
    a = PCD(3, primary=1, tau=[0.0, 0.4])  # tau for tasks 0 and 2
    assert a.tau.tolist() == [0.0, 0.0, 0.4]
    jacs = [rng.normal(size=(3, 4)) * [[1.0], [10.0], [0.1]] for _ in range(5)]
    for jac in jacs[:3]:
        a.weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES(3))
    b = PCD(3, primary=1, tau=[0.0, 0.4])
    b.load_state_dict(save_load(a.state_dict()))
    for jac in jacs[3:]:
        gram = torch.from_numpy(jac @ jac.T)
        assert torch.equal(
            a.weights_from_gramian(gram, ONES(3)), b.weights_from_gramian(gram, ONES(3))
        )
    fresh = PCD(3, primary=1, tau=[0.0, 0.4])  # without the moving average: another step
    gram = torch.from_numpy(jacs[4] @ jacs[4].T)
    assert not torch.allclose(
        fresh.weights_from_gramian(gram, ONES(3)), a.weights_from_gramian(gram, ONES(3))
    )


@pytest.mark.parametrize("primary", [0, 2])
def test_matches_torchjd_with_its_default_margin(primary: int) -> None:
    """torchjd's PCD (tau = 0.02, beta = 0.999, eps = 1e-8, primary = first row) against
    ours over 6 calls, so that the moving average of the squared norms matters."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from torchjd.aggregation import PCD as TORCHJD_PCD

    rng = np.random.default_rng(11 + primary)
    theirs_agg, ours_bal = TORCHJD_PCD(), PCD(4, primary=primary)
    order = [primary] + [j for j in range(4) if j != primary]
    for step in range(6):
        jac = rng.normal(size=(4, 7)) * 10.0 ** rng.uniform(-2, 2, size=(4, 1))
        jac[order[1]] -= 1.5 * jac[primary]  # a conflicting secondary
        theirs = theirs_agg(torch.from_numpy(jac[order])).numpy()
        ours = ours_bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES(4)).numpy() @ jac
        scale = np.linalg.norm(jac[primary])
        np.testing.assert_allclose(ours, theirs, atol=1e-7 * scale, err_msg=f"step {step}")


def test_margin_qp_fallback_is_logged_and_counted(monkeypatch, caplog) -> None:
    from taskbalance.aggregation import _margin_qp

    monkeypatch.setattr(_margin_qp, "nonnegative_qp", lambda a, q, cap: np.zeros(q.shape))
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    bal = PCD(2, tau=0.5, eps=0.0)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        w = bal.weights_from_gramian(jac @ jac.T, ONES(2, dtype=torch.float64))
    assert bal.fallbacks == 1
    assert any("PCD margin problem" in r.getMessage() for r in caplog.records)
    mu = 0.5 + R
    expected = np.array([1 - mu * R, mu * R]) / np.sqrt(0.75)
    np.testing.assert_allclose((w @ jac).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_the_zero_test_does_not_depend_on_the_gradients_scale(scale: float) -> None:
    # g1 = c (1, 0), g2 = c (-1, 1): d* = c (1/2, 1/2) whatever c, rescaled to ||g1||, so
    # v = (1, 1/2) / sqrt(1/2) at every scale (the threshold is relative to ||d*||'s rounding)
    got = weights(scale * np.array([[1.0, 0.0], [-1.0, 1.0]]))
    np.testing.assert_allclose(got, np.array([1.0, 0.5]) * np.sqrt(2.0), rtol=1e-12)


def test_the_precision_of_a_float64_j_does_not_leak_into_the_next_gramian_call() -> None:
    """After an exact-mode step on a float64 J, a Gramian handed over directly (the
    Gramian and features modes: J's dtype unknown) is judged at float32 precision again:
    g1 = (1, 1e-4), g2 = (-1, 0) give ||d*||² = 1e-8 of its rounding scale 4, zero there."""
    jac = torch.tensor([[1.0, 1e-4], [-1.0, 0.0]], dtype=torch.float64)
    bal = PCD(2, tau=0.0)
    direction, _ = bal.aggregate(jac, ONES(2, dtype=torch.float64))
    assert bal.zero_steps == 0 and float(direction.norm()) > 0
    w = bal.weights_from_gramian(jac @ jac.T, ONES(2, dtype=torch.float64))
    assert w.tolist() == [0.0, 0.0] and bal.zero_steps == 1


def test_first_margin_step_with_gradients_at_the_scale_of_eps_by_hand() -> None:
    """The bias-corrected average of the first step is ||g_i||² itself, so s_i =
    1/sqrt(||g_i||² + eps). g1 = (1e-4, 0), g2 = (0, 2e-4), eps = 1e-8: s1 = 1/sqrt(2e-8),
    s2 = 1/sqrt(5e-8); normalised squared norms 1/2 and 4/5, orthogonal; margin
    τ·4/5 = 0.4 with τ = 1/2 gives μ = 0.4/0.8 = 1/2, v = (1, μ s2/s1) = (1, sqrt(0.1)),
    vᵀJ = (1e-4, 2e-4 sqrt(0.1)) of norm 1e-4 sqrt(1.4), rescaled to ||g1|| = 1e-4."""
    jac = torch.tensor([[1e-4, 0.0], [0.0, 2e-4]], dtype=torch.float64)
    bal = PCD(2, tau=0.5, eps=1e-8)
    w = bal.weights_from_gramian(jac @ jac.T, ONES(2, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(w, np.array([1.0, np.sqrt(0.1)]) / np.sqrt(1.4), rtol=1e-10)


def test_steps_without_a_margin_keep_the_average_a_margin_step_would() -> None:
    # the squared-norm average advances on τ = 0 steps too, so a state saved without a
    # margin and loaded with one gives what a run with the margin all along gives: here
    # the first step's ||g_2||² = 0.25 < 1 and the second step's scales depend on it
    first = torch.diag(torch.tensor([4.0, 0.25], dtype=torch.float64))
    second = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    losses = ONES(2, dtype=torch.float64)
    plain = PCD(2, tau=0.0)
    plain.weights_from_gramian(first, losses)
    resumed = PCD(2, tau=0.5)
    resumed.load_method_state(plain.method_state())
    always = PCD(2, tau=0.5)
    always.weights_from_gramian(first, losses)
    torch.testing.assert_close(
        resumed.weights_from_gramian(second, losses), always.weights_from_gramian(second, losses)
    )


def test_margin_kkt_check_by_hand() -> None:
    # min_{μ >= 0} ½ μ² + qμ: with q = 0 the answer is μ = 0; μ = ½ is feasible with slack
    # ½ > 0, which complementarity (slack = 0 where μ > 0) must reject, at any μ > 0
    from taskbalance.aggregation._margin_qp import kkt_holds

    a = np.array([[1.0]])
    assert kkt_holds(a, np.array([0.0]), np.array([0.0]), 1.0)
    for mu in (0.5, 2.0):
        assert not kkt_holds(a, np.array([0.0]), np.array([mu]), 1.0)
    assert kkt_holds(a, np.array([-0.5]), np.array([0.5]), 1.0)  # slack 0 at μ = ½
    assert not kkt_holds(a, np.array([-1.0]), np.array([0.0]), 1.0)  # slack -1 < 0


def test_homogeneous_margin_constraints_are_always_feasible() -> None:
    # b = 0: d = 0 satisfies g_j · d >= 0 for any gradients, even two opposite ones; with a
    # positive margin on both opposite gradients no d can gain on both (Farkas)
    from taskbalance.aggregation._margin_qp import infeasible

    opposite = np.array([[1.0, -1.0], [-1.0, 1.0]])
    assert not infeasible(opposite, np.zeros(2))
    assert infeasible(opposite, np.array([0.1, 0.1]))
    assert not infeasible(np.eye(2), np.array([0.1, 0.1]))
