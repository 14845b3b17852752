"""Uncertainty weighting (homoscedastic task uncertainty).

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018. With a learnable ``s_i = log sigma_i^2`` (init 0):

* ``variant="kendall"`` (default; the form of the authors' public code and of most
  reimplementations): ``sum_i exp(-s_i) L_i + s_i``.
* ``variant="paper"`` (eqs. 7 and 10): regression tasks ``0.5 exp(-s_i) L_i + 0.5 s_i``,
  classification tasks ``exp(-s_i) L_i + 0.5 s_i``; choose the type per task with
  ``task_types``.
* ``variant="positive"``: the widely copied positive-definite form
  ``sum_i 0.5 / p_i^2 L_i + log(1 + p_i^2)`` with learnable ``p_i`` (init 1, sigma_i = |p_i|).

For the first two variants ``sigma_i = exp(s_i / 2)``; at the optimum of a squared-error
loss ``sigma_i^2`` equals the task's mean squared error. The recorded weights are the
factors in front of ``L_i`` and the history also records ``sigma``.

The learnable parameters are stepped by the balancer itself by default (Adam, lr 1e-3,
weight decay 0); see :mod:`taskbalance.learnable` for ``optimizer="external"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import BalancerUsageError
from taskbalance.learnable import OptimizerMode, OwnedParameters
from taskbalance.registry import register

Variant = Literal["kendall", "paper", "positive"]


def uncertainty_terms(
    log_vars: Tensor, variant: str, classification: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-task ``(factor, regulariser)`` so that the loss is ``sum factor*L + regulariser``.

    ``log_vars`` holds ``s_i`` (or ``p_i`` for ``"positive"``); ``classification`` is a
    boolean ``(K,)`` mask used by ``"paper"``.
    """
    if variant == "kendall":
        return torch.exp(-log_vars), log_vars
    if variant == "paper":
        if classification is None:
            classification = torch.zeros_like(log_vars, dtype=torch.bool)
        factor = torch.where(classification, 1.0, 0.5) * torch.exp(-log_vars)
        return factor, 0.5 * log_vars
    if variant == "positive":
        p2 = log_vars**2
        return 0.5 / p2, torch.log1p(p2)
    raise ValueError(f"unknown uncertainty variant {variant!r}")


@register("uncertainty", "uw", "kendall")
class UncertaintyWeighting(Balancer):
    """Uncertainty weighting (Kendall et al., CVPR 2018): exp(-s_i) L_i + s_i, s_i learned.

    See the module docstring for the three variants.
    """

    def __init__(
        self,
        tasks: Tasks,
        variant: Variant = "kendall",
        task_types: Sequence[str] | Mapping[str, str] | None = None,
        init: float | None = None,
        optimizer: OptimizerMode = "own",
        lr: float = 1e-3,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if variant not in ("kendall", "paper", "positive"):
            raise ValueError(f"variant must be 'kendall', 'paper' or 'positive', got {variant!r}")
        self.variant = variant
        types = self._task_types(task_types)
        self.classification = torch.tensor([t == "classification" for t in types])
        start = init if init is not None else (1.0 if variant == "positive" else 0.0)
        if not math.isfinite(start):
            raise ValueError(f"init must be finite, got {start}")
        if variant == "positive" and start == 0:
            raise ValueError("the positive variant needs a non-zero init for p (default 1)")
        self.learnable = OwnedParameters(
            type(self).__name__,
            {"log_vars": torch.full((self.num_tasks,), float(start))},
            optimizer=optimizer,
            lr=lr,
        )

    def _task_types(self, task_types: Sequence[str] | Mapping[str, str] | None) -> list[str]:
        if task_types is None:
            return ["regression"] * self.num_tasks
        given = self.values_by_task(task_types, "task types", partial=True)
        types = [kind if kind is not None else "regression" for kind in given]
        for task, kind in zip(self.tasks, types):
            if kind not in ("regression", "classification"):
                raise ValueError(
                    f"type of task {task!r} must be 'regression' or 'classification', got {kind!r}"
                )
        return types

    @property
    def log_vars(self) -> torch.nn.Parameter:
        """The learnable ``s_i`` (``p_i`` for the positive variant)."""
        return self.learnable["log_vars"]

    @property
    def sigma(self) -> Tensor:
        """Current ``sigma_i`` per task."""
        s = self.log_vars.detach()
        return s.abs() if self.variant == "positive" else torch.exp(0.5 * s)

    def _terms(self) -> tuple[Tensor, Tensor]:
        return uncertainty_terms(self.log_vars, self.variant, self.classification)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        self.learnable.check_ready()
        self.learnable.to(losses.device)
        self.classification = self.classification.to(losses.device)
        return self._terms()[0].detach().to(losses.dtype)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        factor, reg = self._terms()
        return (factor.to(losses.dtype) * losses + reg.to(losses.dtype)).sum()

    def extras(self) -> dict[str, Tensor]:
        return {"sigma": self.sigma}

    def method_state(self) -> dict[str, Any]:
        return {"variant": self.variant, **self.learnable.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if state.get("variant") != self.variant:
            raise BalancerUsageError(
                f"state of uncertainty variant {state.get('variant')!r} cannot be loaded into "
                f"variant {self.variant!r}"
            )
        self.learnable.load_state_dict(state)
