"""Dynamic Task Prioritization (DTP); Keras 3 port of :mod:`taskbalance.weighting.dtp`.

Guo, Haque, Huang, Yeung, Fei-Fei, "Dynamic Task Prioritization for Multitask Learning",
ECCV 2018. From per-task KPIs ``k_i`` in (0, 1] (the model's ``kpi=`` functions):

    kbar_i(t) = alpha k_i(t) + (1 - alpha) kbar_i(t-1),      kbar_i(first) = k_i(first)
    w_i(t)    = -(1 - kbar_i(t))^gamma_i log kbar_i(t)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import ops

from taskbalance.balancer import task_names
from taskbalance.errors import InvalidKPIError
from taskbalance.keras.base import BAD_KPI, KerasBalancer, _by_task, _read, register


@register("dtp")
class DTP(KerasBalancer):
    """DTP (Guo et al., ECCV 2018): ``w_i = -(1 - kbar_i)^gamma_i log kbar_i`` from the
    task KPIs in (0, 1], averaged as ``kbar = alpha k + (1 - alpha) kbar`` (first: ``k``).

    The KPIs come from the ``kpi=`` functions of
    :class:`~taskbalance.keras.model.BalancedModel`, one per task, every step.
    """

    method_name = "dtp"
    uses_kpi = True

    def __init__(
        self,
        tasks: int | Sequence[str],
        gamma: float | Sequence[float] = 1.0,
        alpha: float = 0.1,
        **kw: Any,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        names = task_names(tasks)
        given = [float(gamma)] * len(names) if isinstance(gamma, (int, float)) else gamma
        gammas = [float(g) for g in _by_task(names, given, "gamma values")]
        if any(not (g >= 0 and math.isfinite(g)) for g in gammas):
            raise ValueError(f"gamma must be finite and non-negative, got {gammas}")
        self.alpha, self.gamma = float(alpha), gammas
        super().__init__(tasks, **kw)
        k = self.num_tasks
        self.kpi_average = self._state("kpi_average", (k,), [1.0] * k)
        self.has_kpi = self._state("has_kpi", (), 0.0)

    def _config(self) -> dict[str, Any]:
        return {"gamma": list(self.gamma), "alpha": self.alpha}

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        if kpi is None:
            raise InvalidKPIError(
                "DTP needs the tasks' KPIs: give BalancedModel(..., kpi={task: metric}) "
                "(a function of (y_true, y_pred) with values in (0, 1], e.g. an accuracy)"
            )
        bad = ops.logical_not(ops.logical_and(kpi > 0, kpi <= 1))
        return [(BAD_KPI, bad, kpi)]

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        average = ops.where(
            _read(self.has_kpi) > 0,
            self.alpha * kpi + (1 - self.alpha) * _read(self.kpi_average),
            kpi,
        )
        gamma = ops.convert_to_tensor(self.gamma, "float32")
        weights = -ops.power(1.0 - average, gamma) * ops.log(average)
        updates = [(self.kpi_average, average), (self.has_kpi, ops.ones(()))]
        return ops.sum(weights * losses), weights, updates
