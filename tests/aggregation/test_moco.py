"""MoCo (Fernando et al., ICLR 2023): tracked gradients, λ by projected gradient on the simplex."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gradcheck import DEGENERATE_JACOBIANS, brute_min_norm, check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.moco import MoCo, lambda_step
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, NonPositiveLossError

D = torch.float64


def bisect_projection(v: torch.Tensor) -> torch.Tensor:
    """Π_Δ(v) as max(v - θ, 0) with Σ = 1, θ found by bisection (independent of the code)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((v - mid).clamp(min=0).sum()) > 1 else (lo, mid)
    return (v - 0.5 * (lo + hi)).clamp(min=0)


def test_hand_computed_two_steps() -> None:
    # β = 0.5, γ = 1, ρ = 0.5, no decay; targets u_i = L_i g_i / ||g_i||
    bal = MoCo(2, beta=0.5, beta_sigma=0.0, gamma=1.0, gamma_sigma=0.0, rho=0.5)
    j1 = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=D)
    d1, w1 = bal.aggregate(j1, torch.tensor([2.0, 1.0], dtype=D))
    # u = ((1.2, 1.6), (0, 1)); y = u / 2 = ((0.6, 0.8), (0, 0.5))
    # YYᵀ + ½I = ((1.5, 0.4), (0.4, 0.75)); λ - Aλ = (-0.45, -0.075) -> Π_Δ = (0.3125, 0.6875)
    torch.testing.assert_close(bal.y, torch.tensor([[0.6, 0.8], [0.0, 0.5]], dtype=D))
    torch.testing.assert_close(bal.lam, torch.tensor([0.3125, 0.6875], dtype=D))
    torch.testing.assert_close(d1, torch.tensor([0.1875, 0.59375], dtype=D))
    torch.testing.assert_close(w1, torch.tensor([0.3125 * 2 / 5, 0.6875 * 1 / 2], dtype=D))
    j2 = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=D)
    d2, w2 = bal.aggregate(j2, torch.tensor([1.0, 3.0], dtype=D))
    # u = ((0, -1), (3, 0)); y = ((0.3, -0.1), (1.5, 0.25)); YYᵀ + ½I = ((0.6, .425), (.425,
    # 2.8125)); λ - Aλ = (-0.1671875, -1.37890625) -> Π_Δ = (1, 0): a vertex
    torch.testing.assert_close(bal.y, torch.tensor([[0.3, -0.1], [1.5, 0.25]], dtype=D))
    torch.testing.assert_close(bal.lam, torch.tensor([1.0, 0.0], dtype=D))
    torch.testing.assert_close(d2, torch.tensor([0.3, -0.1], dtype=D))
    torch.testing.assert_close(w2, torch.tensor([1.0, 0.0], dtype=D))
    assert bal.t == 2


def test_decaying_step_sizes() -> None:
    # β_t = β / t^σ: β = 0.8, σ = 1 tracks with 0.8 then 0.4
    bal = MoCo(1, beta=0.8, beta_sigma=1.0, normalize=False)
    bal.aggregate(torch.tensor([[10.0]], dtype=D), torch.ones(1, dtype=D))
    assert float(bal.y) == pytest.approx(8.0)
    bal.aggregate(torch.tensor([[5.0]], dtype=D), torch.ones(1, dtype=D))
    assert float(bal.y) == pytest.approx(0.6 * 8 + 0.4 * 5)
    # γ_t = γ / t^σ: G = diag(1, 0), γ = 0.2, σ = 1
    bal = MoCo(2, beta=1.0, gamma=0.2, gamma_sigma=1.0, normalize=False)
    jac = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D)
    bal.aggregate(jac, torch.ones(2, dtype=D))  # (0.5 - 0.1, 0.5) + 0.05
    torch.testing.assert_close(bal.lam, torch.tensor([0.45, 0.55], dtype=D))
    bal.aggregate(jac, torch.ones(2, dtype=D))  # (0.45 - 0.1·0.45, 0.55) + 0.0225
    torch.testing.assert_close(bal.lam, torch.tensor([0.4275, 0.5725], dtype=D))


@pytest.mark.parametrize("seed", range(8))
def test_without_tracking_lambda_converges_to_the_mgda_min_norm_point(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    jac = torch.randn(k, k + 3, generator=gen, dtype=D)
    jac = jac * 10 ** (2 * torch.rand(k, 1, generator=gen, dtype=D) - 1)
    gram = (jac @ jac.T).numpy()
    best, _ = brute_min_norm(gram)
    gamma = 1.0 / float(np.linalg.eigvalsh(gram)[-1])
    bal = MoCo(k, beta=1.0, gamma=gamma, gamma_sigma=0.0, normalize=False)
    for _ in range(3000):
        d, w = bal.aggregate(jac, torch.ones(k, dtype=D))
    lam = bal.lam.numpy()
    assert float(lam @ gram @ lam) == pytest.approx(best, rel=1e-6)
    # d is the min-norm point of the hull: ||d||² = min_Δ λᵀGλ and g_i·d >= ||d||² for all i
    torch.testing.assert_close(d, bal.lam @ jac)
    assert float(d @ d) == pytest.approx(best, rel=1e-6)
    assert bool((jac @ d >= (1 - 1e-4) * (d @ d)).all())
    assert torch.equal(w, bal.lam)  # β = 1 without normalisation: w = λ, d = wᵀJ


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(1, 8),
    st.floats(0.05, 1.0),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_direction_is_the_tracked_gradients_weighted_by_a_simplex_lambda(
    seed: int, k: int, p: int, beta: float, rho: float, normalize: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    bal = MoCo(k, beta=beta, beta_sigma=0.0, rho=rho, normalize=normalize)
    y = torch.zeros(k, p, dtype=D)
    for _ in range(4):
        jac = torch.randn(k, p, generator=gen, dtype=D) * 10 ** (
            4 * torch.rand(k, 1, generator=gen, dtype=D) - 2
        )
        losses = 0.01 + torch.rand(k, generator=gen, dtype=D) * 5
        d, w = bal.aggregate(jac, losses)
        target = jac * (losses / jac.norm(dim=1)).unsqueeze(1) if normalize else jac
        y = y + beta * (target - y)
        torch.testing.assert_close(bal.y, y)
        assert bool((bal.lam >= 0).all()) and float(bal.lam.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(d, bal.lam @ y)
        scale = losses / jac.norm(dim=1) if normalize else torch.ones(k, dtype=D)
        torch.testing.assert_close(w, bal.lam * scale)  # this step's share of g_i in d
    if normalize:  # each tracked row has norm at most max L
        assert bool((bal.y.norm(dim=1) <= 5.01 + 1e-9).all())


def test_lambda_step_is_a_projected_gradient_step() -> None:
    lam = torch.tensor([0.2, 0.3, 0.5], dtype=D)
    gram = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    # γ = ½: λ - ½ (G + I) λ = (-0.3, 0, 0.25); all three stay: θ = -0.35
    out = lambda_step(lam, gram, 0.5, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.35, 0.6], dtype=D))
    # γ = 1: λ - (G + I) λ = (-0.8, -0.3, 0); the first is cut: θ = -0.65
    out = lambda_step(lam, gram, 1.0, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.35, 0.65], dtype=D))


def test_normalised_update_does_not_depend_on_the_gradients_scale() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = MoCo(3), MoCo(3)
    for _ in range(3):
        jac = torch.randn(3, 6, generator=gen, dtype=D)
        losses = torch.rand(3, generator=gen, dtype=D) + 0.5
        da, wa = a.aggregate(jac, losses)
        db, wb = b.aggregate(jac * torch.tensor([[1e-3], [1.0], [1e3]], dtype=D), losses)
        torch.testing.assert_close(da, db)
        torch.testing.assert_close(wb * torch.tensor([1e-3, 1.0, 1e3], dtype=D), wa)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_permuting_tasks_permutes_the_weights(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=gen)
    a, b = MoCo(k), MoCo(k)
    for _ in range(3):
        jac = torch.randn(k, 5, generator=gen, dtype=D)
        losses = 0.1 + torch.rand(k, generator=gen, dtype=D)
        da, wa = a.aggregate(jac, losses)
        db, wb = b.aggregate(jac[perm], losses[perm])
        torch.testing.assert_close(wb, wa[perm])
        torch.testing.assert_close(db, da)


def test_negative_loss_raises_naming_the_task_and_zero_is_allowed() -> None:
    bal = MoCo(["seg", "depth"])
    with pytest.raises(NonPositiveLossError, match=r"depth.*-0\.5|normalize=False") as err:
        bal.aggregate(torch.eye(2), torch.tensor([1.0, -0.5]))
    assert err.value.task == "depth" and bal.y is None and bal.t == 0
    d, w = bal.aggregate(torch.eye(2), torch.tensor([1.0, 0.0]))
    assert float(w[1]) == 0.0 and bool(torch.isfinite(d).all())
    raw = MoCo(2, normalize=False)
    d, _ = raw.aggregate(torch.eye(2), torch.tensor([1.0, -0.5]))
    assert bool(torch.isfinite(d).all())
    model, _, losses = losses_and_features(2, seed=0)
    with pytest.raises(NonPositiveLossError, match="'1'"):
        MoCo(2).backward([losses[0], -losses[1]], shared=model.shared)


def test_non_finite_gradient_raises_naming_the_task_and_keeps_the_state() -> None:
    bal = MoCo(["a", "b"])
    bal.aggregate(torch.eye(2), torch.ones(2))
    y, lam = bal.y.clone(), bal.lam.clone()
    bad = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    with pytest.raises(NonFiniteGradientError, match="'b'") as err:
        bal.aggregate(bad, torch.ones(2))
    assert err.value.task == "b"
    assert torch.equal(bal.y, y) and torch.equal(bal.lam, lam) and bal.t == 1


@pytest.mark.parametrize("jac", DEGENERATE_JACOBIANS)
@pytest.mark.parametrize("normalize", [True, False])
def test_degenerate_gradients_give_finite_results(jac: torch.Tensor, normalize: bool) -> None:
    bal = MoCo(jac.shape[0], normalize=normalize)
    for _ in range(3):
        d, w = bal.aggregate(jac, torch.full((jac.shape[0],), 0.5))
        assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(w).all())
    if jac.shape[0] == 1:
        torch.testing.assert_close(bal.lam, torch.ones(1, dtype=D))


def test_end_to_end_exact_mode_and_no_features_mode() -> None:
    model, _, losses = losses_and_features(3, seed=2)
    body = list(model.shared.parameters())
    grads = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
    jac = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads])
    values = torch.stack([loss.detach() for loss in losses])
    y = 0.5 * jac * (values / jac.norm(dim=1)).unsqueeze(1)  # first step, β_1 = 0.5
    gram = (y @ y.T).double()
    lam = torch.full((3,), 1 / 3, dtype=D) - 0.1 * gram @ torch.full((3,), 1 / 3, dtype=D)
    lam = bisect_projection(lam)
    direction = lam.to(y) @ y
    model2, _, losses2 = losses_and_features(3, seed=2)
    w = MoCo(3).backward(losses2, shared=model2.shared)
    torch.testing.assert_close(w, (lam * values.double() / jac.norm(dim=1).double()).float())
    sizes = [p.numel() for p in body]
    for p, e in zip(model2.shared.parameters(), direction.split(sizes)):
        torch.testing.assert_close(p.grad.reshape(-1), e, rtol=1e-5, atol=1e-7)
    _, z3, losses3 = losses_and_features(3, seed=2)
    with pytest.raises(BalancerUsageError, match="exact"):
        MoCo(3).backward(losses3, shared=model2.shared, features=z3)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[MoCo, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(3, seed=4)
        return MoCo(3, rho=0.1), model, torch.optim.SGD(model.parameters(), lr=0.01)

    saved = check_resume(fresh, split=5, total=8)
    state = saved["bal"]["state"]
    assert state["t"] == 5 and state["y"].shape == (3, 15) and state["lam"].shape == (3,)


def test_changed_shared_parameters_are_refused() -> None:
    bal = MoCo(2)
    bal.aggregate(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(BalancerUsageError, match="shape"):
        bal.aggregate(torch.ones(2, 4), torch.ones(2))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"beta_sigma": -1.0}, "beta_sigma"),
        ({"gamma_sigma": float("nan")}, "gamma_sigma"),
        ({"rho": -0.1}, "rho"),
    ],
)
def test_bad_hyperparameters_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoCo(2, **kw)


def test_registered_with_the_defaults() -> None:
    assert registry.get("moco") is MoCo
    bal = registry.make("MoCo", 2)
    got = (bal.beta, bal.beta_sigma, bal.gamma, bal.gamma_sigma, bal.rho, bal.normalize)
    assert got == (0.5, 0.5, 0.1, 0.5, 0.0, True)
    assert (bal.needs, bal.modes) == ("jacobian", ("exact",))


@pytest.mark.parametrize("name", ["beta_sigma", "gamma_sigma", "rho"])
def test_infinite_decays_and_ridge_are_refused(name: str) -> None:
    # σ = ∞ would make every step size 0 after the first step, ρ = ∞ an infinite λ step
    with pytest.raises(ValueError, match=f"{name} must be non-negative and finite"):
        MoCo(2, **{name: float("inf")})
