"""SDMGrad and SDMGrad-OS (Xiao, Ban, Ji, NeurIPS 2023), and the engine's task-subset hook."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import ClassVar

import numpy as np
import pytest
import torch
from _gradcheck import check_engine, check_resume
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import taskbalance as tb
from conftest import TinyNet, batch
from taskbalance import registry
from taskbalance.aggregation.mgda import MGDA
from taskbalance.aggregation.sdmgrad import SDMGrad
from taskbalance.aggregation.sdmgrad_os import SDMGradOS
from taskbalance.errors import BalancerUsageError, SolverError

D = torch.float64


def gram(rows: np.ndarray) -> torch.Tensor:
    jac = torch.as_tensor(rows, dtype=D)
    return jac @ jac.T


def random_rows(seed: int, k: int, p: int, spread: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-spread, spread, size=(k, 1))


# ---------------------------------------------------------------------- SDMGrad
def test_hand_computed_one_inner_step() -> None:
    # G = diag(1, 4): mean norm 1.5, Ĝ = G / 2.25. From w = (½, ½), λ = 0.3, the step is
    # Ĝ (w + λ/2) = (0.65, 2.6) / 2.25; lr 0.1 gives (0.471111, 0.384444), sum 0.855556,
    # projected by adding 0.072222: w = (0.543333, 0.456667); weights (w + 0.15) / 1.3.
    bal = SDMGrad(2, niter=1, lr=0.1)
    weights = bal.weights_from_gramian(torch.diag(torch.tensor([1.0, 4.0], dtype=D)), None)
    np.testing.assert_allclose(bal.w.numpy(), [0.5433333, 0.4566667], atol=1e-6)
    np.testing.assert_allclose(weights.numpy(), [0.6933333 / 1.3, 0.6066667 / 1.3], atol=1e-6)
    # lr 10 overshoots to the vertex (1, 0): weights (1.15, 0.15) / 1.3
    big = SDMGrad(2, niter=1, lr=10.0)
    weights = big.weights_from_gramian(torch.diag(torch.tensor([1.0, 4.0], dtype=D)), None)
    np.testing.assert_allclose(weights.numpy(), [1.15 / 1.3, 0.15 / 1.3], atol=1e-12)
    # the warm start: the next step starts from the w just found
    np.testing.assert_allclose(big.w.numpy(), [1.0, 0.0])
    summed = SDMGrad(2, niter=1, lr=10.0, reduction="sum")
    out = summed.weights_from_gramian(torch.diag(torch.tensor([1.0, 4.0], dtype=D)), None)
    np.testing.assert_allclose(out.numpy(), [2.3 / 1.3, 0.3 / 1.3], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_large_lambda_gives_the_mean_gradient(seed: int, k: int) -> None:
    g = gram(random_rows(seed, k, 7))
    np.testing.assert_allclose(SDMGrad(k, lam=float("inf")).weights_from_gramian(g, None), 1 / k)
    weights = SDMGrad(k, lam=1e9).weights_from_gramian(g, None).numpy()
    np.testing.assert_allclose(weights, np.full(k, 1.0 / k), rtol=1e-8, atol=0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4))
def test_lambda_zero_converges_to_the_min_norm_point(seed: int, k: int) -> None:
    # λ = 0: min over the simplex of ½||g_w||², MGDA's problem. The KKT conditions of the
    # min-norm point d: g_i·d >= ||d||² for every task, with equality where w_i > 0.
    # Many plain steps of size 1/L (L: the largest eigenvalue of the normalised Gramian).
    rows = random_rows(seed, k, 8, spread=0.3)
    g = gram(rows)
    mean_norm = float(np.linalg.norm(rows, axis=1).mean())
    lr = mean_norm**2 / float(np.linalg.eigvalsh(g.numpy()).max())
    bal = SDMGrad(k, lam=0.0, niter=20000, lr=lr, momentum=0.0)
    weights = bal.weights_from_gramian(g, None).numpy()
    assert weights.min() >= 0 and abs(weights.sum() - 1) < 1e-12
    d = weights @ rows
    sq = float(d @ d)
    products = rows @ d
    scale = float(np.abs(g.numpy()).max())
    assert products.min() >= sq - 1e-6 * scale
    np.testing.assert_allclose(products[weights > 1e-6], sq, atol=1e-6 * scale)
    mgda = MGDA(k).weights_from_gramian(g, None).numpy() @ rows
    np.testing.assert_allclose(d, mgda, atol=1e-5 * np.sqrt(scale))


def test_lambda_moves_the_direction_from_mgda_to_the_mean() -> None:
    # d = Σ v_i g_i with v = (w + λ/K)/(1 + λ): the min-norm point over the simplex cut to
    # v_i >= λ/(K(1 + λ)). Here MGDA's v = (7/39, 32/39) (g1·d = g2·d) is inside that set
    # for λ = 0.3 (bound 0.115) and outside for λ = 1 (bound 1/4: v = (1/4, 3/4)).
    rows = np.array([[2.0, 0.0], [-0.4, 0.3]])
    expected = {0.0: 7 / 39, 0.3: 7 / 39, 1.0: 0.25, 10.0: 5 / 11}
    for lam, v1 in expected.items():
        v = SDMGrad(2, lam=lam, niter=500, lr=1.0).weights_from_gramian(gram(rows), None)
        np.testing.assert_allclose(v.numpy(), [v1, 1 - v1], atol=1e-9)


def test_zero_gradients_keep_w_and_give_zero() -> None:
    bal = SDMGrad(3)
    weights = bal.weights_from_gramian(torch.zeros(3, 3, dtype=D), None)
    np.testing.assert_allclose(bal.w.numpy(), 1 / 3)
    assert bool(torch.isfinite(weights).all())


@pytest.mark.parametrize("features", [False, True])
def test_engine_applies_the_weights(features: bool) -> None:
    seen = []

    def expected(g: torch.Tensor) -> torch.Tensor:
        ref = SDMGrad(3)
        w = ref.weights_from_gramian(g.double(), None)
        seen.append(w)
        return w.to(g.dtype)

    w = check_engine(SDMGrad(3), expected, features=features)
    torch.testing.assert_close(w, seen[0].to(w.dtype))


def test_sdmgrad_state_round_trip() -> None:
    def fresh():
        model = TinyNet(3, seed=4)
        return SDMGrad(3, niter=3), model, torch.optim.SGD(model.parameters(), lr=0.05)

    saved = check_resume(fresh, split=3, total=6)
    assert saved["bal"]["state"]["w"].shape == (3,)


def test_sdmgrad_validation() -> None:
    assert registry.get("sdmgrad") is SDMGrad
    for kw, match in [
        ({"lam": -0.1}, "lam"),
        ({"niter": -1}, "niter"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"reduction": "max"}, "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            SDMGrad(2, **kw)


# ---------------------------------------------------------------------- SDMGrad-OS
def draw(bal: SDMGradOS, g: torch.Tensor) -> tuple[list[int] | None, np.ndarray]:
    """One step of the method without the engine: the subset, then the solve."""
    subset = bal._draw_subset()
    return subset, bal.gramian_weights(g, torch.ones(bal.num_tasks, dtype=D)).numpy()


def test_subsets_are_uniform() -> None:
    k, n, draws = 5, 2, 4000
    bal = SDMGradOS(k, n=n, niter=0)
    g = gram(random_rows(0, k, 4, spread=0.0))
    counts = Counter(tuple(draw(bal, g)[0]) for _ in range(draws))
    assert set(counts) == set(itertools.combinations(range(k), n))  # all 10 subsets
    expected = draws / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_estimator_is_unbiased_over_the_draws() -> None:
    # with w fixed (niter = 0) every draw weights task i by (K/n)(w_i + λ/K)/(1 + λ) if
    # sampled, else 0: the mean over the draws is SDMGrad's weights (w_i + λ/K)/(1 + λ).
    k, n, lam, draws = 5, 2, 0.6, 6000
    w = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=D)
    bal = SDMGradOS(k, n=n, niter=0, lam=lam)
    bal.w = w.clone()
    g = gram(random_rows(1, k, 4, spread=1.0))
    total = np.zeros(k)
    for _ in range(draws):
        subset, weights = draw(bal, g)
        assert np.count_nonzero(weights) == n and set(np.flatnonzero(weights)) == set(subset)
        total += weights
    expected = (w.numpy() + lam / k) / (1 + lam)
    np.testing.assert_allclose(total / draws, expected, rtol=0.08)


def test_all_tasks_sampled_is_sdmgrad() -> None:
    model, model2 = TinyNet(3, seed=1), TinyNet(3, seed=1)
    x, ys = batch(0)
    for bal, net in ((SDMGradOS(3, n=3, lam=0.3), model), (SDMGrad(3), model2)):
        losses = [((out - y) ** 2).mean() for out, y in zip(net(x), ys)]
        bal.backward(losses, shared=net.shared)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class Counted(torch.autograd.Function):
    """Identity whose backward counts its calls (per task) — or raises, if told to."""

    calls: ClassVar[Counter] = Counter()
    forbidden: ClassVar[set[int]] = set()

    @staticmethod
    def forward(ctx, x: torch.Tensor, task: int) -> torch.Tensor:
        ctx.task = task
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.task in Counted.forbidden:
            raise RuntimeError(f"task {ctx.task} was back-propagated")
        Counted.calls[ctx.task] += 1
        return grad, None


def counted_losses(model: TinyNet, step: int) -> list[torch.Tensor]:
    x, ys = batch(step, len(model.heads))
    return [
        ((Counted.apply(out, i) - y) ** 2).mean() for i, (out, y) in enumerate(zip(model(x), ys))
    ]


@pytest.mark.parametrize("features", [False, True, "forked"])
def test_unsampled_losses_are_never_back_propagated(features) -> None:
    k, n = 6, 2
    model = TinyNet(k, seed=2)
    bal = SDMGradOS(k, n=n, seed=3)
    for step in range(4):
        subset = bal.task_subset()
        Counted.calls, Counted.forbidden = Counter(), set(range(k)) - set(subset)
        model.zero_grad(set_to_none=True)
        x, ys = batch(step, k)
        z = torch.tanh(model.shared(x))
        views = tb.fork(z, k) if features == "forked" else [z] * k
        outs = [h(v).squeeze(-1) for h, v in zip(model.heads, views)]
        losses = [((Counted.apply(o, i) - y) ** 2).mean() for i, (o, y) in enumerate(zip(outs, ys))]
        feats = views if features == "forked" else (z if features else None)
        w = bal.backward(losses, shared=model.shared, features=feats)
        assert set(Counted.calls) == set(subset) and all(c == 1 for c in Counted.calls.values())
        assert set(torch.nonzero(w).flatten().tolist()) <= set(subset)
        for i, head in enumerate(model.heads):
            assert (head.weight.grad is not None) == (i in subset)
        assert model.shared.weight.grad is not None
    Counted.forbidden = set()


def test_every_rank_and_micro_batch_draws_the_same_subset() -> None:
    # accumulation: both micro-batches of a step back-propagate the same tasks, and the
    # sequence of subsets is that of the plain run (the generator advances once per step)
    k = 6
    plain = SDMGradOS(k, n=2, seed=5)
    accumulated = SDMGradOS(k, n=2, seed=5, accumulation_steps=2)
    model = TinyNet(k, seed=0)
    expected, got = [], []
    for step in range(3):
        expected.append(plain.task_subset())
        model.zero_grad()
        plain.backward(counted_losses(model, step), shared=model.shared)
        for micro in range(2):
            Counted.calls = Counter()
            accumulated.backward(counted_losses(model, 10 * step + micro), shared=model.shared)
            got.append(sorted(Counted.calls))
    assert got == [s for s in expected for _ in range(2)]
    assert accumulated.steps == 3
    torch.testing.assert_close(accumulated.generator.get_state(), plain.generator.get_state())


def test_sdmgrad_os_state_round_trip() -> None:
    def fresh():
        model = TinyNet(6, seed=4)
        return SDMGradOS(6, n=2, niter=3), model, torch.optim.SGD(model.parameters(), lr=0.05)

    saved = check_resume(fresh, split=3, total=7)
    assert "generator" in saved["bal"]["state"]


def test_sdmgrad_os_validation() -> None:
    assert registry.get("sdmgrad_os") is SDMGradOS and registry.get("sdmgrados") is SDMGradOS
    bal = registry.make("sdmgrad_os", 10)
    assert (bal.n, bal.lam, bal.niter) == (4, 0.6, 20)
    with pytest.raises(ValueError, match="n "):
        SDMGradOS(3, n=0)


def test_no_sampling_possible_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        bal = SDMGradOS(3)  # n = 4 of 3 tasks
    assert "every task is back-propagated every step" in caplog.text
    assert bal.task_subset() is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="taskbalance"):
        SDMGradOS(5)
    assert caplog.text == ""


# ---------------------------------------------------------------------- the hook
class BadSubset(MGDA):
    def task_subset(self) -> list[int] | None:
        return [0, 0]


def test_a_bad_subset_is_refused() -> None:
    model = TinyNet(3)
    x, ys = batch(0)
    losses = [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]
    with pytest.raises(SolverError, match="distinct task indices"):
        BadSubset(3).backward(losses, shared=model.shared)


def test_unknown_mode_still_refused_with_a_subset() -> None:
    model = TinyNet(6)
    with pytest.raises(BalancerUsageError, match="shared="):
        SDMGradOS(6, n=2).backward(counted_losses(model, 0))


def test_a_head_in_shared_is_no_cross_task_error_on_subset_steps() -> None:
    # the heads of unsampled tasks are not reached: no "used by two tasks" confusion
    model = TinyNet(6, seed=0)
    bal = SDMGradOS(6, n=2)
    w = bal.backward(counted_losses(model, 0), shared=nn.ModuleList([model.shared]))
    assert w.shape == (6,) and int((w != 0).sum()) == 2


@pytest.mark.parametrize("case", range(5))
def test_matches_torchjd(case: int) -> None:
    """torchjd 0.18's SDMGrad weighting on the same Gramian (its "double sampling" input
    J_1 J_2ᵀ taken from one batch, as here), over 3 warm-started calls: the same weights up
    to torchjd's 1e-8 added to the squared scale (gradients of norm ~1 here, so it is
    below 1e-7; the 1e-3..1e3 case is rescaled by its mean norm, which it divides out)."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from _gradcheck import cross_check_jacobians
    from torchjd.aggregation import SDMGradWeighting

    theirs, ours = SDMGradWeighting(), SDMGrad(4)  # both: lam 0.3, 20 steps, lr 10, mom 0.5
    for step in range(3):
        jac = cross_check_jacobians(10 * step + case)[case]
        g = torch.from_numpy(jac @ jac.T)
        want = theirs(g).numpy()
        got = ours.weights_from_gramian(g, torch.ones(4, dtype=D)).numpy()
        np.testing.assert_allclose(got, want, atol=2e-7, err_msg=f"step {step}")


def test_os_without_conflict_is_the_scaled_mean_of_the_sampled_gradients() -> None:
    """The authors' recipe (zero rows for unsampled tasks in the inner problem): with
    positively correlated gradients the inner steps move w onto the unsampled tasks, and
    each sampled task gets λ / (n (1 + λ)) = 0.6 / (2 · 1.6) = 0.1875."""
    bal = SDMGradOS(5, n=2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        jac = np.abs(rng.normal(size=(5, 6))) + 0.5  # every pair positively correlated
        subset = bal.task_subset()
        bal.current_subset = subset
        jac[[i for i in range(5) if i not in subset]] = 0.0  # the engine's zero rows
        g = torch.as_tensor(jac @ jac.T, dtype=D)
        w = bal.weights_from_gramian(g, torch.ones(5, dtype=D)).numpy()
        expected = np.zeros(5)
        expected[subset] = 0.1875
        np.testing.assert_allclose(w, expected, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_infinite_lambda_with_sum_reduction_is_the_sum_of_the_gradients(k: int) -> None:
    # λ = ∞: d = g0 = (1/K) Σ g_i; "sum" multiplies d by K, so every weight is exactly 1
    g = torch.diag(torch.arange(1.0, k + 1.0, dtype=D))
    bal = SDMGrad(k, lam=float("inf"), reduction="sum")
    np.testing.assert_array_equal(bal.weights_from_gramian(g, None).numpy(), np.ones(k))


def test_sdmgrad_os_default_seed_is_zero() -> None:
    # runs that give no seed draw the subsets of seed=0 (reproducible by default)
    default = SDMGradOS(6, n=2)
    assert torch.equal(default.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert default.task_subset() == SDMGradOS(6, n=2, seed=0).task_subset()


def test_sdmgrad_os_one_sampled_task_one_inner_step_by_hand() -> None:
    """K = 2, n = 1 (n = 1 is allowed), one inner step of lr 0.1 from w = (½, ½), λ = 0.6.
    Only the sampled task s has a Gramian entry: G = ||g_s||² e_s e_sᵀ, mean norm ||g_s||/2,
    so Ĝ = 4 e_s e_sᵀ; Ĝw + λĜ1/K = 3.2 e_s; w = Π_Δ(½ − 0.32 e_s) = (0.34 at s, 0.66);
    weights (w + 0.3)/1.6 = 0.4 at s, times K/n = 2: 0.8 on g_s, 0 on the other task."""
    jac = torch.tensor([[3.0, 4.0], [-5.0, 12.0]], dtype=D)
    bal = SDMGradOS(2, n=1, niter=1, lr=0.1)
    (s,) = bal.current_subset = bal.task_subset()
    direction, weights = bal.aggregate(jac, torch.ones(2, dtype=D))
    expected = torch.zeros(2, dtype=D)
    expected[s] = 0.8
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(direction, 0.8 * jac[s])


@pytest.mark.parametrize("n", [3, 4])
def test_sdmgrad_os_with_every_task_drawn_samples_nothing(n: int) -> None:
    # n >= K: no subset (the engine back-propagates every task) and no draw is consumed
    bal = SDMGradOS(3, n=n)
    state = bal.generator.get_state()
    assert bal.task_subset() is None
    bal.weights_from_gramian(torch.eye(3, dtype=D), torch.ones(3, dtype=D))
    assert torch.equal(bal.generator.get_state(), state)
