"""Scale-invariant loss (SI): the sum of the log losses.

The scale-invariant baseline of Navon et al., "Multi-Task Learning as a Bargaining Game"
(Nash-MTL), ICML 2022, also used by Liu et al., FAMO, NeurIPS 2023:

    L = sum_i log L_i,    grad L = sum_i grad L_i / L_i,

so the effective (recorded) weight of task i is ``w_i = 1 / L_i`` (detached), and
multiplying one loss by a constant ``c > 0`` adds ``log c`` to L and leaves the gradient
unchanged. No hyper-parameters.

It is GLS's direction: GLS minimises ``(prod_i L_i)^(1/K) = exp(L / K)``, whose gradient
is ``(geo / K) sum_i grad L_i / L_i`` (``geo`` the geometric mean of the losses), a
positive multiple of SI's. The two differ only in the step length: SI's update does not
shrink as the losses do, GLS's does (by the factor ``geo / K``).

The returned scalar is ``sum_i log L_i`` (its value is what ``evaluate`` reports; it may be
negative). Every loss must be strictly positive; a zero or negative loss raises
:class:`~taskbalance.errors.NonPositiveLossError` naming the task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer
from taskbalance.errors import NonPositiveLossError
from taskbalance.registry import register


def si_weights(losses: Tensor) -> Tensor:
    """``1 / L_i`` of positive losses ``(K,)``, detached, in the losses' dtype."""
    return 1.0 / losses.detach()


def log_loss_sum(losses: Tensor) -> Tensor:
    """``sum_i log L_i`` of positive losses ``(K,)``, differentiable."""
    return torch.log(losses).sum()


@register("si", "scale_invariant")
class SI(Balancer):
    """SI (Navon et al., ICML 2022, baseline): L = sum_i log L_i, weights 1 / L_i."""

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        positive = losses > 0
        if not bool(positive.all()):
            bad = int((~positive).nonzero()[0])
            raise NonPositiveLossError(self.tasks[bad], float(losses[bad]), "SI (log of losses)")
        return si_weights(losses)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        return log_loss_sum(losses)
