"""IMTL: gradient balance (IMTL-G), loss balance (IMTL-L) and the hybrid."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _gradcheck import check_engine, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_load
from taskbalance import registry
from taskbalance.aggregation.imtl import IMTL, IMTLL, imtl_g_weights
from taskbalance.errors import BalancerUsageError


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[logging.LogRecord]]:
    """Collect the warnings logged on the ``taskbalance`` logger inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("taskbalance")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def alphas(rows: list[list[float]]) -> np.ndarray:
    jac = torch.tensor(rows, dtype=torch.float64)
    return imtl_g_weights(jac @ jac.T).numpy()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1, 0], [0, 1]], [0.5, 0.5]),
        # u1=(1,0), u2=(0,1); d=(2a, 1-a): 2a = 1-a -> a = 1/3
        ([[2, 0], [0, 1]], [1 / 3, 2 / 3]),
        # d = a(1,0) + (1-a)(-1,1) = (2a-1, 1-a); d·u1 = d·u2 -> a = 2 - √2
        ([[1, 0], [-1, 1]], [2 - math.sqrt(2), math.sqrt(2) - 1]),
        # opposite gradients: d = 0 balances them (both projections are 0)
        ([[1, 0], [-1, 0]], [0.5, 0.5]),
        # three orthogonal gradients of norms 1, 2, 4: d·u_i = α_i |g_i| equal -> α ∝ (4, 2, 1)
        ([[1, 0, 0], [0, 2, 0], [0, 0, 4]], [4 / 7, 2 / 7, 1 / 7]),
    ],
)
def test_hand_computed(rows: list[list[float]], expected: list[float]) -> None:
    np.testing.assert_allclose(alphas(rows), expected, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_equal_projections_on_unit_gradients(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, k + 3)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    with warnings_logged() as records:
        a = imtl_g_weights(torch.from_numpy(jac @ jac.T)).numpy()
    assert records == []  # generic gradients: the paper's closed form, no fallback
    assert a.sum() == pytest.approx(1.0, abs=1e-12)
    d = a @ jac
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    proj = units @ d
    scale = np.abs(a) @ np.linalg.norm(jac, axis=1)
    assert proj.max() - proj.min() <= 1e-9 * scale
    # independent derivation: G α = c (|g_i|)_i, so α ∝ G⁻¹ (|g_i|)_i
    gram = jac @ jac.T
    ref = np.linalg.solve(gram, np.linalg.norm(jac, axis=1))
    np.testing.assert_allclose(a, ref / ref.sum(), rtol=1e-6, atol=1e-9)


def test_permuting_tasks_permutes_weights() -> None:
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(4, 7))
    perm = rng.permutation(4)
    a = imtl_g_weights(torch.from_numpy(jac @ jac.T)).numpy()
    ap = imtl_g_weights(torch.from_numpy(jac[perm] @ jac[perm].T)).numpy()
    np.testing.assert_allclose(ap, a[perm], atol=1e-10)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[3.0, 4.0]], [1.0]),
        ([[1.0, 2.0], [1.0, 2.0]], [0.5, 0.5]),  # duplicates: D Uᵀ singular
        ([[1.0, 2.0], [0.0, 0.0]], [1.0, 0.0]),  # a zero gradient gets weight 0
        ([[0.0, 0.0], [0.0, 0.0]], [0.5, 0.5]),  # nothing to balance: uniform
        ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.25, 0.25, 0.5]),  # duplicated pair + one
    ],
)
def test_degenerate_inputs_fall_back_with_a_warning(
    rows: list[list[float]], expected: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        a = alphas(rows)
    np.testing.assert_allclose(a, expected, atol=1e-12)
    assert ("IMTL-G" in caplog.text) == (len(rows) > 1)


@pytest.mark.parametrize("seed", [3, 15, 22, 31, 33])
def test_well_posed_problems_take_the_direct_solve(seed: int) -> None:
    """Full row rank, norms 1e-3..1e3, some α_i < 0: IMTL-G's linear system is solved
    directly and its answer passes the balance check (whose tolerance scales with
    Σ ||g_i|| |α_i|), so no "singular or ill-conditioned" warning is logged."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    jac = rng.normal(size=(k, k + 2)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    with warnings_logged() as records:
        a = imtl_g_weights(torch.from_numpy(jac @ jac.T)).numpy()
    assert records == []
    assert (a < 0).any() and a.sum() == pytest.approx(1.0)
    d = a @ jac
    proj = jac @ d / np.linalg.norm(jac, axis=1)  # d·u_i, equal for every task
    np.testing.assert_allclose(proj, proj[0], rtol=1e-7)


@pytest.mark.parametrize("features", [False, True])
def test_imtl_g_end_to_end(features: bool) -> None:
    w = check_engine(IMTL(3), imtl_g_weights, features=features)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("variant", ["l", "hybrid"])
def test_loss_scaled_variants_end_to_end(features: bool, variant: str) -> None:
    bal = IMTL(3, variant=variant, lr=0.1)  # type: ignore[arg-type]
    for step in range(3):
        scale = torch.exp(bal.log_scales.detach()).double()

        def reference(gram: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
            if variant == "l":
                return scale
            return imtl_g_weights(gram * scale[:, None] * scale[None, :]) * scale

        check_engine(bal, reference, features=features, seed=step)
        if step == 0:  # s starts at 0: the first step is plain IMTL-G / equal weights
            assert torch.equal(scale, torch.ones(3, dtype=torch.float64))
    assert not torch.equal(bal.log_scales.detach(), torch.zeros(3))  # s was stepped


def test_imtl_l_balances_the_scaled_losses() -> None:
    """Stationarity of e^s L - s in s gives e^{s_i} L_i = 1 for every task."""
    bal = IMTLL(2, lr=0.05)
    raw = [2.0, 0.25]
    for _ in range(600):
        losses = [torch.tensor(v, requires_grad=True) for v in raw]
        bal(losses).backward()
    s = bal.log_scales.detach()
    np.testing.assert_allclose(s.numpy(), [-math.log(2.0), math.log(4.0)], atol=2e-2)
    np.testing.assert_allclose(bal.last_weights.numpy(), [0.5, 4.0], rtol=5e-2)


def test_imtl_l_gradient_of_the_scales() -> None:
    bal = IMTLL(2, optimizer="external")
    with pytest.raises(BalancerUsageError):
        bal([torch.tensor(1.0, requires_grad=True)] * 2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    bal.attach(opt)
    losses = [torch.tensor(3.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)]
    total = bal(losses)
    assert float(total.detach()) == pytest.approx(3.5)  # e^0 (3 + 0.5) - 0
    total.backward()
    # d/ds (e^s L - s) = e^s L - 1 = L - 1 at s = 0; d/dL = e^s = 1
    np.testing.assert_allclose(bal.log_scales.grad.numpy(), [2.0, -0.5])
    assert float(losses[0].grad) == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ["l", "hybrid"])
def test_gradient_variants_step_the_scales_on_e_s_l_minus_s(variant: str) -> None:
    """IMTL's ``l`` and ``hybrid`` variants: backward leaves d/ds (e^s L - s) = L - 1 at s = 0
    in ``s.grad`` (for the user's optimizer)."""
    bal = IMTL(2, variant=variant, optimizer="external")  # type: ignore[arg-type]
    bal.attach(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    model, _, losses = losses_and_features(2, 0)
    values = torch.stack([loss.detach() for loss in losses])
    assert bool((values > 1.2).any() and (values != 1).all())
    bal.backward(losses, shared=model.shared)
    torch.testing.assert_close(bal.log_scales.grad, values - 1, rtol=1e-6, atol=1e-7)


def test_imtl_l_is_uncertainty_weighting_with_the_sign_of_s_flipped() -> None:
    """e^s L - s at s is e^-t L + t at t = -s: from s = 0, with Adam, the same weights."""
    imtl_l, uncertainty = IMTLL(3), registry.make("uncertainty", 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        values = torch.rand(3, generator=gen) * 5 + 0.1
        for bal in (imtl_l, uncertainty):
            bal([v.clone().requires_grad_() for v in values]).backward()
        torch.testing.assert_close(imtl_l.last_weights, uncertainty.last_weights)
    assert not torch.allclose(imtl_l.last_weights, torch.ones(3))  # the scales moved


def test_state_round_trip() -> None:
    bal = IMTL(2, variant="hybrid", lr=0.1)
    other = IMTL(2, variant="hybrid", lr=0.1)
    for step in range(2):
        check_engine(bal, lambda g: bal_weights(bal, g), features=True, num_tasks=2, seed=step)
    other.load_state_dict(save_load(bal.state_dict()))
    torch.testing.assert_close(other.log_scales.detach(), bal.log_scales.detach())
    assert IMTL(2).method_state() == {}


def bal_weights(bal: IMTL, gram: torch.Tensor) -> torch.Tensor:
    scale = torch.exp(bal.log_scales.detach()).double()
    return imtl_g_weights(gram * scale[:, None] * scale[None, :]) * scale


def test_external_optimizer_must_be_attached() -> None:
    bal = IMTL(3, variant="hybrid", optimizer="external")
    with pytest.raises(BalancerUsageError, match="attach"):
        check_engine(bal, imtl_g_weights, features=True)
    bal.attach(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    check_engine(bal, imtl_g_weights, features=True)  # s = 0: plain IMTL-G weights
    assert bal.log_scales.grad is not None  # accumulated for the user's optimizer


def test_arguments_and_registry() -> None:
    with pytest.raises(ValueError):
        IMTL(2, variant="x")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        _ = IMTL(2).log_scales
    assert registry.get("imtl") is IMTL
    assert registry.get("imtl_l") is IMTLL
    assert IMTLL.kind == "loss" and IMTL.kind == "gradient"
