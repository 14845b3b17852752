"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Liu, Jin, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(Algorithm 1). Learnable logits ``xi`` (init 0), task weights ``z = softmax(xi)``. With
``D_i = L_i − L*_i + eps`` (``L*`` = ``min_losses``, default 0; ``eps = 1e-8`` as in the
official code) the model is trained on

    L = (1/c) sum_i z_i log D_i,    c = sum_i z_i / D_i  (held constant),

whose gradient is ``sum_i w_i grad L_i`` with ``w_i = z_i / (c D_i)`` (the recorded weights,
a distribution; the history also records ``z``). After the model step, with the losses
recomputed at the new parameters, ``delta_i = log D_i(t) − log D_i(t+1)`` and the logits
take one Adam step (lr ``0.025``, the official default) on the gradient

    (dz/dxi)ᵀ delta + gamma xi = z ⊙ (delta − (zᵀdelta) 1) + gamma xi,

i.e. Adam's coupled L2 weight decay with coefficient ``gamma``, exactly as the official
``Adam(weight_decay=gamma)``; it is the only decay on xi. ``gamma = 0.01`` is the default of
the official ``famo.py`` and training scripts (QM9 used 0.001, the Pareto toy 0, LibMTL 1e-3).

Usage (paper-exact)::

    loss = famo(losses); loss.backward(); opt.step()
    with torch.no_grad():
        famo.update(new_losses)          # the same batch, recomputed after the step

If ``update`` is not called, the next call's losses serve as the "after" losses of the
previous step (an approximation under mini-batching; exact for full-batch problems such as
the Pareto toy, where the official code does the same); this is logged once. The logits'
gradient is computed analytically, never by the user's backward, so they cannot miss an
optimizer. The official scripts clip the shared gradient norm at 1.0; here that is
``FAMO(..., max_norm=1.0).backward(losses, shared=...)`` or the user's own clipping.
Every ``D_i`` must be positive (:class:`~taskbalance.errors.NonPositiveLossError`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, Tasks, _SkipStepError
from taskbalance.errors import BalancerUsageError, NonPositiveLossError
from taskbalance.gradients import resolve_tensors
from taskbalance.learnable import OwnedParameters
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """``(d softmax(xi) / d xi)ᵀ delta = z ⊙ (delta − zᵀdelta)`` (the Jacobian is symmetric)."""
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


@register("famo")
class FAMO(Balancer):
    """Fast Adaptive Multitask Optimization; see the module docstring."""

    def __init__(
        self,
        tasks: Tasks,
        lr: float = 0.025,
        gamma: float = 0.01,
        min_losses: Sequence[float] | None = None,
        eps: float = 1e-8,
        max_norm: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if gamma < 0 or eps < 0 or max_norm < 0:
            raise ValueError("gamma, eps and max_norm must be non-negative")
        k = self.num_tasks
        floor = [0.0] * k if min_losses is None else [float(v) for v in min_losses]
        if len(floor) != k:
            raise ValueError(f"{len(floor)} min_losses given for {k} tasks")
        self.min_losses = torch.tensor(floor, dtype=torch.float64)
        self.gamma, self.eps, self.max_norm = float(gamma), float(eps), float(max_norm)
        self.learnable = OwnedParameters(
            "FAMO", {"logits": torch.zeros(k)}, lr=lr, external_allowed=False
        )
        self._before: Tensor | None = None  # log D(t) of the step awaiting update()
        self._z: Tensor | None = None
        self._c: Tensor | None = None
        self._warned = False

    @property
    def logits(self) -> torch.nn.Parameter:
        return self.learnable["logits"]

    @property
    def z(self) -> Tensor:
        """Current task weights ``softmax(xi)``."""
        return torch.softmax(self.logits.detach(), dim=0)

    def _gap(self, losses: Tensor) -> Tensor:
        """``D = L − L* + eps`` in float64, checked to have ``L − L* > 0``."""
        gap = losses.detach().double() - self.min_losses.to(losses.device)
        if not bool((gap > 0).all()):
            bad = int((gap <= 0).nonzero()[0])
            raise NonPositiveLossError(
                self.tasks[bad], float(losses[bad]), "FAMO (log of loss minus min_losses)"
            )
        return gap + self.eps

    def update(self, new_losses: Losses) -> None:
        """Step the logits from this step's losses and ``new_losses`` (after the model step).

        Under DDP the new losses are averaged over the ranks (every rank must call it);
        under gradient accumulation call it once, after the optimizer step that closes the
        accumulated step, with the accumulated batch's losses (e.g. the micro-batches' mean).
        """
        if self._open is not None:
            raise BalancerUsageError(
                "FAMO.update() was called inside an accumulated step; call it after the "
                f"optimizer step that follows the {self.accumulation_steps}-th micro-batch"
            )
        if self._before is None:
            raise BalancerUsageError("FAMO.update() needs a preceding famo(losses) call")
        try:
            after = torch.log(self._gap(self.global_losses(new_losses)))
        except _SkipStepError as err:
            self._skip(err)
            self._before = None
            return
        self._step_logits(after)

    def _step_logits(self, after: Tensor) -> None:
        delta = self._before.to(after.device) - after
        xi = self.logits.detach()
        grad = famo_logit_grad(xi.double(), delta).to(xi.dtype)
        self.learnable.step_with({"logits": torch.add(grad, xi, alpha=self.gamma)})
        self._before = None

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        self.learnable.to(losses.device)
        gap = self._gap(losses)
        if self._before is not None:
            if not self._warned:
                logger.warning(
                    "FAMO: update(new_losses) was not called after the model step; the "
                    "losses of the next call stand in for it (logged once)"
                )
                self._warned = True
            self._step_logits(torch.log(gap))
        self._before = torch.log(gap)
        z = self.z.double()
        self._z, self._c = z, (z / gap).sum()
        return (z / gap / self._c).to(losses.dtype)

    def evaluation_weights(self, losses: Tensor, **context: Any) -> Tensor:
        """The current weights, without the catch-up step of the logits that a training call
        takes when ``update()`` was not called (``evaluate`` puts the state back)."""
        self._before = None
        return self.compute_weights(losses, **context)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        gap = losses - self.min_losses.to(losses) + self.eps
        return ((self._z / self._c).to(losses.dtype) * torch.log(gap)).sum()

    def backward(
        self, losses: Losses, shared: Any = None, features: Any = None, **context: Any
    ) -> Tensor | None:
        """``famo(losses).backward()``, then clip ``shared``'s gradient norm at ``max_norm``
        (under accumulation: once, after the micro-batch that closes the step)."""
        weights = super().backward(losses, shared, features, **context)
        closed = self._open is None
        if weights is not None and self.max_norm > 0 and shared is not None and closed:
            torch.nn.utils.clip_grad_norm_(resolve_tensors(shared), self.max_norm)
        return weights

    def extras(self) -> dict[str, Tensor]:
        return {"z": self.z if self._z is None else self._z}

    def method_state(self) -> dict[str, Any]:
        return {"learnable": self.learnable.state_dict(), "before": self._before}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.learnable.load_state_dict(state["learnable"])
        self._before = state["before"]
