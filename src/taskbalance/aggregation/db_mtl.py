"""DB-MTL: dual-balancing multi-task learning.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for Multi-Task Learning",
2023 (arXiv:2308.12029). Two balancing steps per update:

* loss-scale balancing: each task is trained on ``log L_i``, whose gradient is
  ``g_i / L_i`` (so every loss must be strictly positive; a zero or negative loss raises
  :class:`~taskbalance.errors.NonPositiveLossError` naming the task);
* gradient-magnitude balancing: an exponential moving average of those gradients,

      ĝ_i <- β_t ĝ_i + (1 - β_t) g_i / L_i,    β_t = β / t^σ,    ĝ_i = 0 at the start,

  is rescaled so that every task has the largest norm:

      d = sum_i α_i ĝ_i,    α_i = max_k ||ĝ_k|| / ||ĝ_i||      (α_i = 1 when ĝ_i = 0).

β = 0.9 and σ = 0 (a constant β_t = β) are the defaults of the authors' LibMTL code
(``DB_beta``, ``DB_beta_sigma``); σ > 0 makes β_t decay with the step t.

``needs = "jacobian"``: the EMA holds the full K×P gradients (state in ``state_dict()``,
in J's dtype and device), plus a second K×P buffer that the next average is written into
(no allocation per step; the old average is replaced only once the new result is finite).
Only the exact mode (``shared=``) is offered: in the features mode the rows of J belong to
the examples of one batch, and averaging them across batches (as the EMA would) has no
meaning; the authors' code refuses that mode too.

The recorded weights are ``w_i = α_i / L_i``: with β = 0 the update is exactly
``sum_i w_i g_i``; with β > 0 it also carries the EMA's history, so ``d != wᵀJ``.
``task_specific="weighted"`` then gives task i's own parameters ``α_i ∇ log L_i``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer, spare_buffer
from taskbalance.balancer import Tasks
from taskbalance.errors import BalancerUsageError, NonPositiveLossError
from taskbalance.registry import register


def magnitude_balance(buffer: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, α)``: ``d = sum_i α_i ĝ_i`` with ``α_i = max_k ||ĝ_k|| / ||ĝ_i||`` (1 if zero)."""
    norms = buffer.norm(dim=1)
    scales = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 1.0)
    return scales @ buffer, scales


@register("db_mtl", "dbmtl")
class DBMTL(GradientBalancer):
    """Dual-balancing MTL; see the module docstring.

    Args:
        tasks: number of tasks or their names.
        beta: EMA coefficient β in [0, 1) (default 0.9).
        beta_sigma: decay exponent σ >= 0 of ``β_t = β / t^σ`` (default 0).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    needs = "jacobian"
    modes = ("exact",)
    guards_state = False  # the K×P buffer is committed only once the result is finite

    def __init__(self, tasks: Tasks, *, beta: float = 0.9, beta_sigma: float = 0.0, **kw: Any):
        super().__init__(tasks, **kw)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not beta_sigma >= 0.0:
            raise ValueError(f"beta_sigma must be non-negative, got {beta_sigma}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.t = 0
        self.buffer: Tensor | None = None
        self._spare: Tensor | None = None  # storage reused for the next average (not state)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        positive = losses > 0
        if not bool(positive.all()):
            bad = int((~positive).nonzero()[0])
            raise NonPositiveLossError(
                self.tasks[bad], float(losses[bad]), "DB-MTL (log of losses)"
            )
        buffer = self.buffer
        if buffer is not None and buffer.shape != jacobian.shape:
            raise BalancerUsageError(
                f"DB-MTL keeps an average of the gradients of shape {tuple(buffer.shape)}, but "
                f"this step's are {tuple(jacobian.shape)}: the shared parameters changed"
            )
        beta_t = self.beta / float(self.t + 1) ** self.beta_sigma
        # the new average goes into the spare buffer (two K×P passes, no allocation); the
        # old one stays intact until the result is known to be finite
        new = spare_buffer(self._spare, jacobian)
        coef = ((1.0 - beta_t) / losses).to(jacobian.dtype).unsqueeze(1)
        torch.mul(jacobian, coef, out=new)
        if buffer is not None:
            new.add_(buffer.to(new), alpha=beta_t)
        direction, scales = magnitude_balance(new)
        weights = scales / losses.to(scales.dtype)
        # a non-finite result raises in the engine's check and must leave no trace
        if bool(torch.isfinite(direction).all()) and bool(torch.isfinite(weights).all()):
            self._spare, self.buffer, self.t = buffer, new, self.t + 1
        else:
            self._spare = new
        return direction, weights

    def method_state(self) -> dict[str, Any]:
        return {"t": self.t, "buffer": None if self.buffer is None else self.buffer.clone()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        buffer = state["buffer"]
        self.buffer = None if buffer is None else buffer.clone()
        self._spare = None
