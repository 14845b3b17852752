"""DB-MTL (Lin et al., 2023): log-loss gradients, EMA, magnitudes equalised to the largest."""

from __future__ import annotations

import pytest
import torch
from _gradcheck import DEGENERATE_JACOBIANS, check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.db_mtl import DBMTL, magnitude_balance
from taskbalance.errors import BalancerUsageError, NonPositiveLossError

D = torch.float64


def test_hand_computed_without_ema() -> None:
    # β = 0: ĝ = g / L = ((3, 0), (0, ½)); norms 3 and ½, α = (1, 6), d = (3, 3),
    # recorded weights α / L = (1, 3) and indeed d = 1·g1 + 3·g2
    jac = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    d, w = DBMTL(2, beta=0.0).aggregate(jac, torch.tensor([1.0, 2.0], dtype=D))
    torch.testing.assert_close(d, torch.tensor([3.0, 3.0], dtype=D))
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], dtype=D))
    torch.testing.assert_close(w @ jac, d)


def test_hand_computed_ema() -> None:
    bal = DBMTL(2, beta=0.5)
    losses = torch.tensor([2.0, 1.0], dtype=D)
    j1 = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=D)
    d1, _ = bal.aggregate(j1, losses)
    # ĝ = ½ (0, 0) + ½ ((2, 0), (0, 1)) = ((1, 0), (0, ½)); α = (1, 2); d = (1, 1)
    torch.testing.assert_close(bal.buffer, torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=D))
    torch.testing.assert_close(d1, torch.tensor([1.0, 1.0], dtype=D))
    j2 = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=D)
    d2, w2 = bal.aggregate(j2, losses)
    # ĝ = ½ ((1, 0), (0, ½)) + ½ ((0, 1), (2, 0)) = ((½, ½), (1, ¼)); norms 1/sqrt(2), sqrt(17)/4
    g = torch.tensor([[0.5, 0.5], [1.0, 0.25]], dtype=D)
    torch.testing.assert_close(bal.buffer, g)
    top = 17**0.5 / 4
    torch.testing.assert_close(d2, top / 0.5**0.5 * g[0] + g[1])
    torch.testing.assert_close(w2, torch.tensor([top / 0.5**0.5 / 2, 1.0], dtype=D))
    assert bal.t == 2


def test_decaying_beta() -> None:
    # β_t = β / t^σ: with β = 0.8, σ = 1 the second step uses β_2 = 0.4
    bal = DBMTL(1, beta=0.8, beta_sigma=1.0)
    one = torch.ones(1, dtype=D)
    bal.aggregate(torch.tensor([[10.0]], dtype=D), one)
    assert float(bal.buffer) == pytest.approx(0.2 * 10)
    bal.aggregate(torch.tensor([[5.0]], dtype=D), one)
    assert float(bal.buffer) == pytest.approx(0.4 * 2 + 0.6 * 5)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 10), st.floats(0.0, 0.95))
def test_magnitudes_are_equalised_to_the_largest(seed: int, k: int, p: int, beta: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    bal = DBMTL(k, beta=beta)
    for _ in range(3):
        jac = torch.randn(k, p, generator=gen, dtype=D) * 10 ** (
            4 * torch.rand(k, 1, generator=gen, dtype=D) - 2
        )
        losses = 0.01 + torch.rand(k, generator=gen, dtype=D) * 5
        d, w = bal.aggregate(jac, losses)
    norms = bal.buffer.norm(dim=1)
    scaled = (w * losses).unsqueeze(1) * bal.buffer  # α_i ĝ_i
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((k,), float(norms.max()), dtype=D))
    torch.testing.assert_close(scaled.sum(dim=0), d)


def test_magnitude_balance_zero_rows() -> None:
    d, scales = magnitude_balance(torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=D))
    torch.testing.assert_close(scales, torch.tensor([1.0, 1.0], dtype=D))
    torch.testing.assert_close(d, torch.tensor([3.0, 4.0], dtype=D))
    d, scales = magnitude_balance(torch.zeros(2, 3))
    assert torch.equal(d, torch.zeros(3)) and torch.equal(scales, torch.ones(2))


@pytest.mark.parametrize("bad", [0.0, -1.5])
def test_non_positive_loss_raises_naming_the_task(bad: float) -> None:
    bal = DBMTL(["seg", "depth"])
    with pytest.raises(NonPositiveLossError, match="depth") as err:
        bal.aggregate(torch.eye(2), torch.tensor([1.0, bad]))
    assert err.value.task == "depth" and err.value.value == bad
    assert bal.buffer is None and bal.t == 0
    model, _, losses = losses_and_features(2, seed=0)
    with pytest.raises(NonPositiveLossError, match="'1'"):
        DBMTL(2).backward([losses[0], losses[1] * 0.0], shared=model.shared)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_permuting_tasks_permutes_the_weights(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=gen)
    a, b = DBMTL(k), DBMTL(k)
    for _ in range(3):
        jac = torch.randn(k, 5, generator=gen, dtype=D)
        losses = 0.1 + torch.rand(k, generator=gen, dtype=D)
        da, wa = a.aggregate(jac, losses)
        db, wb = b.aggregate(jac[perm], losses[perm])
        torch.testing.assert_close(wb, wa[perm])
        torch.testing.assert_close(db, da)


@pytest.mark.parametrize("jac", DEGENERATE_JACOBIANS)
def test_degenerate_gradients_give_finite_results(jac: torch.Tensor) -> None:
    bal = DBMTL(jac.shape[0])
    for _ in range(2):
        d, w = bal.aggregate(jac, torch.full((jac.shape[0],), 0.5))
        assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(w).all())
    if jac.shape[0] == 1:
        torch.testing.assert_close(w, torch.tensor([2.0]))  # α = 1, w = 1 / L


def test_end_to_end_exact_mode_and_no_features_mode() -> None:
    model, _, losses = losses_and_features(3, seed=2)
    body = list(model.shared.parameters())
    grads = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
    jac = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads])
    values = torch.stack([loss.detach() for loss in losses])
    buffer = 0.1 * jac / values.unsqueeze(1)  # first step, β = 0.9, empty EMA
    norms = buffer.norm(dim=1)
    direction = ((norms.max() / norms).unsqueeze(1) * buffer).sum(dim=0)
    heads = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, model.heads)
    ]
    model2, _, losses2 = losses_and_features(3, seed=2)
    bal = DBMTL(3, task_specific="weighted")
    w = bal.backward(losses2, shared=model2.shared)
    torch.testing.assert_close(w, norms.max() / norms / values)
    sizes = [p.numel() for p in body]
    for p, e in zip(model2.shared.parameters(), direction.split(sizes)):
        torch.testing.assert_close(p.grad.reshape(-1), e, rtol=1e-5, atol=1e-7)
    for h, g, wi in zip(model2.heads, heads, w):  # weighted: α_i ∇ log L_i
        for p, e in zip(h.parameters(), g):
            torch.testing.assert_close(p.grad, wi * e)
    _, z3, losses3 = losses_and_features(3, seed=2)
    with pytest.raises(BalancerUsageError, match="exact"):
        DBMTL(3).backward(losses3, shared=model2.shared, features=z3)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[DBMTL, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(3, seed=4)
        return DBMTL(3, beta_sigma=0.5), model, torch.optim.SGD(model.parameters(), lr=0.01)

    saved = check_resume(fresh, split=5, total=8)
    assert saved["bal"]["state"]["t"] == 5 and saved["bal"]["state"]["buffer"].shape == (3, 15)


def test_changed_shared_parameters_are_refused() -> None:
    bal = DBMTL(2)
    bal.aggregate(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(BalancerUsageError, match="shape"):
        bal.aggregate(torch.ones(2, 4), torch.ones(2))


def test_registered_and_validated() -> None:
    assert registry.get("db_mtl") is DBMTL and registry.get("dbmtl") is DBMTL
    bal = registry.make("DB-MTL", 2)
    assert (bal.beta, bal.beta_sigma, bal.needs, bal.modes) == (0.9, 0.0, "jacobian", ("exact",))
    with pytest.raises(ValueError, match="beta"):
        DBMTL(2, beta=1.0)
    with pytest.raises(ValueError, match="beta_sigma"):
        DBMTL(2, beta_sigma=-1.0)


def test_the_spare_buffer_follows_shape_dtype_and_device() -> None:
    """The K×P-state methods reuse a spare buffer only when it fits: a model moved to another
    device (here the meta device) or dtype gets a fresh one, never a write into the old."""
    from taskbalance.aggregation.base import spare_buffer

    spare = torch.zeros(2, 3)
    assert spare_buffer(spare, torch.ones(2, 3)) is spare
    assert spare_buffer(None, torch.ones(2, 3)).shape == (2, 3)
    for like in (
        torch.ones(3, 2),
        torch.ones(2, 3, dtype=torch.float64),
        torch.ones(2, 3, device="meta"),
    ):
        new = spare_buffer(spare, like)
        assert new is not spare
        assert (new.shape, new.dtype, new.device) == (like.shape, like.dtype, like.device)
