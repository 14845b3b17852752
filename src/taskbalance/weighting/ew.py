"""Equal weighting (EW): the baseline every multi-task method is compared with.

L = sum_i L_i            (reduction="sum", default)
L = (1/K) sum_i L_i      (reduction="mean")
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.registry import register


def equal_weights(k: int, reduction: str = "sum", like: Tensor | None = None) -> Tensor:
    """``(K,)`` weights: ones for ``"sum"``, ``1/K`` for ``"mean"``."""
    value = 1.0 if reduction == "sum" else 1.0 / k
    if like is None:
        return torch.full((k,), value)
    return torch.full((k,), value, dtype=like.dtype, device=like.device)


@register("equal", "ew", "ls", "linear_scalarization")
class EqualWeighting(Balancer):
    """Equal weighting: L = sum_i L_i (or the mean with ``reduction="mean"``)."""

    def __init__(self, tasks: Tasks, reduction: Literal["sum", "mean"] = "sum", **kw: Any) -> None:
        super().__init__(tasks, **kw)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        return equal_weights(self.num_tasks, self.reduction, like=losses)
