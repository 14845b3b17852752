"""Dynamic Task Prioritization (DTP), task-level weights.

Guo, Haque, Huang, Yeung, Fei-Fei, "Dynamic Task Prioritization for Multitask Learning",
ECCV 2018. Each task has a key performance indicator ``k_i`` in (0, 1] (e.g. training
accuracy), smoothed by an exponential moving average

    kbar_i(t) = alpha k_i(t) + (1 - alpha) kbar_i(t-1),      kbar_i(first) = k_i(first)

and weighted by the focal term

    w_i(t) = -(1 - kbar_i(t))^gamma_i log kbar_i(t),

so a task that is doing badly (small KPI) gets a large weight and a solved task (KPI 1)
gets weight 0. ``gamma_i`` is the focusing parameter (per task or shared). The paper
leaves ``alpha`` open; the default here is 0.1 (a slow average, as in common
reimplementations).

Pass the KPIs with the losses: ``balancer(losses, kpi={"seg": acc_seg, ...})`` (or a
sequence in task order). A step without ``kpi`` reuses the current averages; the first
step must have them. A KPI outside (0, 1] raises :class:`~taskbalance.errors.InvalidKPIError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import InvalidKPIError
from taskbalance.registry import register


def dtp_weights(kpi: Tensor, gamma: Tensor) -> Tensor:
    """``-(1 - kpi)^gamma * log(kpi)`` elementwise, for ``kpi`` in (0, 1]."""
    return -((1.0 - kpi) ** gamma) * torch.log(kpi)


@register("dtp")
class DTP(Balancer):
    """DTP (Guo et al., ECCV 2018): w_i = -(1 - kbar_i)^gamma_i log kbar_i from task KPIs.

    See the module docstring for the KPI moving average.
    """

    uses_kpi = True

    def __init__(
        self,
        tasks: Tasks,
        gamma: float | Sequence[float] = 1.0,
        alpha: float = 0.1,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        given = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
        if given.numel() == 1:
            given = given.expand(self.num_tasks)
        gammas = [float(g) for g in self.values_by_task(given.tolist(), "gamma values")]
        if any(not (g >= 0 and math.isfinite(g)) for g in gammas):
            raise ValueError(f"gamma must be finite and non-negative, got {gammas}")
        self.alpha = float(alpha)
        self.gamma = torch.tensor(gammas, dtype=torch.float64)
        self.kpi: Tensor | None = None  # the moving averages kbar

    def _kpi_vector(self, kpi: Mapping[str, float] | Sequence[float] | Tensor) -> Tensor:
        if isinstance(kpi, Tensor):
            kpi = kpi.reshape(-1).tolist()
        values = [float(v) for v in self.values_by_task(kpi, "KPIs")]
        for task, value in zip(self.tasks, values):
            if not (0.0 < value <= 1.0):
                raise InvalidKPIError(f"KPI of task {task!r} must be in (0, 1], got {value}")
        return torch.tensor(values, dtype=torch.float64)

    def update_kpi(self, kpi: Mapping[str, float] | Sequence[float] | Tensor) -> Tensor:
        """Fold new KPI values into the moving averages; return the averages.

        Under DDP the KPIs are averaged over the ranks first (every rank must call it), which
        is the global KPI for a per-sample mean such as accuracy on equal local batches.
        """
        new = self._kpi_vector(kpi)
        sync = self.current_sync()
        if sync is not None:
            new = sync.mean([new])[0]
        self.kpi = new if self.kpi is None else self.alpha * new + (1 - self.alpha) * self.kpi
        return self.kpi

    def compute_weights(self, losses: Tensor, kpi: Any = None, **context: Any) -> Tensor:
        if kpi is not None:
            self.update_kpi(kpi)
        if self.kpi is None:
            raise InvalidKPIError(
                "DTP needs the tasks' KPIs: call balancer(losses, kpi=...) or "
                "balancer.update_kpi(...) before the first step"
            )
        return dtp_weights(self.kpi, self.gamma).to(losses.device, losses.dtype)

    def merge_context(self, contexts: list[dict[str, Any]]) -> dict[str, Any]:
        """Under accumulation the step's KPI is the mean of its micro-batches' KPIs."""
        given = [self._kpi_vector(c["kpi"]) for c in contexts if c.get("kpi") is not None]
        return {"kpi": torch.stack(given).mean(dim=0)} if given else {}

    def method_state(self) -> dict[str, Any]:
        return {"kpi": self.kpi}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.kpi = state["kpi"]
