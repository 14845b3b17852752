"""CR-MOGM (Zhou et al., NeurIPS 2022): the inner method's weights, moving-averaged."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.aggregation.mgda import mgda_weights
from taskbalance.errors import BalancerUsageError


def _diagonal_losses(w: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    """``L_i = s_i w_i``: orthogonal task gradients ``s_i e_i``, Gramian ``diag(s²)``."""
    return [s * w[i] for i, s in enumerate(scales)]


def test_hand_case_three_steps_with_mgda() -> None:
    # orthogonal gradients: MGDA's weights are proportional to 1 / ||g_i||²
    # step 1: G = diag(1, 4) -> (0.8, 0.2); step 2: diag(4, 1) -> (0.2, 0.8); step 3: I -> (.5, .5)
    # beta = 0.25: λ1 = (0.8, 0.2); λ2 = .25 λ1 + .75 (0.2, 0.8) = (0.35, 0.65);
    # λ3 = .25 λ2 + .75 (0.5, 0.5) = (0.4625, 0.5375)
    bal = tb.make("cr_mogm", 2, inner="mgda", beta=0.25)
    w = torch.nn.Parameter(torch.zeros(2))
    expected = [(0.8, 0.2), (0.35, 0.65), (0.4625, 0.5375)]
    for scales, want in zip([(1.0, 2.0), (2.0, 1.0), (1.0, 1.0)], expected):
        w.grad = None
        weights = bal.backward(_diagonal_losses(w, scales), shared=[w])
        assert weights.tolist() == pytest.approx(want, abs=1e-6)
    # the update is the averaged weights times the (unit) gradients of the last step
    assert w.grad.tolist() == pytest.approx([0.4625, 0.5375], abs=1e-6)


@pytest.mark.parametrize("inner", ["mgda", "upgrad", "cagrad"])
def test_beta_zero_is_the_inner_gradient_method(inner: str) -> None:
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(5))
    w2 = torch.nn.Parameter(w1.detach().clone())
    wrapped, plain = tb.make("cr_mogm", 3, inner=inner, beta=0.0), tb.make(inner, 3)
    for _ in range(4):
        x = torch.randn(3, 5)
        a = wrapped.backward([(x[i] * w1).sum() ** 2 for i in range(3)], shared=[w1])
        b = plain.backward([(x[i] * w2).sum() ** 2 for i in range(3)], shared=[w2])
        assert torch.equal(a, b)
        assert torch.equal(w1.grad, w2.grad)
        with torch.no_grad():
            w1 -= 0.1 * w1.grad
            w2 -= 0.1 * w2.grad
        w1.grad = w2.grad = None


def test_beta_zero_is_the_inner_loss_method() -> None:
    wrapped = tb.make("cr_mogm", 2, inner="dwa", period="step", beta=0.0)
    plain = tb.make("dwa", 2, period="step")
    for step in range(5):
        losses = torch.tensor([1.0 / (step + 1), 2.0 * 0.7**step], requires_grad=True)
        wrapped(losses)
        plain(losses)
        assert torch.equal(wrapped.last_weights, plain.last_weights)
    assert wrapped.kind == "loss"


def test_converges_to_a_constant_inner_weight_sequence() -> None:
    # DWA (period="step") gives 1 for two steps, then K softmax(r/T) with constant ratios
    # r = (0.5, 0.9) when the losses decay geometrically
    bal = tb.make("cr_mogm", 2, inner="dwa", period="step", beta=0.9)
    e1, e2 = math.exp(0.5 / 2), math.exp(0.9 / 2)
    target = torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)], dtype=torch.float64)
    errors = []
    for step in range(80):
        losses = torch.tensor([0.5**step, 3.0 * 0.9**step], dtype=torch.float64)
        bal(losses.requires_grad_())
        errors.append(float((bal.last_weights - target).abs().max()))
    assert errors[2] > 0.05  # still far at the start: the average moves slowly
    assert all(b < a for a, b in itertools.pairwise(errors[3:]))  # and approaches monotonically
    assert errors[-1] < 1e-3


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    beta=st.floats(0.0, 0.99),
    spread=st.sampled_from([1.0, 1e3]),
)
def test_is_the_moving_average_of_mgda_weights(seed: int, beta: float, spread: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    bal = tb.make("cr_mogm", 3, inner="mgda", beta=beta)
    average = None
    for _ in range(4):
        jac = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        jac = jac * torch.tensor([[1 / spread], [1.0], [spread]], dtype=torch.float64)
        gramian = jac @ jac.T
        raw = mgda_weights(gramian)
        average = raw if average is None else beta * average + (1 - beta) * raw
        got = bal.weights_from_gramian(gramian, torch.ones(3, dtype=torch.float64))
        assert torch.allclose(got, average, atol=1e-12)
        assert bool((got >= -1e-12).all()) and float(got.sum()) == pytest.approx(1.0)


def test_one_task_and_a_zero_gradient() -> None:
    one = tb.make("cr_mogm", 1)
    w = torch.nn.Parameter(torch.ones(2))
    assert one.backward([(w**2).sum()], shared=[w]).tolist() == [1.0]
    two = tb.make("cr_mogm", 2, beta=0.5)
    w.grad = None
    weights = two.backward([(w**2).sum(), 0.0 * w.sum()], shared=[w])
    assert bool(torch.isfinite(weights).all())
    assert torch.equal(w.grad, torch.zeros(2))  # MGDA: the zero gradient is the min-norm point


def test_state_round_trips() -> None:
    def losses(w: torch.Tensor, step: int) -> list[torch.Tensor]:
        return _diagonal_losses(w, (1.0 + step, 2.0, 0.5 * (step + 1)))

    a = tb.make("cr_mogm", 3, beta=0.7)
    w = torch.nn.Parameter(torch.zeros(3))
    for step in range(3):
        a.backward(losses(w, step), shared=[w])
    saved = a.state_dict()
    assert saved["state"]["average"] is not None
    b = tb.make("cr_mogm", 3, beta=0.7)
    b.load_state_dict(saved)
    for step in range(3, 5):
        assert torch.equal(
            a.backward(losses(w, step), shared=[w]), b.backward(losses(w, step), shared=[w])
        )


def test_a_state_without_the_average_is_refused() -> None:
    bal = tb.make("cr_mogm", 2)
    with pytest.raises(BalancerUsageError, match="saved by a CR-MOGM balancer"):
        bal.load_method_state({})


@pytest.mark.parametrize(
    "inner",
    ["graddrop", "db_mtl", "pcd", "gradnorm", "imtl", "uncertainty", "gls", "famo", "cr_mogm"],
)
def test_inner_methods_without_weights_are_refused(inner: str) -> None:
    with pytest.raises(BalancerUsageError, match=rf"cannot wrap '{inner}'.*Wrap one of .*'mgda'"):
        tb.make("cr_mogm", 2, inner=inner)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 2.0])
def test_beta_outside_zero_one_is_refused(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta \(α\) in \[0, 1\)"):
        tb.make("cr_mogm", 2, beta=beta)


def test_inner_keywords_are_passed_on_and_checked() -> None:
    bal = tb.make("cr_mogm", 2, inner="cagrad", c=0.2)
    assert bal.c == 0.2 and bal.hyperparameters()["inner"] == "cagrad"
    with pytest.raises(TypeError, match="temperature"):
        tb.make("cr_mogm", 2, inner="mgda", temperature=2.0)


def test_a_schedule_gives_each_step_its_own_alpha() -> None:
    # the hand case above with α_t = 0.25 only from the third step on (α at step 1 unused)
    seen: list[int] = []

    def alpha(step: int) -> float:
        seen.append(step)
        return 0.0 if step < 2 else 0.25

    bal = tb.make("cr_mogm", 2, inner="mgda", beta=alpha)
    w = torch.nn.Parameter(torch.zeros(2))
    got = [
        bal.backward(_diagonal_losses(w, scales), shared=[w]).tolist()
        for scales in [(1.0, 2.0), (2.0, 1.0), (1.0, 1.0)]
    ]
    # λ1 = (0.8, 0.2); α=0: λ2 = (0.2, 0.8); λ3 = .25 λ2 + .75 (0.5, 0.5) = (0.425, 0.575)
    assert got == [
        pytest.approx([0.8, 0.2], abs=1e-6),
        pytest.approx([0.2, 0.8], abs=1e-6),
        pytest.approx([0.425, 0.575], abs=1e-6),
    ]
    assert seen == [0, 1, 2]


def test_lr_schedule_follows_the_learning_rate() -> None:
    from taskbalance.aggregation.cr_mogm import lr_schedule

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    alpha = lr_schedule(opt)
    assert alpha(0) == 0.0  # constant learning rate: the inner method unchanged
    opt.param_groups[0]["lr"] = 0.025
    assert alpha(5) == pytest.approx(0.75)  # 1 - 0.025 / 0.1
    opt.param_groups[0]["lr"] = 0.2
    assert alpha(6) == 0.0  # a learning rate above the initial one: no averaging
    opt.param_groups[0]["lr"] = 0.0
    assert alpha(7) == 1.0
    with pytest.raises(ValueError, match="no group 3"):
        lr_schedule(opt, group=3)
    with pytest.raises(ValueError, match="positive initial learning rate"):
        lr_schedule(opt)  # its learning rate is now 0


def test_lr_schedule_with_a_scheduler_averages_more_as_the_rate_decays() -> None:
    from taskbalance.aggregation.cr_mogm import lr_schedule

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    bal = tb.make("cr_mogm", 2, inner="mgda", beta=lr_schedule(opt))
    average = None
    for step, scales in enumerate([(1.0, 2.0), (2.0, 1.0), (1.0, 1.0)]):
        opt.zero_grad()
        got = bal.backward(_diagonal_losses(w, scales), shared=[w])
        s = torch.tensor(scales, dtype=torch.float64)
        raw = (1 / s**2) / (1 / s**2).sum()  # MGDA on orthogonal gradients
        alpha = 1.0 - 0.5**step  # lr_t = 0.5^t
        average = raw if average is None else alpha * average + (1 - alpha) * raw
        assert got.double().tolist() == pytest.approx(average.tolist(), abs=1e-6)
        opt.step()
        sched.step()


def test_a_schedule_outside_zero_one_is_refused_naming_the_step() -> None:
    bal = tb.make("cr_mogm", 2, inner="mgda", beta=lambda step: 1.5)
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(BalancerUsageError, match=r"returned 1.5 at step 0.*\[0, 1\]"):
        bal.backward(_diagonal_losses(w, (1.0, 2.0)), shared=[w])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_matches_torchjd_around_upgrad(beta: float) -> None:
    """torchjd 0.18's CRMOGMWeighting(UPGradWeighting()) (quadprog) against
    ``cr_mogm`` with ``inner="upgrad"`` and torchjd's Gramian conventions
    (norm_eps = reg_eps = 1e-4), over 5 calls on conflicting Jacobians: the same weights.
    torchjd's UPGrad weights are the sum of the K projections' weights, like ours."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    pytest.importorskip("quadprog", reason="torchjd's default projector needs quadprog")
    from torchjd.aggregation import CRMOGMWeighting, UPGradWeighting

    gen = torch.Generator().manual_seed(2)
    theirs = CRMOGMWeighting(UPGradWeighting(), alpha=beta)
    ours = tb.make("cr_mogm", 3, inner="upgrad", beta=beta, norm_eps=1e-4, reg_eps=1e-4)
    for _ in range(5):
        jac = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        jac[1] = -0.8 * jac[0] + 0.3 * jac[1]  # a conflicting pair
        gram = jac @ jac.T
        want = theirs(gram)
        got = ours.weights_from_gramian(gram, torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("case", range(5))
def test_matches_torchjd_on_the_cross_check_jacobians(case: int) -> None:
    """The five cross-check Jacobians (random, conflicting, collinear, a zero row, norms
    1e-3..1e3) from three seeds in turn, around UPGrad with torchjd's conventions, α = 0.7."""
    pytest.importorskip("torchjd", reason="torchjd is the optional 'bench' extra")
    pytest.importorskip("quadprog", reason="torchjd's default projector needs quadprog")
    from _gradcheck import cross_check_jacobians
    from torchjd.aggregation import CRMOGMWeighting, UPGradWeighting

    theirs = CRMOGMWeighting(UPGradWeighting(), alpha=0.7)
    ours = tb.make("cr_mogm", 4, inner="upgrad", beta=0.7, norm_eps=1e-4, reg_eps=1e-4)
    for seed in range(3):
        jac = torch.from_numpy(cross_check_jacobians(seed)[case])
        gram = jac @ jac.T
        want = theirs(gram)
        got = ours.weights_from_gramian(gram, torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()) + 1e-12, rtol=0)
