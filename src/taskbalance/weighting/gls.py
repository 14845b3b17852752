"""Geometric Loss Strategy (GLS).

Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019:

    L = (prod_i L_i)^(1/K) = exp((1/K) sum_i log L_i)

Its gradient is ``sum_i (L / (K L_i)) grad L_i``, so the effective (recorded) weight of
task i is ``w_i = L / (K L_i)``: tasks with small losses weigh more. Every loss must be
strictly positive; a zero or negative loss raises
:class:`~taskbalance.errors.NonPositiveLossError` naming the task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer
from taskbalance.errors import NonPositiveLossError
from taskbalance.registry import register


def geometric_mean(losses: Tensor) -> Tensor:
    """``exp(mean(log L))`` of positive losses ``(K,)``, differentiable."""
    return torch.exp(torch.log(losses).mean())


@register("gls", "geometric")
class GLS(Balancer):
    """GLS (Chennupati et al., CVPRW 2019): L = (prod_i L_i)^(1/K), the geometric mean."""

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        positive = losses > 0
        if not bool(positive.all()):
            bad = int((~positive).nonzero()[0])
            raise NonPositiveLossError(self.tasks[bad], float(losses[bad]), "GLS (log of losses)")
        return geometric_mean(losses) / (self.num_tasks * losses)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        return geometric_mean(losses)
