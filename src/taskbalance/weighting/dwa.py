"""Dynamic Weight Averaging (DWA).

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. (7):

    r_i(t-1) = L_i(t-1) / L_i(t-2)
    w_i(t)   = K exp(r_i(t-1) / T) / sum_n exp(r_n(t-1) / T)

so the weights always sum to K; ``w_i = 1`` for the first two periods (t = 1, 2), when
there is no ratio yet. T is the temperature (paper: 2); a larger T flattens the weights.

The paper's period is an epoch and L_i(t) is the task's mean training loss over that epoch
(``period="epoch"``, the default; call :meth:`DWA.end_period` at each epoch end — the
library's training loops and its Lightning integration do — or give ``steps_per_period=N``
to close a period every N steps). A widely copied Keras recipe updates every batch from the
last two batch losses (``period="step"``).

A forgotten ``end_period()`` would make DWA equal weighting forever, so an open period that
grows implausibly long warns once (:class:`~taskbalance.errors.TaskBalanceWarning`): at
:data:`FORGOTTEN_END_PERIOD_STEPS` steps when no period has been closed yet, and at
:data:`LONG_PERIOD_FACTOR` times the longest closed period (at least
:data:`FORGOTTEN_END_PERIOD_MIN` steps) afterwards.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import BalancerUsageError, NonPositiveLossError, warn
from taskbalance.registry import register

#: steps of a first period after which a forgotten ``end_period()`` is reported (an epoch of
#: MNIST at batch 32 is 1,875 steps; of NYUv2 at batch 2, 398; of CIFAR-10 at batch 128, 391).
FORGOTTEN_END_PERIOD_STEPS = 2_000
#: once periods have closed: a period this many times longer than the longest one so far.
LONG_PERIOD_FACTOR = 4
#: ... but never fewer steps than this.
FORGOTTEN_END_PERIOD_MIN = 100


def dwa_weights(previous: Tensor, before: Tensor, temperature: float = 2.0) -> Tensor:
    """``K softmax(r / T)`` with ``r = previous / before`` (both ``(K,)``, positive)."""
    ratio = previous / before
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


def check_dwa_arguments(temperature: float, period: str, steps_per_period: int | None) -> None:
    """DWA's constructor arguments, checked (shared with the Keras DWA).

    Raises:
        ValueError: a period other than ``"epoch"``/``"step"``, ``steps_per_period`` not a
            positive int or given with ``period="step"``, a temperature that is not positive.
    """
    if period not in ("epoch", "step"):
        raise ValueError(f"period must be 'epoch' or 'step', got {period!r}")
    if steps_per_period is not None and (
        isinstance(steps_per_period, bool)
        or not isinstance(steps_per_period, int)
        or steps_per_period < 1
        or period != "epoch"
    ):
        raise ValueError(
            "steps_per_period must be a positive int, with period='epoch' (got "
            f"steps_per_period={steps_per_period!r}, period={period!r})"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


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
        steps_per_period: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        check_dwa_arguments(temperature, period, steps_per_period)
        self.steps_per_period = steps_per_period
        self.temperature = float(temperature)
        self.period = period
        self._sum: Tensor | None = None  # running sum of losses in the open period
        self._count = 0
        self._means: list[Tensor] = []  # mean losses of the last two closed periods
        self._weights: Tensor | None = None
        self._longest = 0  # steps in the longest period closed so far
        self._warned = False

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
        if self.period == "step" or self._count == self.steps_per_period:
            self._close_period()
        elif not self._warned and self._count >= self._period_warning_steps():
            self._warned = True
            closed = f"the longest so far had {self._longest}" if self._longest else "none closed"
            warn(
                f"DWA(period='epoch'): the current period is {self._count} steps long ("
                f"{closed}); end_period() may have been forgotten, and DWA's weights change "
                "only when periods close (until two have, it is equal weighting). Call "
                "balancer.end_period() at the end of every epoch, or build it with "
                "steps_per_period=<steps per epoch> or period='step'"
            )
        return weights

    def _period_warning_steps(self) -> int:
        """Open-period length at which a forgotten ``end_period()`` is reported."""
        if self._longest == 0:
            return FORGOTTEN_END_PERIOD_STEPS
        return max(LONG_PERIOD_FACTOR * self._longest, FORGOTTEN_END_PERIOD_MIN)

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
        self._longest = max(self._longest, self._count)
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
            "longest": self._longest,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._sum = state["sum"]
        self._count = int(state["count"])
        self._means = list(state["means"])
        self._weights = state["weights"]
        self._longest = int(state.get("longest", 0))
