"""Equal weighting (linear scalarization), the baseline every multi-task method is
compared with; Keras 3 port of :mod:`taskbalance.weighting.ew`.

    L = sum_i L_i            (reduction="sum", default)
    L = (1/K) sum_i L_i      (reduction="mean")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from taskbalance.keras.base import KerasBalancer, register


@register("equal", "ew", "ls", "linear_scalarization")
class EqualWeighting(KerasBalancer):
    """Equal weighting: ``sum_i L_i`` (or the mean with ``reduction="mean"``)."""

    method_name = "equal"

    def __init__(self, tasks: int | Sequence[str], reduction: str = "sum", **kw: Any) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        super().__init__(tasks, **kw)

    def _initial_weights(self) -> list[float]:
        k = len(self.tasks)
        return [1.0 if self.reduction == "sum" else 1.0 / k] * k

    def _config(self) -> dict[str, Any]:
        return {"reduction": self.reduction}

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        weights = ops.convert_to_tensor(self._initial_weights(), "float32")
        return ops.sum(weights * losses), weights, []
