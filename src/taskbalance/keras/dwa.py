"""Dynamic Weight Averaging (DWA); Keras 3 port of :mod:`taskbalance.weighting.dwa`.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. (7),
with ``L_i(t)`` the mean loss of period ``t`` (an epoch, N steps, or one step):

    r_i(t-1) = L_i(t-1) / L_i(t-2)
    w_i(t)   = K exp(r_i(t-1) / T) / sum_n exp(r_n(t-1) / T)

and ``w_i = 1`` until two periods have closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from taskbalance.keras.base import NONPOSITIVE, KerasBalancer, _read, register
from taskbalance.weighting.dwa import check_dwa_arguments


@register("dwa")
class DWA(KerasBalancer):
    """DWA (Liu et al., CVPR 2019): ``w = K softmax(L(t-1) / L(t-2) / T)``; ``w = 1`` until
    two periods have closed.

    ``period="epoch"`` (default): a period is an epoch of ``fit`` (the model's callback
    closes it) or, with ``steps_per_period=N``, N steps. ``period="step"``: every batch is
    a period (the weights come from the previous two batches' losses).
    """

    method_name = "dwa"
    positive_label = "DWA (loss ratios)"

    def __init__(
        self,
        tasks: int | Sequence[str],
        temperature: float = 2.0,
        period: str = "epoch",
        steps_per_period: int | None = None,
        **kw: Any,
    ) -> None:
        check_dwa_arguments(temperature, period, steps_per_period)
        self.temperature, self.period = float(temperature), period
        self.steps_per_period = steps_per_period
        super().__init__(tasks, **kw)
        k = self.num_tasks
        self.period_sum = self._state("period_sum", (k,), [0.0] * k)
        self.period_count = self._state("period_count", (), 0.0)
        self.before = self._state("before", (k,), [1.0] * k)  # L(t-2)
        self.previous = self._state("previous", (k,), [1.0] * k)  # L(t-1)
        self.closed = self._state("closed", (), 0.0)  # periods closed, capped at 2
        self.close_pending = self._state("close_pending", (), 0.0)  # set at an epoch's start

    def _config(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "period": self.period,
            "steps_per_period": self.steps_per_period,
        }

    def _weights(self, before: Any, previous: Any, closed: Any) -> Any:
        ratio = previous / before
        weights = self.num_tasks * ops.softmax(ratio / self.temperature)
        return ops.where(closed >= 2, weights, ops.ones_like(weights))

    def _pending_mean(self) -> tuple[Any, Any]:
        count = _read(self.period_count)
        mean = _read(self.period_sum) / ops.maximum(count, 1.0)
        return ops.logical_and(_read(self.close_pending) > 0, count > 0), mean

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        if self.period == "step":
            return [(NONPOSITIVE, losses <= 0, losses)]
        found = []
        closing, mean = self._pending_mean()
        found.append((NONPOSITIVE, ops.logical_and(closing, mean <= 0), mean))
        if self.steps_per_period is not None:
            count = ops.where(closing, 0.0, _read(self.period_count)) + 1
            total = ops.where(closing, 0.0, 1.0) * _read(self.period_sum) + losses
            last = ops.equal(count, float(self.steps_per_period))
            found.append((NONPOSITIVE, ops.logical_and(last, total / count <= 0), total / count))
        return found

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        before = _read(self.before)
        previous = _read(self.previous)
        closed = _read(self.closed)
        if self.period == "step":
            weights = self._weights(before, previous, closed)
            updates = [
                (self.before, previous),
                (self.previous, losses),
                (self.closed, ops.minimum(closed + 1, 2.0)),
            ]
            return ops.sum(weights * losses), weights, updates
        # close the period that the last epoch ended (fit's callback sets close_pending)
        closing, mean = self._pending_mean()
        before = ops.where(closing, previous, before)
        previous = ops.where(closing, mean, previous)
        closed = ops.where(closing, ops.minimum(closed + 1, 2.0), closed)
        period_sum = ops.where(closing, 0.0, 1.0) * _read(self.period_sum)
        count = ops.where(closing, 0.0, _read(self.period_count))
        weights = self._weights(before, previous, closed)
        period_sum = period_sum + losses
        count = count + 1
        if self.steps_per_period is not None:
            full = ops.equal(count, float(self.steps_per_period))
            before = ops.where(full, previous, before)
            previous = ops.where(full, period_sum / count, previous)
            closed = ops.where(full, ops.minimum(closed + 1, 2.0), closed)
            period_sum = ops.where(full, 0.0, 1.0) * period_sum
            count = ops.where(full, 0.0, count)
        updates = [
            (self.before, before),
            (self.previous, previous),
            (self.closed, closed),
            (self.period_sum, period_sum),
            (self.period_count, count),
            (self.close_pending, ops.zeros(())),
        ]
        return ops.sum(weights * losses), weights, updates

    def end_period(self) -> None:
        """Close the current period at the next step (``fit`` calls it at every epoch's
        start; call it yourself at an epoch's end in a custom loop)."""
        self.close_pending.assign(1.0)
