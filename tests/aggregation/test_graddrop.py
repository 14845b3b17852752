"""GradDrop (Chen et al., NeurIPS 2020): per-coordinate gradient sign dropout."""

from __future__ import annotations

import pytest
import torch
from _gradcheck import DEGENERATE_JACOBIANS, check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.graddrop import GradDrop, graddrop, sign_purity

ZERO = torch.zeros(2, dtype=torch.float64)


def test_sign_purity_by_hand() -> None:
    jac = torch.tensor([[1.0, -2.0, 0.0, -1.0], [3.0, 1.0, 0.0, -4.0]])
    # column sums (4, -1, 0, -5), absolute sums (4, 3, 0, 5)
    expected = torch.tensor([1.0, 0.5 * (1 - 1 / 3), 0.5, 0.0])
    torch.testing.assert_close(sign_purity(jac), expected, rtol=0, atol=1e-7)


def test_masks_by_hand() -> None:
    jac = torch.tensor([[1.0, -2.0], [-3.0, 1.0]], dtype=torch.float64)
    # P = (½(1 - 2/4), ½(1 - 1/3)) = (0.25, 1/3); U = (0.2, 0.5):
    # column 0: U < P keeps the positive +1 (task 0) and drops -3 (task 1);
    # column 1: U >= P keeps the negative -2 (task 0) and drops +1 (task 1).
    direction, kept = graddrop(jac, torch.tensor([0.2, 0.5], dtype=torch.float64), ZERO)
    torch.testing.assert_close(direction, torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(kept, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # leak 1 for task 1 passes it through untouched; leak ½ keeps half of what is dropped
    leak = torch.tensor([0.0, 1.0], dtype=torch.float64)
    direction, kept = graddrop(jac, torch.tensor([0.2, 0.5], dtype=torch.float64), leak)
    torch.testing.assert_close(direction, torch.tensor([-2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(kept, torch.tensor([1.0, 1.0], dtype=torch.float64))
    half = torch.full((2,), 0.5, dtype=torch.float64)
    direction, kept = graddrop(jac, torch.tensor([0.2, 0.5], dtype=torch.float64), half)
    torch.testing.assert_close(direction, torch.tensor([1 - 1.5, -2 + 0.5], dtype=torch.float64))
    torch.testing.assert_close(kept, torch.tensor([1.0, 0.5], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 30))
def test_agreeing_signs_are_kept_exactly(seed: int, k: int, p: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(k, p, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(p, generator=gen) < 0.5, -1.0, 1.0).double()
    jac = magnitude * sign  # every column has one sign (some entries may be 0)
    uniform = torch.rand(p, generator=gen, dtype=torch.float64)
    direction, kept = graddrop(jac, uniform, torch.zeros(k, dtype=torch.float64))
    assert torch.equal(direction, jac.sum(dim=0))
    assert torch.equal(kept, torch.ones(k, dtype=torch.float64))


def test_expected_update_follows_the_purity() -> None:
    # one coordinate, g = (2, -1): P = ½(1 + 1/3) = 2/3, so E[d] = 2·(2/3) - 1·(1/3) = 1;
    # over 200k independent coordinates the mean is 1 ± 0.02 (6 standard deviations)
    n = 200_000
    jac = torch.tensor([[2.0], [-1.0]], dtype=torch.float64).expand(2, n)
    bal = GradDrop(2, seed=3)
    direction, kept = bal.aggregate(jac, torch.ones(2))
    assert float(direction.mean()) == pytest.approx(1.0, abs=0.02)
    assert set(direction.unique().tolist()) == {2.0, -1.0}  # one sign wins, never both/none
    assert float(kept[0]) == pytest.approx(2 / 3, abs=0.01)


def test_seeded_draws() -> None:
    jac = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    a, b, c = GradDrop(3, seed=1), GradDrop(3, seed=1), GradDrop(3, seed=2)
    for _ in range(3):
        da, wa = a.aggregate(jac, torch.ones(3))
        db, wb = b.aggregate(jac, torch.ones(3))
        dc, _ = c.aggregate(jac, torch.ones(3))
        assert torch.equal(da, db) and torch.equal(wa, wb) and not torch.equal(da, dc)


@pytest.mark.parametrize("jac", DEGENERATE_JACOBIANS)
def test_degenerate_gradients_give_finite_results(jac: torch.Tensor) -> None:
    direction, kept = GradDrop(jac.shape[0]).aggregate(jac, torch.ones(jac.shape[0]))
    assert bool(torch.isfinite(direction).all()) and bool(torch.isfinite(kept).all())
    assert bool(((kept >= 0) & (kept <= 1)).all())
    if jac.shape[0] == 1 or torch.equal(jac[0], jac[-1]):
        assert torch.equal(direction, jac.sum(dim=0))  # nothing to drop
    if not bool(jac[-1].any()):
        assert float(kept[-1]) == 1.0  # a zero gradient loses nothing


@pytest.mark.parametrize("features", [False, True])
def test_end_to_end_through_the_engine(features: bool) -> None:
    model, z, losses = losses_and_features(3, seed=1)
    body = list(model.shared.parameters())
    if features:
        rows = [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    else:
        grads = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
        rows = [torch.cat([g.reshape(-1) for g in row]) for row in grads]
    jac = torch.stack(rows)
    uniform = torch.rand(jac.shape[1], generator=torch.Generator().manual_seed(8))
    direction, kept = graddrop(jac, uniform, torch.zeros(3))
    if features:
        expected = torch.autograd.grad(z, body, direction.view_as(z), retain_graph=True)
    else:
        expected = [g.view_as(p) for g, p in zip(direction.split([p.numel() for p in body]), body)]
    heads = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, model.heads)
    ]

    model2, z2, losses2 = losses_and_features(3, seed=1)
    bal = GradDrop(3, seed=8)
    w = bal.backward(losses2, shared=model2.shared, features=z2 if features else None)
    assert bal.mode == ("features" if features else "exact")
    torch.testing.assert_close(w, kept)
    for p, e in zip(model2.shared.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    for h, grads in zip(model2.heads, heads):
        for p, e in zip(h.parameters(), grads):
            torch.testing.assert_close(p.grad, e)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[GradDrop, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(3, seed=2)
        return GradDrop(3, seed=6), model, torch.optim.SGD(model.parameters(), lr=0.05)

    check_resume(fresh, split=5, total=8)


def test_registered_and_validated() -> None:
    assert registry.get("graddrop") is GradDrop
    bal = registry.make("graddrop", 2, leak=[0.0, 1.0])
    assert bal.needs == "jacobian" and bal.leak.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="leak"):
        GradDrop(2, leak=1.5)
    with pytest.raises(ValueError, match="leak"):
        GradDrop(2, leak=[0.1, 0.2, 0.3])


def masked_graddrop(jac: torch.Tensor, uniform: torch.Tensor, leak: torch.Tensor):
    """The paper's rule with explicit K×P masks, coordinate by coordinate."""
    purity = 0.5 * (1 + jac.sum(0) / jac.abs().sum(0).clamp_min(1e-300))
    keep_positive = uniform < purity
    mask = torch.where(keep_positive, jac > 0, jac < 0).double()
    kept = (leak[:, None] + (1 - leak[:, None]) * mask) * jac
    total = jac.abs().sum(1)
    fraction = torch.where(total > 0, kept.abs().sum(1) / total.clamp_min(1e-300), 1.0)
    return kept.sum(0), fraction


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("leaky", [False, True])
def test_matches_the_masked_rule(seed: int, leaky: bool) -> None:
    """The mask-free sums equal the rule written with explicit masks (zeros included)."""
    gen = torch.Generator().manual_seed(seed)
    k, p = 2 + seed % 4, 500
    jac = torch.randn(k, p, generator=gen, dtype=torch.float64)
    jac[torch.rand(k, p, generator=gen) < 0.2] = 0.0  # zero entries
    jac[:, :7] = 0.0  # all-zero coordinates
    jac[seed % k] = 0.0 if seed % 3 == 0 else jac[seed % k]  # a zero task gradient
    leak = torch.rand(k, generator=gen, dtype=torch.float64) if leaky else torch.zeros(k).double()
    uniform = torch.rand(p, generator=gen, dtype=torch.float64)
    direction, fraction = graddrop(jac, uniform, leak)
    expected_d, expected_f = masked_graddrop(jac, uniform, leak)
    torch.testing.assert_close(direction, expected_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fraction, expected_f, rtol=1e-12, atol=1e-12)
