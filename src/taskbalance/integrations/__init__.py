"""Integrations with training frameworks, and mixed-precision (AMP) helpers for any loop.

* :mod:`taskbalance.integrations.lightning` — PyTorch Lightning (an optional extra:
  ``pip install 'taskbalance[lightning]'``). Importing *this* package never imports
  Lightning; only that submodule does.
* :func:`amp_backward` — one balanced backward pass under ``torch.autocast``, with or
  without a :class:`torch.amp.GradScaler`, for every method. It is what the Lightning
  integration runs, and it works in a plain PyTorch loop.

Why a helper is needed (details in ``docs/lightning_amp.md``):

* **Autocast.** PyTorch recommends leaving the autocast region before ``backward``. The
  gradient methods' engine must run outside it as well: inside, its ``J @ Jᵀ`` and
  ``wᵀ J`` products are autocast to bf16/fp16, and in exact mode the resulting low-precision
  direction cannot even be assigned to the float32 ``.grad``. :func:`amp_backward` turns
  autocast off around the balancer's step, whatever the caller did.
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
  must skip that step and lower the scale. The engine raises
  :class:`~taskbalance.errors.SolverError` on a non-finite Gramian; :func:`amp_backward`
  catches that one case, writes non-finite values into the shared gradients so that
  ``scaler.step`` skips the step and ``scaler.update`` backs the scale off, and returns
  ``None``. GradNorm raises nothing on a non-finite gradient: its learnable weights turn
  NaN for good, so it is refused under a scaler too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses
from taskbalance.errors import BalancerUsageError, SolverError
from taskbalance.gradients import ForkedFeatures, resolve_tensors

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
SCALE_INVARIANT_METHODS = frozenset({"nash_mtl"})

#: methods refused under an enabled GradScaler, with the reason.
NOT_WITH_GRAD_SCALER: dict[str, str] = {
    "nash_mtl": (
        "its update does not scale with the gradients (||d||² = K), so the scaler's unscale_ "
        "would divide it by the loss scale"
    ),
    "gradnorm": (
        "a non-finite gradient (which a GradScaler produces on purpose when it overflows) "
        "turns its learnable weights into NaN for the rest of the run"
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


def _first_tensor(losses: Losses) -> Tensor:
    if isinstance(losses, Tensor):
        return losses
    values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError("losses hold no tensor")


def _is_nonfinite_gradient(err: SolverError) -> bool:
    """The engine's error for a non-finite task gradient (an fp16 overflow under a scaler)."""
    text = str(err)
    return "is not finite" in text or "non-finite update" in text


def _poison(shared: Any, features: Any) -> None:
    """Put non-finite values in the shared gradients so that ``scaler.step`` skips the step."""
    if shared is not None:
        for tensor in resolve_tensors(shared):
            tensor.grad = torch.full_like(tensor, float("nan"))
        return
    if isinstance(features, ForkedFeatures):
        features = features.source
    outputs = [features] if isinstance(features, Tensor) else list(features)
    torch.autograd.backward(
        outputs, grad_tensors=[torch.full_like(z, float("nan")) for z in outputs]
    )


def _max_norm_clip(balancer: Balancer, shared: Any, scale: Tensor | float) -> None:
    """Repeat the gradient-norm clipping of a loss method's own ``backward`` (FAMO).

    The gradients are scaled by ``scale`` at this point, so the threshold is too: clipping
    ``s·g`` at ``s·max_norm`` is clipping ``g`` at ``max_norm``.
    """
    max_norm = float(getattr(balancer, "max_norm", 0.0) or 0.0)
    if max_norm > 0 and shared is not None:
        factor = float(scale) if not isinstance(scale, Tensor) else float(scale.detach())
        torch.nn.utils.clip_grad_norm_(resolve_tensors(shared), max_norm * factor)


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
        and ``scaler.update`` lowers the scale; ``last_step_skipped`` is false).

    Raises:
        BalancerUsageError: a method of :data:`NOT_WITH_GRAD_SCALER` with a scaler.
    """
    active = scaler if scaler is not None and scaler.is_enabled() else None
    reference = _first_tensor(losses)
    if uses_loss_path(balancer):
        total = balancer(losses, **context)
        if balancer.last_step_skipped:
            return None
        if loss_backward is not None:
            loss_backward(total)
        elif active is not None:
            active.scale(total).backward()
        else:
            total.backward()
        scale: Tensor | float = 1.0
        if active is not None:
            scale = active.scale(torch.ones((), device=reference.device))
        _max_norm_clip(balancer, shared, scale)
        return balancer.last_weights

    given = losses
    if active is not None:
        reason = NOT_WITH_GRAD_SCALER.get(balancer.method_name)
        if reason is not None:
            raise BalancerUsageError(
                f"{type(balancer).__name__} cannot be trained with a GradScaler (fp16 AMP): "
                f"{reason}. Train it in float32 or with bf16 autocast (no scaler); see "
                "docs/lightning_amp.md"
            )
        given = scale_gradients(losses, active.scale(torch.ones((), device=reference.device)))
    with torch.autocast(device_type=reference.device.type, enabled=False):
        try:
            return balancer.backward(given, shared=shared, features=features, **context)
        except SolverError as err:
            if active is None or not _is_nonfinite_gradient(err):
                raise
            _poison(shared, features)
            return None
