"""FAMO: Fast Adaptive Multitask Optimization; Keras 3 port of
:mod:`taskbalance.weighting.famo` (without ``update()``).

Liu, Liu, Jin, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(Algorithm 1). With logits ``xi`` (init 0), ``z = softmax(xi)`` and
``D_i = L_i - L*_i + eps``:

    L = (1/c) sum_i z_i log D_i,    c = sum_i z_i / D_i  (held constant),    w_i = z_i / (c D_i)

and one Adam step of ``xi`` per step on ``z * (delta - (z . delta)) + gamma xi``, with
``delta = log D(previous step) - log D(this step)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from taskbalance.balancer import task_names
from taskbalance.keras.base import NONPOSITIVE, KerasBalancer, _read, register


@register("famo")
class FAMO(KerasBalancer):
    """FAMO (Liu et al., NeurIPS 2023): weights ``z_i / (c D_i)`` with ``z = softmax(xi)``,
    ``D = L - L* + eps`` and ``c = sum_i z_i / D_i``; the loss is ``(1/c) sum_i z_i log D_i``.

    The logits take one Adam step (lr 0.025, betas (0.9, 0.999), epsilon 1e-8, coupled L2
    decay ``gamma``) per step on ``z * (delta - z.delta) + gamma xi`` with
    ``delta = log D(previous step) - log D(this step)``: the next batch's losses stand in
    for the losses recomputed after the model step (PyTorch's FAMO without ``update()``;
    exact for full-batch training). Their gradient is analytic; the logits and Adam's
    moments are non-trainable variables, so no optimizer or weight decay touches them.
    """

    method_name = "famo"
    positive_label = "FAMO (log of loss minus min_losses)"

    def __init__(
        self,
        tasks: int | Sequence[str],
        lr: float = 0.025,
        gamma: float = 0.01,
        min_losses: Sequence[float] | None = None,
        eps: float = 1e-8,
        **kw: Any,
    ) -> None:
        if gamma < 0 or eps < 0:
            raise ValueError("gamma and eps must be non-negative")
        names = task_names(tasks)
        floor = [0.0] * len(names) if min_losses is None else [float(v) for v in min_losses]
        if len(floor) != len(names):
            raise ValueError(f"{len(floor)} min_losses given for {len(names)} tasks")
        self.lr, self.gamma, self.eps, self.min_losses = float(lr), float(gamma), float(eps), floor
        super().__init__(tasks, **kw)
        k = self.num_tasks
        self.logits = self._state("logits", (k,), [0.0] * k)
        self.adam_m = self._state("adam_m", (k,), [0.0] * k)
        self.adam_v = self._state("adam_v", (k,), [0.0] * k)
        self.adam_t = self._state("adam_t", (), 0.0)
        self.before = self._state("before", (k,), [0.0] * k)  # log D of the previous step
        self.has_before = self._state("has_before", (), 0.0)
        self.z = self._state("z", (k,), [1.0 / k] * k)

    def _initial_weights(self) -> list[float]:
        return [1.0 / len(self.tasks)] * len(self.tasks)

    def _config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "gamma": self.gamma,
            "min_losses": list(self.min_losses),
            "eps": self.eps,
        }

    def extras(self) -> dict[str, Any]:
        return {"z": _read(self.z)}

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        floor = ops.convert_to_tensor(self.min_losses, "float32")
        return [(NONPOSITIVE, losses - floor <= 0, losses)]

    def _log_gap(self, losses: Any) -> Any:
        gap = losses - ops.convert_to_tensor(self.min_losses, "float32") + self.eps
        return ops.log(ops.where(gap > 0, gap, ops.ones_like(gap))), gap

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        log_gap, gap = self._log_gap(losses)
        xi = _read(self.logits)
        # one Adam step of the logits from the previous step's log D (torch.optim.Adam)
        z_old = ops.softmax(xi)
        delta = _read(self.before) - ops.stop_gradient(log_gap)
        grad = z_old * (delta - ops.sum(z_old * delta)) + self.gamma * xi
        t = _read(self.adam_t) + 1
        m = 0.9 * _read(self.adam_m) + 0.1 * grad
        v = 0.999 * _read(self.adam_v) + 0.001 * grad * grad
        denom = ops.sqrt(v) / ops.sqrt(1 - ops.power(0.999, t)) + 1e-8
        stepped = xi - (self.lr / (1 - ops.power(0.9, t))) * m / denom
        catch_up = _read(self.has_before) > 0
        xi = ops.where(catch_up, stepped, xi)
        z = ops.softmax(xi)
        c = ops.sum(z / ops.stop_gradient(gap))
        weights = ops.stop_gradient(z / gap / c)
        total = ops.sum(ops.stop_gradient(z / c) * log_gap)
        updates = [
            (self.logits, xi),
            (self.adam_m, ops.where(catch_up, m, _read(self.adam_m))),
            (self.adam_v, ops.where(catch_up, v, _read(self.adam_v))),
            (self.adam_t, ops.where(catch_up, t, _read(self.adam_t))),
            (self.before, log_gap),
            (self.has_before, ops.ones(())),
            (self.z, z),
        ]
        return total, weights, updates

    def evaluation_loss(self, losses: Any) -> Any:
        log_gap, gap = self._log_gap(losses)
        z = ops.softmax(_read(self.logits))
        c = ops.sum(z / gap)
        return ops.sum(ops.stop_gradient(z / c) * log_gap)
