"""Mixed precision: every method under CPU bf16 autocast, and fp16 autocast with a GradScaler.

* bf16 (``torch.autocast("cpu", dtype=torch.bfloat16)``): every registered method, in
  every mode it defines (loss methods: ``balancer(losses)``; gradient methods: exact and
  features mode), trains a few steps with finite weights, gradients and parameters, both
  in the plain pattern (forward in autocast, balancer outside) and through
  :func:`taskbalance.integrations.amp_backward` called inside the autocast region, which
  must give the very same update. EW, MGDA and UPGrad stay close to float32.
* fp16 + ``torch.amp.GradScaler("cpu")``: the gradient methods' update is proportional to
  the gradients' scale (checked for every method; Nash-MTL is the documented exception),
  :func:`amp_backward` matches float32 for a few methods, and a scale that overflows fp16
  on purpose is backed off with the parameters untouched on the skipped steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.errors import BalancerUsageError
from taskbalance.integrations import (
    NOT_WITH_GRAD_SCALER,
    SCALE_INVARIANT_METHODS,
    amp_backward,
    scale_gradients,
)

K = 3
METHODS = tb.list_methods()


def modes_of(method: str) -> tuple[str, ...]:
    """``("loss",)`` for loss-weighting methods, else the gradient modes the method defines."""
    cls = tb.get(method)
    if cls.kind == "loss":
        return ("loss",)
    return tuple(getattr(cls, "modes", None) or ("exact", "features"))


def cases(methods: list[str]) -> list[Any]:
    return [pytest.param(m, mode, id=f"{m}-{mode}") for m in methods for mode in modes_of(m)]


def make(method: str, **kw: Any) -> tb.Balancer:
    if method == "static":
        kw.setdefault("weights", [0.5, 1.0, 2.0])
    return tb.make(method, K, **kw)


class Net(nn.Module):
    """A two-layer shared body (tanh) and K linear heads, deterministic weights."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(32, 6)`` and K regression targets, a pure function of ``step``."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 6, generator=gen)
    directions = torch.randn(K, 6, generator=torch.Generator().manual_seed(7))
    return x, x @ directions.T + 0.1 * torch.randn(32, K, generator=gen)


def forward(
    net: Net, step: int, *, float_features: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task losses (float32 MSE, whatever the autocast dtype) and the representation z.

    ``float_features``: z is cast to float32 before the heads (the fp16 features-mode
    recipe of docs/lightning_amp.md: the Jacobian and Gramian are then float32; the heads
    still run in fp16 under autocast).
    """
    x, y = batch(step)
    z = net.body(x)
    if float_features:
        z = z.float()
    losses = [
        nn.functional.mse_loss(head(z).squeeze(-1).float(), y[:, i])
        for i, head in enumerate(net.heads)
    ]
    return losses, z


def context(bal: tb.Balancer, losses: list[torch.Tensor]) -> dict[str, Any]:
    if bal.uses_kpi:
        return {"kpi": [1.0 / (1.0 + float(loss.detach())) for loss in losses]}
    return {}


def plain_step(bal: tb.Balancer, mode: str, net: Net, losses: list[torch.Tensor], z: Any) -> Any:
    """The balancer used directly, as in a plain float32 loop (``backward`` for every kind:
    a loss method's is ``balancer(losses).backward()`` plus, for FAMO, its clipping)."""
    ctx = context(bal, losses)
    features = z if mode == "features" else None
    return bal.backward(losses, shared=net.body, features=features, **ctx)


def train(
    method: str,
    mode: str,
    *,
    dtype: torch.dtype | None,
    steps: int = 3,
    helper: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    float_features: bool = False,
    **kw: Any,
) -> tuple[Net, tb.Balancer, list[torch.Tensor]]:
    """``steps`` SGD steps; forward under autocast(``dtype``) unless ``dtype`` is None.

    ``helper``: call :func:`amp_backward` inside the autocast region; otherwise leave the
    region and call the balancer directly (the plain pattern).
    """
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bal = make(method, **kw)
    weights = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses, z = forward(net, step, float_features=float_features)
            if helper:
                features = z if mode == "features" else None
                w = amp_backward(
                    bal,
                    losses,
                    scaler=scaler,
                    shared=net.body,
                    features=features,
                    **context(bal, losses),
                )
        if not helper:
            w = plain_step(bal, mode, net, losses, z)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        weights.append(None if w is None else w.detach().double().clone())
    return net, bal, weights


# ---------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize(("method", "mode"), cases(METHODS))
def test_every_method_trains_under_bf16_autocast(method: str, mode: str) -> None:
    start = Net().flat()
    net, bal, weights = train(method, mode, dtype=torch.bfloat16)
    assert bal.steps == 3
    for w in weights:
        assert w is not None and w.shape == (K,) and bool(torch.isfinite(w).all()), weights
    sampled = getattr(bal, "current_subset", None)  # objective sampling: these tasks' heads
    for name, p in net.named_parameters():
        if sampled is not None and name.startswith("heads.") and int(name[6]) not in sampled:
            assert p.grad is None, name  # a task not back-propagated in the last step
            continue
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    params = net.flat()
    assert bool(torch.isfinite(params).all())
    assert not torch.equal(params, start)

    # amp_backward inside the autocast region gives the very same training run
    net2, _, weights2 = train(method, mode, dtype=torch.bfloat16, helper=True)
    torch.testing.assert_close(net2.flat(), params, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(weights2), torch.stack(weights), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["mgda", "gradnorm"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_gradient_backward_inside_autocast_region(method: str, mode: str) -> None:
    """``backward`` turns autocast off for its own step: called inside the region it gives
    bit for bit the update it gives after leaving it (before, exact mode raised a
    RuntimeError — a bf16 direction assigned to a float32 ``.grad`` — and the features
    mode computed G and wᵀJ in bf16)."""
    runs = []
    for inside in (True, False):
        net, bal = Net(), make(method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, z = forward(net, 0)
            features = z if mode == "features" else None
            if inside:
                weights = bal.backward(losses, shared=net.body, features=features)
        if not inside:
            weights = bal.backward(losses, shared=net.body, features=features)
        assert torch.is_autocast_enabled("cpu") is False
        grads = _grads(net)
        assert grads.dtype == torch.float32 and bool(torch.isfinite(grads).all())
        runs.append((grads, weights))
    (grads_in, w_in), (grads_out, w_out) = runs
    torch.testing.assert_close(grads_in, grads_out, rtol=0, atol=0)
    torch.testing.assert_close(w_in, w_out, rtol=0, atol=0)


#: bf16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 ≈ 0.0039
#: (relative). The forward rounds the inputs and weights of both linear layers (products
#: accumulate in fp32), the backward rounds again; after 5 steps the weights and the
#: parameter updates measured here are off by ≈ 0.003 (≈ u). We allow 5u ≈ 0.02: loose
#: enough for any platform's bf16 kernels, tight enough to catch a Gramian or direction
#: computed wrongly (a wrong weight is off by O(0.1)).
BF16_TOL = 0.02


@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ("equal", "loss"),
        ("mgda", "exact"),
        ("mgda", "features"),
        ("upgrad", "exact"),
        ("upgrad", "features"),
    ],
)
def test_bf16_close_to_fp32(method: str, mode: str) -> None:
    start = Net().flat()
    net32, _, w32 = train(method, mode, dtype=None, steps=5)
    net16, _, w16 = train(method, mode, dtype=torch.bfloat16, steps=5)
    update32 = net32.flat() - start
    error = (net16.flat() - net32.flat()).norm() / update32.norm()
    assert 0 < float(error) < BF16_TOL  # > 0: bf16 really was used
    assert float((torch.stack(w16) - torch.stack(w32)).abs().max()) < BF16_TOL


# ---------------------------------------------------------------------- fp16 + GradScaler
def _grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


#: a method refused under a scaler that is not scale-invariant (MoDo: its weights' step
#: grows with s²) has no scaling law to check here; the refusal is tested below.
GRADIENT_METHODS = [
    m
    for m in METHODS
    if modes_of(m) != ("loss",) and (m in SCALE_INVARIANT_METHODS or m not in NOT_WITH_GRAD_SCALER)
]


@pytest.mark.parametrize(("method", "mode"), cases(GRADIENT_METHODS))
def test_gradient_methods_update_scales_with_the_gradients(method: str, mode: str) -> None:
    """``d(s·J) = s·d(J)`` for every gradient method except :data:`SCALE_INVARIANT_METHODS`.

    That is what makes a GradScaler correct with :func:`scale_gradients`: ``unscale_``
    divides exactly the factor the scaled gradients put in. With ``s`` a power of two the
    scaling is exact in floating point. The heads (task-specific, unweighted by default)
    always get ``s·dL_i/dθ_i``; a scale-invariant method's shared update does not grow.
    """
    scale = 2.0**10
    invariant = method in SCALE_INVARIANT_METHODS
    nets, bals = [Net(), Net()], [make(method), make(method)]
    for step in range(2):  # two steps: stateful methods use their state on the second
        for net, bal, s in zip(nets, bals, (1.0, scale)):
            net.zero_grad(set_to_none=True)
            losses, z = forward(net, step)
            given = scale_gradients(losses, s) if s != 1.0 else losses
            features = z if mode == "features" else None
            bal.backward(given, shared=net.body, features=features)
        plain, scaled = nets
        shared_factor = 1.0 if invariant else scale
        torch.testing.assert_close(
            _grads(scaled.body), _grads(plain.body) * shared_factor, rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            _grads(scaled.heads), _grads(plain.heads) * scale, rtol=1e-6, atol=0
        )
        weight_factor = 1 / scale if invariant else 1.0
        torch.testing.assert_close(
            bals[1].last_weights, bals[0].last_weights * weight_factor, rtol=1e-6, atol=0
        )
    # the loss values are not scaled: history and loss-based state see the true losses
    torch.testing.assert_close(bals[1].history.losses, bals[0].history.losses, rtol=0, atol=0)


def test_scale_gradients_keeps_values_and_structure() -> None:
    x = torch.tensor(3.0, requires_grad=True)
    out = scale_gradients({"a": x * 2, "b": x**2}, 8.0)
    assert list(out) == ["a", "b"]
    assert float(out["a"].detach()) == 6.0 and float(out["b"].detach()) == 9.0
    (out["a"] + out["b"]).backward()
    assert float(x.grad) == 8.0 * (2 + 6)
    listed = scale_gradients([x * 1.0], torch.tensor(4.0))
    assert isinstance(listed, list) and float(listed[0].detach()) == 3.0


#: fp16 keeps 11 significant bits (u = 2^-11 ≈ 4.9e-4), 8 times finer than bf16; the
#: measured gap to fp32 after 5 steps is ≈ 5e-4. 5e-3 (≈ 10u) leaves room for other
#: kernels and still fails if the scale is not divided out (errors of order 1 and more).
FP16_TOL = 5e-3


@pytest.mark.parametrize(
    ("method", "mode", "kw"),
    [
        ("equal", "loss", {}),
        ("uncertainty", "loss", {"optimizer": "own"}),
        ("famo", "loss", {"max_norm": 0.5}),
        ("mgda", "exact", {}),
        ("upgrad", "exact", {}),
        ("upgrad", "features", {}),
        ("pcgrad", "exact", {}),
    ],
)
def test_fp16_grad_scaler_matches_fp32(method: str, mode: str, kw: dict[str, Any]) -> None:
    start = Net().flat()
    net32, bal32, w32 = train(method, mode, dtype=None, steps=5, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10_000)
    net16, bal16, w16 = train(
        method,
        mode,
        dtype=torch.float16,
        steps=5,
        helper=True,
        scaler=scaler,
        float_features=mode == "features",
        **kw,
    )
    assert scaler.get_scale() == 2.0**8  # no overflow: every step was applied
    update = net32.flat() - start
    error = (net16.flat() - net32.flat()).norm() / update.norm()
    assert 0 < float(error) < FP16_TOL
    assert float((torch.stack(w16) - torch.stack(w32)).abs().max()) < FP16_TOL
    torch.testing.assert_close(bal16.history.losses, bal32.history.losses, rtol=FP16_TOL, atol=0)


def test_fp16_features_gramian_does_not_overflow() -> None:
    """fp16 features (no ``.float()`` before the heads): J is accumulated in float32, so the
    Gramian of the scaled gradients (s²·g_i·g_j) does not overflow and no step is lost;
    the result stays close to the float32-features recipe. (With an fp16 J the scaler
    backed off at every step.)"""
    scale = 2.0**8
    scalers = [torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)]
    scalers.append(torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000))
    nets = []
    for scaler, float_features in zip(scalers, (False, True)):
        net, _, weights = train(
            "upgrad",
            "features",
            dtype=torch.float16,
            steps=5,
            helper=True,
            scaler=scaler,
            float_features=float_features,
        )
        assert scaler.get_scale() == scale and all(w is not None for w in weights)
        nets.append(net)
    start = Net().flat()
    error = (nets[0].flat() - nets[1].flat()).norm() / (nets[1].flat() - start).norm()
    assert float(error) < FP16_TOL


SCALER_METHODS = [m for m in METHODS if m not in NOT_WITH_GRAD_SCALER]


@pytest.mark.parametrize(("method", "mode"), cases(SCALER_METHODS))
def test_fp16_overflow_is_skipped_and_the_scale_backed_off(method: str, mode: str) -> None:
    """Start at a scale that overflows fp16: the scaler must skip and back off, never NaN."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bal = make(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28, growth_interval=10_000)
    skipped = applied = 0
    for step in range(40):
        before = net.flat()
        scale = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            losses, z = forward(net, step)
            features = z if mode == "features" else None
            amp_backward(
                bal,
                losses,
                scaler=scaler,
                shared=net.body,
                features=features,
                **context(bal, losses),
            )
        scaler.step(opt)
        scaler.update()
        after = net.flat()
        assert bool(torch.isfinite(after).all()), f"step {step}"
        if scaler.get_scale() < scale:
            skipped += 1
            assert torch.equal(after, before), f"step {step} overflowed but changed the model"
        else:
            applied += 1
            assert not torch.equal(after, before)
        if applied == 3:
            break
    assert skipped >= 5 and applied == 3, (skipped, applied)
    if bal.last_weights is not None:
        assert bool(torch.isfinite(bal.last_weights).all())


@pytest.mark.parametrize("method", sorted(NOT_WITH_GRAD_SCALER))
def test_refused_under_a_grad_scaler(method: str) -> None:
    net = Net()
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        losses, _ = forward(net, 0)
    with pytest.raises(BalancerUsageError, match="GradScaler"):
        amp_backward(make(method), losses, scaler=scaler, shared=net.body)
    # without a scaler (bf16, fp32) the same call trains
    assert amp_backward(make(method), forward(net, 0)[0], shared=net.body) is not None


def test_uncertainty_fed_scaled_losses_learns_the_scale() -> None:
    """Why loss-weighting methods must see the true losses, never ``scaler.scale(loss_i)``.

    Uncertainty weighting's optimum is ``log sigma_i² = log L_i``; fed ``s·L_i`` it
    converges to ``log(s·L_i)`` instead, i.e. every sigma is off by ``sqrt(s)``.
    """
    losses = torch.tensor([0.5, 2.0, 8.0])
    scale = 2.0**16
    right, wrong = make("uncertainty", lr=0.1), make("uncertainty", lr=0.1)
    for _ in range(400):
        right(list(losses)).backward()
        wrong(list(scale * losses)).backward()
    torch.testing.assert_close(right.log_vars.detach(), losses.log(), rtol=0, atol=0.05)
    # its optimum is log(s·L) = log L + 11.1; Adam gets there slowly (the huge first
    # gradients stay in its second moment), but it is already far off and still rising
    gap = wrong.log_vars.detach() - right.log_vars.detach()
    assert bool((gap > 3.0).all()), gap
    still_rising = 1 - torch.exp(-wrong.log_vars.detach()) * scale * losses < 0
    assert bool(still_rising.all())


@pytest.mark.parametrize("method", ["db_mtl", "nash_mtl", "upgrad"])
def test_prescaled_loss_values_shrink_some_updates(method: str) -> None:
    """The anti-pattern ``balancer.backward([scaler.scale(l) for l in losses])``.

    Scaling the loss *values* as well as their gradients is harmless for methods whose
    weights depend on the Gramian's shape only (UPGrad, MGDA, ...), but DB-MTL (gradients
    of log L_i, where the scale cancels) and Nash-MTL (an update of norm sqrt(K)) then
    produce an unscaled update that the scaler's ``unscale_`` divides by ``s`` once more.
    :func:`scale_gradients` (values unchanged) is right for DB-MTL; Nash-MTL is refused.
    """
    scale = 2.0**10
    nets = [Net(), Net(), Net()]
    for net, how in zip(nets, ("plain", "values", "gradients")):
        losses, _ = forward(net, 0)
        if how == "values":
            losses = [scale * loss for loss in losses]
        elif how == "gradients":
            losses = scale_gradients(losses, scale)
        make(method).backward(losses, shared=net.body)
    plain, values, gradients = (_grads(net.body) for net in nets)
    shrunk = method in ("db_mtl", "nash_mtl")
    torch.testing.assert_close(values, plain * (1.0 if shrunk else scale), rtol=1e-6, atol=0)
    if method not in SCALE_INVARIANT_METHODS:
        torch.testing.assert_close(gradients, plain * scale, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- overflow plumbing
def test_overflow_in_features_mode_runs_no_backward_through_the_body() -> None:
    """An overflow in the representation mode poisons the body's gradients directly: no
    backward runs through the body, whose gradient hooks (DDP's reducer) would otherwise
    fire for the body alone and make DDP fail at its next forward."""
    net = Net()
    fired: list[str] = []
    for name, p in net.body.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.append(name))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28)
    with torch.autocast("cpu", dtype=torch.float16):
        losses, z = forward(net, 0)
    assert amp_backward(make("upgrad"), losses, scaler=scaler, features=z) is None
    assert fired == []
    for p in net.body.parameters():
        assert p.grad is not None and bool(torch.isnan(p.grad).all())


def test_famo_clipping_under_accumulation_happens_once_per_step() -> None:
    """``amp_backward`` clips FAMO's gradient as ``FAMO.backward`` does: once, when the call
    closes the accumulated step (clipping every micro-batch would clip a partial sum)."""
    results = []
    for helper in (True, False):
        net = Net()
        bal = make("famo", max_norm=0.05, accumulation_steps=2)
        for step in range(2):
            losses, _ = forward(net, step)
            if helper:
                amp_backward(bal, losses, shared=net.body)
            else:
                bal.backward(losses, shared=net.body)
        assert bal.micro_step == 0
        results.append(_grads(net.body))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert float(results[0].norm()) == pytest.approx(0.05, rel=1e-4)


def test_gradnorm_skip_step_under_a_scaler_still_backs_the_scale_off() -> None:
    """GradNorm with ``nonfinite="skip_step"`` skips an overflowed step itself; the shared
    gradients are poisoned all the same, so that the scaler skips it and backs off."""
    net = Net()
    bal = make("gradnorm", nonfinite="skip_step")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = net.flat()
    with torch.autocast("cpu", dtype=torch.float16):
        losses, _ = forward(net, 0)
    assert amp_backward(bal, losses, scaler=scaler, shared=net.body) is None
    assert bal.last_skip_reason == "gradient" and bal.skipped_steps == 1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**28 and torch.equal(net.flat(), before)
    assert torch.equal(bal.weights, torch.ones(K))


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_amp_backward_accepts_losses_from_a_generator(method: str) -> None:
    """Finding the losses' device must not consume a one-shot iterator."""
    nets = [Net(), Net()]
    for net, as_generator in zip(nets, (True, False)):
        losses, _ = forward(net, 0)
        given = (loss for loss in losses) if as_generator else losses
        assert amp_backward(make(method), given, shared=net.body) is not None
    torch.testing.assert_close(_grads(nets[0]), _grads(nets[1]), rtol=0, atol=0)


def test_amp_backward_takes_modo_three_batches_under_bf16() -> None:
    """MoDo's losses are three sets (one per batch); amp_backward finds their device inside
    them (it used to raise "losses hold no tensor") and gives the plain backward's update."""
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(3, generator=gen))
    rows = torch.randn(3, 2, 3, generator=gen)

    def batches() -> list[list[torch.Tensor]]:
        return [[(w * rows[b, 0]).sum() ** 2, (w * rows[b, 1]).sum() ** 2] for b in range(3)]

    plain, amp = tb.make("modo", 2, gamma=0.1), tb.make("modo", 2, gamma=0.1)
    want = plain.backward(batches(), shared=[w])
    expected = w.grad.clone()
    w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amp_backward(amp, batches(), shared=[w])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w.grad, expected)
