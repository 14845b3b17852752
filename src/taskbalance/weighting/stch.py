"""Smooth Tchebycheff scalarization (STCH).

Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024. The paper's scalarization of objectives f_i with preference λ and
reference (ideal) point z* is ``g_μ(f) = μ log Σ_i exp(λ_i (f_i - z_i*) / μ)``, a smooth
``max_i λ_i (f_i - z_i*)``. Its multi-task recipe (the authors' ``STCH_MTL`` code, also in
LibMTL), reproduced here:

* objectives are the log-losses and the reference point is the log of the *nadir* vector
  n, the mean loss of each task over the last warm-up period: ``f_i - z_i* = log(L_i/n_i)``;
* warm-up: the first ``warmup_periods`` periods train on ``Σ_i log L_i`` (SI, equal weights
  on the log-losses); the losses of the last of them are averaged into n, then fixed;
* afterwards the returned scalar is ``L = K μ log Σ_i exp(λ̃_i log(L_i/n_i) / μ)``.

λ̃ is the preference rescaled to mean 1 (``preference=`` any positive vector, default
uniform: λ̃ = 1, the authors' code). The paper's λ on the simplex is λ̃/K, and L is ``K²``
times the paper's g with smoothing μ/K: the same minimiser and gradient direction.
Defaults from the authors' code: ``mu=1.0``, ``warmup_periods=5`` (their
``STCH_warmup_epoch=4``: epochs 0..3 train, epoch 4 also records n). ``nadir=`` gives n
directly and skips the warm-up.

Weights. The recorded weight of task i is ``dL/dL_i`` (what ``backward`` applies):
``w_i = K λ̃_i s_i / L_i`` with ``s = softmax(λ̃ log(L/n) / μ)``, and ``1/L_i`` in the
warm-up. The weights on the log-losses, ``w_i L_i = K λ̃_i s_i``, sum to K for a uniform
preference. μ → 0 puts all of K on the task with the largest ``λ̃_i log(L_i/n_i)``
(Tchebycheff); μ → ∞ gives ``λ̃_i``, the λ-weighted sum of the log-losses.

Periods are closed by :meth:`STCH.end_period` (each epoch, as in the paper) or every
``steps_per_period`` steps; a warm-up period that grows implausibly long warns once. Every
loss must be strictly positive (a log is taken): else
:class:`~taskbalance.errors.NonPositiveLossError` naming the task (the authors add 1e-20).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import BalancerUsageError, NonPositiveLossError, warn
from taskbalance.registry import register
from taskbalance.weighting.dwa import FORGOTTEN_END_PERIOD_STEPS


def stch_weights(losses: Tensor, nadir: Tensor, preference: Tensor, mu: float) -> Tensor:
    """``dL/dL_i = K λ̃_i softmax_i(λ̃ log(L/n) / μ) / L_i`` of positive losses ``(K,)``."""
    shares = torch.softmax(preference * torch.log(losses / nadir) / mu, dim=0)
    return losses.numel() * preference * shares / losses


def stch_loss(losses: Tensor, nadir: Tensor, preference: Tensor, mu: float) -> Tensor:
    """``K μ log Σ_i exp(λ̃_i log(L_i/n_i) / μ)``, differentiable in the losses."""
    scaled = preference.to(losses.dtype) * torch.log(losses / nadir.to(losses.dtype)) / mu
    return losses.numel() * mu * torch.logsumexp(scaled, dim=0)


def _positive_vector(values: Sequence[float], k: int, what: str) -> Tensor:
    vector = torch.as_tensor(values, dtype=torch.float64).flatten()
    if vector.numel() != k or not bool((vector > 0).all() & vector.isfinite().all()):
        raise ValueError(f"{what} must be {k} positive finite numbers, got {list(values)}")
    return vector


@register("stch", "smooth_tchebycheff")
class STCH(Balancer):
    """STCH (Lin et al., ICML 2024): L = K μ log Σ exp(λ̃_i log(L_i/n_i) / μ) after a warm-up.

    See the module docstring for the warm-up, the normalisation and the defaults.
    """

    def __init__(
        self,
        tasks: Tasks,
        mu: float = 1.0,
        warmup_periods: int = 5,
        steps_per_period: int | None = None,
        preference: Sequence[float] | None = None,
        nadir: Sequence[float] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be a positive finite number, got {mu}")
        for name, value, low in (
            ("warmup_periods", warmup_periods, 1),
            ("steps_per_period", steps_per_period, 1),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            ):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.mu = float(mu)
        self.warmup_periods = warmup_periods
        self.steps_per_period = steps_per_period
        k = self.num_tasks
        given = (
            torch.ones(k, dtype=torch.float64)
            if preference is None
            else _positive_vector(preference, k, "preference")
        )
        self.preference = k * given / given.sum()  # λ̃: mean 1
        self._nadir: Tensor | None = None if nadir is None else _positive_vector(nadir, k, "nadir")
        self._periods = 0  # warm-up periods closed so far
        self._sum: Tensor | None = None  # running sum of the open warm-up period's losses
        self._count = 0
        self._warned = False
        self._stch_step = False  # whether the weights just computed are STCH's (for combine)

    @property
    def nadir(self) -> Tensor | None:
        """The nadir vector n (mean losses of the last warm-up period), ``None`` until fixed."""
        return self._nadir

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        values = losses.detach().double()
        for task, value in zip(self.tasks, values.tolist()):
            if not value > 0:
                raise NonPositiveLossError(task, value, "STCH (log of losses)")
        self._stch_step = self._nadir is not None
        if self._stch_step:
            assert self._nadir is not None
            weights = stch_weights(
                values, self._nadir.to(values.device), self.preference.to(values.device), self.mu
            )
            return weights.to(losses.dtype)
        self._sum = values if self._sum is None else self._sum + values
        self._count += 1
        if self._count == self.steps_per_period:
            self._close_period()
        elif not self._warned and self._count >= FORGOTTEN_END_PERIOD_STEPS:
            self._warned = True
            warn(
                f"STCH: warm-up period {self._periods + 1} of {self.warmup_periods} is "
                f"{self._count} steps long; end_period() may have been forgotten, and STCH "
                "stays in its warm-up (sum of log losses) until warmup_periods periods have "
                "closed. Call balancer.end_period() at the end of every epoch, or build it "
                "with steps_per_period=<steps per epoch>"
            )
        return (1.0 / values).to(losses.dtype)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        if not self._stch_step:
            return torch.log(losses).sum()
        assert self._nadir is not None
        return stch_loss(
            losses, self._nadir.to(losses.device), self.preference.to(losses.device), self.mu
        )

    def end_period(self) -> None:
        """Close the current period; after the warm-up a no-op.

        Under gradient accumulation call it between accumulated steps (after the N-th
        micro-batch, or after :meth:`flush`); inside an open one it raises.
        """
        if self._open is not None:
            raise BalancerUsageError(
                f"STCH.end_period() inside an accumulated step ({self.micro_step} of "
                f"{self.accumulation_steps} micro-batches): call flush() first, or end the "
                "period after the step's last micro-batch"
            )
        self._close_period()

    def _close_period(self) -> None:
        if self._nadir is not None or self._sum is None or self._count == 0:
            return
        self._periods += 1
        if self._periods >= self.warmup_periods:
            self._nadir = self._sum / self._count
        self._sum, self._count = None, 0

    def method_state(self) -> dict[str, Any]:
        return {
            "periods": self._periods,
            "sum": self._sum,
            "count": self._count,
            "nadir": self._nadir,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._periods = int(state["periods"])
        self._sum = state["sum"]
        self._count = int(state["count"])
        self._nadir = state["nadir"]
