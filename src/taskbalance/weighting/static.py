"""Static weighting: ``L = sum_i w_i L_i`` with weights fixed by the user.

Weights must be finite. Negative weights are allowed on purpose (gradient reversal for an
adversarial task) but are logged once as a warning, since they are rarely intended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


@register("static", "fixed")
class StaticWeighting(Balancer):
    """Static weighting: L = sum_i w_i L_i with fixed w, by position or by task name."""

    def __init__(
        self, tasks: Tasks, weights: Sequence[float] | Mapping[str, float], **kw: Any
    ) -> None:
        super().__init__(tasks, **kw)
        values = [float(w) for w in self.values_by_task(weights, "static weights")]
        for task, value in zip(self.tasks, values):
            if not math.isfinite(value):
                raise ValueError(f"static weight of task {task!r} is not finite: {value}")
            if value < 0:
                logger.warning("static weight of task %r is negative (%s)", task, value)
        self.weights = torch.tensor(values, dtype=torch.float64)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        return self.weights.to(device=losses.device, dtype=losses.dtype)
