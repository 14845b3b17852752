"""Geometric Loss Strategy (GLS); Keras 3 port of :mod:`taskbalance.weighting.gls`.

Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019:

    L = (prod_i L_i)^(1/K) = exp((1/K) sum_i log L_i),      w_i = L / (K L_i)

Every loss must be strictly positive.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from taskbalance.keras.base import NONPOSITIVE, KerasBalancer, register


@register("gls", "geometric")
class GLS(KerasBalancer):
    """GLS (Chennupati et al., CVPRW 2019): the geometric mean ``(prod_i L_i)^(1/K)``;
    recorded weights ``L / (K L_i)``. Every loss must be strictly positive."""

    method_name = "gls"
    positive_label = "GLS (log of losses)"

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        return [(NONPOSITIVE, losses <= 0, losses)]

    def _mean(self, losses: Any) -> Any:
        positive = ops.where(losses > 0, losses, ops.ones_like(losses))
        return ops.exp(ops.mean(ops.log(positive)))

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        total = self._mean(losses)
        weights = ops.stop_gradient(total / (self.num_tasks * losses))
        return total, weights, []

    def evaluation_loss(self, losses: Any) -> Any:
        return self._mean(losses)
