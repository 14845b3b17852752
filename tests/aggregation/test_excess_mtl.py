"""ExcessMTL (He et al., ICML 2024): excess-risk estimates, exponentiated-gradient weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _gradcheck import DEGENERATE_JACOBIANS, check_resume, losses_and_features
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.excess_mtl import ExcessMTL, excess_risks, exponentiated_step
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError

D = torch.float64


def test_hand_computed_three_steps() -> None:
    bal = ExcessMTL(2, eta=1.0)
    ones = torch.ones(2, dtype=D)
    # step 1: S = diag-free ((4, 0), (0, 1)); ε = (4/2, 1/1) = (2, 1) become the references;
    # the weights stay 1 and d = g1 + g2
    j1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D)
    d1, w1 = bal.aggregate(j1, ones)
    torch.testing.assert_close(w1, ones)
    torch.testing.assert_close(d1, torch.tensor([2.0, 1.0], dtype=D))
    torch.testing.assert_close(bal.reference, torch.tensor([2.0, 1.0], dtype=D))
    # step 2: S = ((8, 0), (0, 10)); ε = (4/√8, 9/√10); r = ε / (2, 1)
    j2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=D)
    d2, w2 = bal.aggregate(j2, ones)
    r = (4 / math.sqrt(8) / 2, 9 / math.sqrt(10) / 1)
    e = (math.exp(r[0]), math.exp(r[1]))
    expected = torch.tensor([2 * e[0] / sum(e), 2 * e[1] / sum(e)], dtype=D)
    torch.testing.assert_close(w2, expected)
    torch.testing.assert_close(d2, expected[0] * j2[0] + expected[1] * j2[1])
    # step 3: task 2's gradient is zero (ε_2 = 0, r_2 = 0); S_1 = (9, 1), ε_1 = 1/3 + 1
    j3 = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=D)
    d3, w3 = bal.aggregate(j3, ones)
    logits = torch.log(expected) + torch.tensor([(1 / 3 + 1) / 2, 0.0], dtype=D)
    expected3 = 2 * logits.exp() / logits.exp().sum()
    torch.testing.assert_close(w3, expected3)
    torch.testing.assert_close(d3, expected3[0] * j3[0])
    assert bal.t == 3 and float(w3.sum()) == pytest.approx(2.0)


def test_excess_risks_skip_the_zero_terms() -> None:
    jac = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=D)
    acc = torch.tensor([[9.0, 0.0, 4.0], [0.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(excess_risks(jac, acc), torch.tensor([3.0 + 0.5, 0.0], dtype=D))


def test_exponentiated_step_does_not_overflow() -> None:
    w = exponentiated_step(torch.ones(3, dtype=D), torch.tensor([1e6, 0.0, 1e6 - 1], dtype=D), 1.0)
    e = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(w, torch.tensor([3 * e, 0.0, 3 * (1 - e)], dtype=D))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 8), st.floats(0.0, 2.0))
def test_each_step_multiplies_the_weight_ratios_by_exp_eta_times_the_ratio_gap(
    seed: int, k: int, p: int, eta: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    bal = ExcessMTL(k, eta=eta)
    acc = torch.zeros(k, p, dtype=D)
    first = None
    previous = torch.ones(k, dtype=D)
    for _ in range(4):
        jac = torch.randn(k, p, generator=gen, dtype=D) * 10 ** (
            4 * torch.rand(k, 1, generator=gen, dtype=D) - 2
        )
        d, w = bal.aggregate(jac, torch.rand(k, generator=gen, dtype=D))
        acc = acc + jac**2
        risk = (jac**2 / acc.sqrt()).sum(dim=1)
        r = torch.zeros(k, dtype=D) if first is None else risk / first
        first = risk if first is None else first
        # log(w_i / w_j) grows by η (r_i - r_j) (where no weight underflowed); Σ w = K
        kept = (w > 1e-300) & (previous > 1e-300)
        j = int(torch.argmax(torch.where(kept, w, 0.0)))
        growth = (w[kept] / w[j]).log() - (previous[kept] / previous[j]).log()
        torch.testing.assert_close(growth, eta * (r[kept] - r[j]), rtol=1e-7, atol=1e-9)
        assert float(w.sum()) == pytest.approx(k) and bool((w >= 0).all())
        torch.testing.assert_close(d, w @ jac)
        previous = w


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 5))
def test_weights_ignore_each_tasks_gradient_scale_and_the_losses(seed: int, k: int) -> None:
    # the scale normalisation ε_i / ε_i⁰: a task whose gradients are all c times larger (a
    # rescaled loss) gets the same weight; the loss values do not enter at all
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (6 * torch.rand(k, 1, generator=gen, dtype=D) - 3)
    a, b = ExcessMTL(k, eta=1.0), ExcessMTL(k, eta=1.0)
    for _ in range(4):
        jac = torch.randn(k, 6, generator=gen, dtype=D)
        _, wa = a.aggregate(jac, torch.ones(k, dtype=D))
        _, wb = b.aggregate(jac * scales, 10 * torch.rand(k, generator=gen, dtype=D))
        torch.testing.assert_close(wa, wb)


def test_the_task_further_from_convergence_gains_weight() -> None:
    # task 0's gradient stays at its first size, task 1's shrinks (it converges): ε_0/ε_0⁰
    # stays higher than ε_1/ε_1⁰, so w_0 grows
    bal = ExcessMTL(2, eta=1.0)
    for step in range(6):
        jac = torch.tensor([[1.0, 1.0], [0.5**step, -(0.5**step)]], dtype=D)
        _, w = bal.aggregate(jac, torch.tensor([1.0, 5.0], dtype=D))
    assert float(w[0]) > 1.5 > 0.5 > float(w[1])


def test_zero_gradient_defers_the_reference_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bal = ExcessMTL(["a", "b"], eta=1.0)
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        bal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D), torch.ones(2))
        bal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D), torch.ones(2))
    assert bal.deferred_references == 2
    assert len(caplog.records) == 1 and "'b'" in caplog.records[0].getMessage()
    torch.testing.assert_close(bal.reference, torch.tensor([1.0, 0.0], dtype=D))
    # its first non-zero gradient sets the reference, with no weight step of its own
    before = bal.weights.clone()
    bal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D), torch.ones(2))
    assert float(bal.reference[1]) == pytest.approx(2.0)
    r0 = (1 / math.sqrt(3)) / 1.0  # S = 3 after three steps
    logits = before.log() + torch.tensor([r0, 0.0], dtype=D)
    torch.testing.assert_close(bal.weights, 2 * logits.exp() / logits.exp().sum())
    assert bal.deferred_references == 2


def test_non_finite_gradient_raises_naming_the_task_and_keeps_the_state() -> None:
    bal = ExcessMTL(["a", "b"])
    bal.aggregate(torch.eye(2), torch.ones(2))
    acc, ref, w = bal.accumulated.clone(), bal.reference.clone(), bal.weights.clone()
    bad = torch.tensor([[1.0, 0.0], [float("inf"), 1.0]])
    with pytest.raises(NonFiniteGradientError, match="'b'") as err:
        bal.aggregate(bad, torch.ones(2))
    assert err.value.task == "b" and bal.t == 1
    assert torch.equal(bal.accumulated, acc) and torch.equal(bal.reference, ref)
    assert torch.equal(bal.weights, w)


@pytest.mark.parametrize("jac", DEGENERATE_JACOBIANS)
def test_degenerate_gradients_give_finite_results(jac: torch.Tensor) -> None:
    bal = ExcessMTL(jac.shape[0], eta=1.0)
    for _ in range(3):
        d, w = bal.aggregate(jac, torch.full((jac.shape[0],), 0.5))
        assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(w).all())
    if jac.shape[0] == 1:
        torch.testing.assert_close(w, torch.ones(1))


def test_huge_norm_spread_keeps_finite_weights() -> None:
    bal = ExcessMTL(3, eta=1.0)
    bal.aggregate(torch.tensor([[1e-30, 0.0], [1.0, 1.0], [1e3, 0.0]], dtype=D), torch.ones(3))
    d, w = bal.aggregate(
        torch.tensor([[1e3, 0.0], [1.0, 1.0], [1e-3, 0.0]], dtype=D), torch.ones(3)
    )
    assert bool(torch.isfinite(w).all()) and float(w[0]) == pytest.approx(3.0)
    assert bool(torch.isfinite(d).all())


def test_end_to_end_exact_mode_and_no_features_mode() -> None:
    def body_jacobian(seed: int) -> torch.Tensor:
        model, _, losses = losses_and_features(3, seed)
        body = list(model.shared.parameters())
        rows = [torch.autograd.grad(loss, body, retain_graph=True) for loss in losses]
        return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])

    j1, j2 = body_jacobian(2), body_jacobian(5)
    first = (j1**2 / j1.abs()).nan_to_num().sum(dim=1)  # ε⁰ = Σ g² / |g| = ||g||_1
    r = (j2**2 / (j1**2 + j2**2).sqrt()).sum(dim=1) / first
    expected = 3 * torch.softmax(0.5 * r.double(), dim=0)
    bal = ExcessMTL(3, eta=0.5)
    model1, _, losses1 = losses_and_features(3, seed=2)
    torch.testing.assert_close(bal.backward(losses1, shared=model1.shared), torch.ones(3))
    model2, _, losses2 = losses_and_features(3, seed=5)
    w = bal.backward(losses2, shared=model2.shared)
    torch.testing.assert_close(w, expected.float())
    sizes = [p.numel() for p in model2.shared.parameters()]
    for p, e in zip(model2.shared.parameters(), (w @ j2).split(sizes)):
        torch.testing.assert_close(p.grad.reshape(-1), e, rtol=1e-5, atol=1e-7)
    _, z3, losses3 = losses_and_features(3, seed=2)
    with pytest.raises(BalancerUsageError, match="exact"):
        ExcessMTL(3).backward(losses3, shared=model2.shared, features=z3)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[ExcessMTL, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(3, seed=4)
        return ExcessMTL(3, eta=0.5), model, torch.optim.SGD(model.parameters(), lr=0.01)

    saved = check_resume(fresh, split=5, total=8)
    state = saved["bal"]["state"]
    assert state["t"] == 5 and state["accumulated"].shape == (3, 15)
    assert state["weights"].shape == state["reference"].shape == (3,)


def test_changed_shared_parameters_are_refused() -> None:
    bal = ExcessMTL(2)
    bal.aggregate(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(BalancerUsageError, match="shape"):
        bal.aggregate(torch.ones(2, 4), torch.ones(2))


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf")])
def test_bad_step_size_is_refused(eta: float) -> None:
    with pytest.raises(ValueError, match="eta"):
        ExcessMTL(2, eta=eta)


def test_registered_with_the_defaults() -> None:
    assert registry.get("excess_mtl") is ExcessMTL and registry.get("excessmtl") is ExcessMTL
    bal = registry.make("ExcessMTL", 2)
    assert (bal.eta, bal.needs, bal.modes) == (0.01, "jacobian", ("exact",))


@pytest.mark.parametrize("scale", [1.0, 1e2])
def test_matches_torchjd_after_the_first_step(scale: float) -> None:
    """torchjd 0.18's ExcessMTL on the same Jacobians over 5 calls. Conventions removed:
    torchjd's weights sum to 1 (here K); its first call already updates them with the raw,
    unnormalised excess risks (the official code and LibMTL, like this one, only record the
    reference on that step), so the weights differ by that first factor for good; and it
    adds 1e-7 under the root. Compared: each later step's change of the log-weights,
    ``log w_t − log w_{t−1} = η r_t + const``, which carries the method (the accumulated S,
    the excess risks, the reference normalisation)."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    from torchjd.aggregation import ExcessMTLWeighting

    gen = torch.Generator().manual_seed(7)
    eta = 0.5
    theirs, ours = ExcessMTLWeighting(robust_step_size=eta), ExcessMTL(3, eta=eta)
    previous = None
    for _step in range(5):
        jac = scale * torch.randn(3, 6, generator=gen, dtype=torch.float64)
        jac[1] *= 3.0  # a task further from convergence
        want = torch.log(theirs(jac))
        _, w = ours.aggregate(jac, torch.ones(3, dtype=torch.float64))
        got = torch.log(w)
        if previous is not None:
            d_want, d_got = want - previous[0], got - previous[1]
            torch.testing.assert_close(
                d_got - d_got.mean(), d_want - d_want.mean(), atol=1e-6, rtol=0
            )
        previous = (want, got)
