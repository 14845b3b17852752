"""Dynamic Weight Averaging (DWA).

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. (7):

    r_i(t-1) = L_i(t-1) / L_i(t-2)
    w_i(t)   = K exp(r_i(t-1) / T) / sum_n exp(r_n(t-1) / T)

so the weights always sum to K; ``w_i = 1`` for the first two periods (t = 1, 2), when
there is no ratio yet. T is the temperature (paper: 2); a larger T flattens the weights.

The paper's period is an epoch and L_i(t) is the task's mean training loss over that epoch
(``period="epoch"``, the default; call :meth:`DWA.end_period` at each epoch end). A widely
copied Keras recipe updates every batch from the last two batch losses (``period="step"``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import BalancerUsageError, NonPositiveLossError
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")

#: steps in one period after which a forgotten ``end_period()`` is reported.
FORGOTTEN_END_PERIOD_STEPS = 100_000


def dwa_weights(previous: Tensor, before: Tensor, temperature: float = 2.0) -> Tensor:
    """``K softmax(r / T)`` with ``r = previous / before`` (both ``(K,)``, positive)."""
    ratio = previous / before
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


@register("dwa")
class DWA(Balancer):
    """Dynamic Weight Averaging (Liu et al., CVPR 2019): w = K softmax(L(t-1) / L(t-2) / T).

    See the module docstring for the periods and defaults.
    """

    def __init__(
        self,
        tasks: Tasks,
        temperature: float = 2.0,
        period: Literal["epoch", "step"] = "epoch",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if period not in ("epoch", "step"):
            raise ValueError(f"period must be 'epoch' or 'step', got {period!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.period = period
        self._sum: Tensor | None = None  # running sum of losses in the open period
        self._count = 0
        self._means: list[Tensor] = []  # mean losses of the last two closed periods
        self._weights: Tensor | None = None

    def _period_weights(self, like: Tensor) -> Tensor:
        if len(self._means) < 2:
            return torch.ones(self.num_tasks, dtype=like.dtype, device=like.device)
        before, previous = self._means
        return dwa_weights(previous, before, self.temperature).to(like.dtype)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        if self._weights is None:
            self._weights = self._period_weights(losses)
        weights = self._weights
        if self.period == "step":
            self._check_positive(losses.double())
        self._sum = losses.double() if self._sum is None else self._sum + losses.double()
        self._count += 1
        if self.period == "step":
            self._close_period()
        elif self._count == FORGOTTEN_END_PERIOD_STEPS:
            logger.warning(
                "DWA(period='epoch') saw %d steps without end_period(): its weights change "
                "only when periods close; call balancer.end_period() at each epoch end",
                self._count,
            )
        return weights

    def end_period(self) -> None:
        """Close the current period: its mean loss becomes L(t-1) for the next weights.

        Under gradient accumulation, call it between accumulated steps (after the N-th
        micro-batch, or after :meth:`flush`); inside an open one it raises.
        """
        if self._open is not None:
            raise BalancerUsageError(
                f"DWA.end_period() inside an accumulated step ({self.micro_step} of "
                f"{self.accumulation_steps} micro-batches): call flush() first, or end the "
                "period after the step's last micro-batch"
            )
        self._close_period()

    def _close_period(self) -> None:
        if self._count == 0 or self._sum is None:
            return
        mean = self._sum / self._count
        try:
            self._check_positive(mean)
        except NonPositiveLossError:
            self._sum, self._count, self._weights = None, 0, None  # drop the bad period
            raise
        self._means = [*self._means, mean][-2:]
        self._sum, self._count, self._weights = None, 0, None

    def _check_positive(self, values: Tensor) -> None:
        for task, value in zip(self.tasks, values.tolist()):
            if not value > 0:
                raise NonPositiveLossError(task, value, "DWA (loss ratios)")

    def method_state(self) -> dict[str, Any]:
        return {
            "sum": self._sum,
            "count": self._count,
            "means": list(self._means),
            "weights": self._weights,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._sum = state["sum"]
        self._count = int(state["count"])
        self._means = list(state["means"])
        self._weights = state["weights"]
