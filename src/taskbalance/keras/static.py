"""Static weighting with fixed, user-chosen weights (by position or task name); Keras 3
port of :mod:`taskbalance.weighting.static`.

    L = sum_i w_i L_i        (every w_i finite)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from keras import ops

from taskbalance.balancer import task_names
from taskbalance.keras.base import KerasBalancer, _by_task, register


@register("static", "fixed")
class StaticWeighting(KerasBalancer):
    """Static weighting: ``sum_i w_i L_i`` with fixed weights (by position or task name)."""

    method_name = "static"

    def __init__(
        self, tasks: int | Sequence[str], weights: Sequence[float] | Mapping[str, float], **kw: Any
    ) -> None:
        names = task_names(tasks)
        values = [float(w) for w in _by_task(names, weights, "static weights")]
        for task, value in zip(names, values):
            if not math.isfinite(value):
                raise ValueError(f"static weight of task {task!r} is not finite: {value}")
        self.fixed = values
        super().__init__(tasks, **kw)

    def _initial_weights(self) -> list[float]:
        return list(self.fixed)

    def _config(self) -> dict[str, Any]:
        return {"weights": list(self.fixed)}

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        weights = ops.convert_to_tensor(self.fixed, "float32")
        return ops.sum(weights * losses), weights, []
