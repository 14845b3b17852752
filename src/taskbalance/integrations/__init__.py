"""Integrations with training frameworks, and mixed-precision (AMP) helpers for any loop.

* :mod:`taskbalance.integrations.lightning` — PyTorch Lightning (an optional extra:
  ``pip install 'taskbalance[lightning]'``). Importing *this* package never imports
  Lightning; only that submodule does.
* :func:`amp_backward` — one balanced backward pass under ``torch.autocast``, with or
  without a :class:`torch.amp.GradScaler`, for every method. It is what the Lightning
  integration runs, and it works in a plain PyTorch loop.

Why a helper is needed (details in ``docs/lightning_amp.md``):

* **Autocast.** PyTorch recommends leaving the autocast region before ``backward``. The
  gradient methods' ``backward`` (and GradNorm's) turn autocast off for their own step,
  so they may be called inside the region; :func:`amp_backward` does the same around
  every method, whatever the caller did.
* **GradScaler.** Loss-weighting methods must see the *true* losses (uncertainty weighting
  fed ``s·L_i`` learns ``log sigma² = log(s·L_i)``), so they get the plain losses and the
  scaler scales their combined loss, as in the standard AMP recipe. Gradient methods need
  the scaled *gradients* (that is what protects fp16 activations' gradients from
  underflow) but the true loss *values* (history, DB-MTL's logs, GradNorm's ratios):
  :func:`scale_gradients` gives them losses whose value is unchanged and whose gradient is
  multiplied by the scale. Then every per-task gradient, the Gramian's square root, the
  combined direction and the task-specific gradients carry the factor ``s`` that
  ``scaler.step`` divides out — exactly right for every method whose update is
  proportional to the gradients (``d(sJ) = s·d(J)``). Nash-MTL's is not (its direction is
  independent of the gradients' scale, ``||d||² = K``), so it is refused under a scaler
  (:data:`NOT_WITH_GRAD_SCALER`).
* **Overflow.** With a scaler, an occasional inf/NaN gradient is expected: the scaler
  must skip that step and lower the scale. The engine (and GradNorm) raise
  :class:`~taskbalance.errors.NonFiniteGradientError` on a non-finite task gradient,
  before any state changes; :func:`amp_backward` catches exactly that class, writes NaN
  into the shared gradients so that ``scaler.step`` skips the step and ``scaler.update``
  backs the scale off, and returns ``None``. (With ``nonfinite="skip_step"`` GradNorm
  skips such a step instead; under a scaler the gradients are then poisoned as well.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, with_reference
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError
from taskbalance.gradients import (
    ForkedFeatures,
    autocast_disabled,
    feature_leaves,
    resolve_tensors,
)

__all__ = [
    "NOT_WITH_GRAD_SCALER",
    "SCALE_INVARIANT_METHODS",
    "amp_backward",
    "scale_gradients",
    "uses_loss_path",
]

#: gradient methods whose update does not grow with the gradients (``d(sJ) = d(J)``), so a
#: GradScaler's ``unscale_`` would shrink it by the loss scale. Checked for every
#: registered method by ``tests/test_amp.py``.
SCALE_INVARIANT_METHODS = frozenset({"nash_mtl", "fairgrad", "moco"})  # FairGrad: at α = 1

#: methods refused under an enabled GradScaler, with the reason.
NOT_WITH_GRAD_SCALER: dict[str, str] = {
    "moco": (
        "it tracks each gradient rescaled to norm L_i (normalize=True), so its update does "
        "not scale with the gradients, and its weights' step gamma (YY^T + rho I) lambda "
        "would see s^2 with normalize=False"
    ),
    "nash_mtl": (
        "its update does not scale with the gradients (||d||² = K), so the scaler's unscale_ "
        "would divide it by the loss scale"
    ),
    "fairgrad": (
        "its update scales as s^((1-alpha)/(1+alpha)) with the gradients (not at all at "
        "alpha=1), so the scaler's unscale_ would shrink it by s^(2 alpha/(1+alpha))"
    ),
    "excess_mtl": (
        "it accumulates the squared gradients of every step and divides by its first "
        "excess risks, so each change of the loss scale (growth, back-off) would shift its "
        "excess-risk ratios for the rest of training"
    ),
    "m_config": (
        "its momenta average the gradients of several steps, between which the loss scale "
        "changes, and with adaptive=True its update does not scale with the gradients"
    ),
    "modo": (
        "its weights take a step of gamma * J_a J_b^T lambda, which the loss scale s "
        "multiplies by s^2 (unscale_ divides the update, not the weights' step)"
    ),
}


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, scale: Tensor | float) -> Tensor:
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.scale
        if isinstance(scale, Tensor):
            scale = scale.to(device=grad.device, dtype=grad.dtype)
        return grad * scale, None


def scale_gradients(losses: Losses, scale: Tensor | float) -> Losses:
    """The same losses (same values, same structure) whose gradients are scaled by ``scale``.

    ``scale`` is a number or a scalar tensor (e.g. ``scaler.scale(torch.ones(()))``, which
    reads the scaler's current scale without a host synchronisation). A dict stays a dict
    with the same keys, a sequence becomes a list; a single stacked tensor is scaled as one
    tensor (gradient methods refuse it anyway).
    """
    if isinstance(losses, Tensor):
        return _ScaleGradient.apply(losses, scale)
    if isinstance(losses, Mapping):
        return {name: _ScaleGradient.apply(value, scale) for name, value in losses.items()}
    return [_ScaleGradient.apply(value, scale) for value in losses]


def uses_loss_path(balancer: Balancer) -> bool:
    """Whether ``balancer`` is driven as ``loss = balancer(losses)`` plus one ordinary backward.

    True for the loss-weighting methods (``kind == "loss"``): their update is the gradient
    of one scalar, which a framework's own backward (Lightning's ``manual_backward``, a
    GradScaler's ``scale(loss).backward()``) can take. Gradient methods (and GradNorm) fill
    ``.grad`` through their own autograd calls and are driven by ``balancer.backward``.
    """
    return balancer.kind == "loss"


def _with_first_tensor(losses: Losses) -> tuple[Losses, Tensor]:
    """``(losses, their first tensor)``; a one-shot iterator is made a list, not consumed."""
    losses, reference = with_reference(losses)
    if reference is None:
        raise TypeError("losses hold no tensor")
    return losses, reference


def _poison(shared: Any, features: Any) -> None:
    """Put NaN in the shared gradients so that ``scaler.step`` skips the step.

    Exact mode: the shared tensors' ``.grad``. Representation mode: the ``.grad`` of the
    leaves the features depend on (the body's parameters), written directly — no backward
    through the body, which after a DDP forward would run DDP's hooks for the body only and
    make DDP fail at its next forward. An existing ``.grad`` is filled in place (a DDP
    bucket view stays one).
    """
    if shared is not None:
        targets = resolve_tensors(shared)
    else:
        if isinstance(features, ForkedFeatures):
            features = features.source
        targets = feature_leaves([features] if isinstance(features, Tensor) else list(features))
    for tensor in targets:
        if tensor.grad is None:
            tensor.grad = torch.full_like(tensor, float("nan"))
        else:
            tensor.grad.fill_(float("nan"))


def _max_norm_clip(balancer: Balancer, shared: Any, scale: Tensor | float) -> None:
    """Repeat the gradient-norm clipping of a loss method's own ``backward`` (FAMO).

    As in ``FAMO.backward``, only once the call closed the (accumulated) step: under
    ``accumulation_steps > 1`` the norm that is clipped is that of the whole step's
    gradient. The gradients are scaled by ``scale`` at this point, so the threshold is
    too: clipping ``s·g`` at ``s·max_norm`` is clipping ``g`` at ``max_norm``.
    """
    max_norm = float(getattr(balancer, "max_norm", 0.0) or 0.0)
    if max_norm > 0 and shared is not None and balancer.micro_step == 0:
        factor = float(scale) if not isinstance(scale, Tensor) else float(scale.detach())
        torch.nn.utils.clip_grad_norm_(resolve_tensors(shared), max_norm * factor)


def _current_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | float:
    """The scaler's current scale as a tensor (no host synchronisation), or 1."""
    if scaler is None:
        return 1.0
    return scaler.scale(torch.ones((), device=device))


def amp_backward(
    balancer: Balancer,
    losses: Losses,
    *,
    scaler: torch.amp.GradScaler | None = None,
    shared: Any = None,
    features: Any = None,
    loss_backward: Callable[[Tensor], None] | None = None,
    **context: Any,
) -> Tensor | None:
    """One balanced backward pass that is correct under autocast and a GradScaler.

    Call it after the forward pass (inside or outside ``torch.autocast``), then step::

        with torch.autocast("cuda", dtype=torch.float16):
            z = model.body(x)
            losses = [crit(head(z), y) for head, y in zip(model.heads, ys)]
        w = amp_backward(bal, losses, scaler=scaler, shared=model.body)
        scaler.step(opt)          # skips the step if the gradients overflowed
        scaler.update()

    Args:
        balancer: any registered method.
        losses: the task losses (dict or list), computed by the model; never pre-scaled.
        scaler: an enabled GradScaler, or ``None`` (fp32, bf16). Its ``scale`` is applied
            here; do not scale the losses yourself.
        shared, features: as for ``balancer.backward`` (gradient methods; FAMO's
            ``max_norm`` clipping uses ``shared``).
        loss_backward: how loss-weighting methods backpropagate their combined loss;
            default ``scaler.scale(loss).backward()`` (``loss.backward()`` without a
            scaler). The Lightning integration passes ``manual_backward``, which scales.
        **context: extra arguments of the method (``kpi=`` for DTP, ``last_shared=`` for
            GradNorm).

    Returns:
        The task weights, or ``None`` when no weights were computed: the balancer skipped
        the step (``nonfinite="skip_step"``; ``balancer.last_step_skipped`` is set and
        ``.grad`` is untouched) or, with a scaler, the task gradients overflowed (the
        shared gradients are then made non-finite so that ``scaler.step`` skips the step
        and ``scaler.update`` lowers the scale; ``last_step_skipped`` is false, except for
        a GradNorm with ``nonfinite="skip_step"``, which counts the step as skipped and
        whose ``last_skip_reason`` is then ``"gradient"``). Call ``scaler.step`` and
        ``scaler.update`` as usual in every case.

    Raises:
        BalancerUsageError: a method of :data:`NOT_WITH_GRAD_SCALER` with a scaler.
        NonFiniteGradientError: a non-finite task gradient without a scaler.
    """
    weights, _ = _amp_backward(
        balancer,
        losses,
        scaler=scaler,
        shared=shared,
        features=features,
        loss_backward=loss_backward,
        **context,
    )
    return weights


def _amp_backward(
    balancer: Balancer,
    losses: Losses,
    *,
    scaler: torch.amp.GradScaler | None,
    shared: Any,
    features: Any,
    loss_backward: Callable[[Tensor], None] | None,
    **context: Any,
) -> tuple[Tensor | None, bool]:
    """:func:`amp_backward`, also saying whether the gradients were poisoned (an overflow
    that the scaler must see at its next ``step``)."""
    active = scaler if scaler is not None and scaler.is_enabled() else None
    losses, reference = _with_first_tensor(losses)
    if uses_loss_path(balancer):
        # diagnosed steps (diagnostics=) compute the task gradients from shared=/features=
        total = balancer.balanced_loss(losses, shared=shared, features=features, **context)
        if total is None:
            return None, False
        if loss_backward is not None:
            loss_backward(total)
        elif active is not None:
            active.scale(total).backward()
        else:
            total.backward()
        _max_norm_clip(balancer, shared, _current_scale(active, reference.device))
        return balancer.last_weights, False

    given = losses
    if active is not None:
        reason = NOT_WITH_GRAD_SCALER.get(balancer.method_name)
        if reason is not None:
            raise BalancerUsageError(
                f"{type(balancer).__name__} cannot be trained with a GradScaler (fp16 AMP): "
                f"{reason}. Train it in float32 or with bf16 autocast (no scaler); see "
                "docs/lightning_amp.md"
            )
        given = scale_gradients(losses, _current_scale(active, reference.device))
    with autocast_disabled(reference):
        try:
            weights = balancer.backward(given, shared=shared, features=features, **context)
        except NonFiniteGradientError:
            if active is None:
                raise
            _poison(shared, features)
            return None, True
    if weights is None and active is not None and balancer.last_skip_reason == "gradient":
        _poison(shared, features)  # skipped by the balancer, but the scaler must back off
        return None, True
    return weights, False
