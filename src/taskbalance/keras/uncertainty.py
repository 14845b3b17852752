"""Uncertainty weighting (homoscedastic task uncertainty); Keras 3 port of
:mod:`taskbalance.weighting.uncertainty`.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018. With a trainable ``s_i = log sigma_i^2`` (init 0):

    "kendall" (default):  L = sum_i exp(-s_i) L_i + s_i
    "paper" (eqs. 7, 10): L = sum_i c_i exp(-s_i) L_i + 0.5 s_i,
                          c_i = 0.5 (regression) or 1 (classification)
    "positive":           L = sum_i 0.5 / p_i^2 L_i + log(1 + p_i^2)   (p init 1)

``sigma_i = exp(s_i / 2)`` (``|p_i|`` for "positive"). ``s`` is stepped by the model's
optimizer without weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

from taskbalance.balancer import task_names
from taskbalance.errors import TaskMismatchError
from taskbalance.keras.base import KerasBalancer, _by_task, _read, register


@register("uncertainty", "uw", "kendall")
class UncertaintyWeighting(KerasBalancer):
    """Uncertainty weighting (Kendall et al., CVPR 2018), variants ``"kendall"``
    (``exp(-s) L + s``), ``"paper"`` (``0.5 exp(-s) L + 0.5 s``, factor 1 for
    classification tasks) and ``"positive"`` (``0.5 / p^2 L + log(1 + p^2)``).

    ``s`` (``p``) is a trainable Keras variable, stepped by the model's optimizer without
    weight decay (:class:`~taskbalance.keras.model.BalancedModel` excludes it).
    """

    method_name = "uncertainty"

    def __init__(
        self,
        tasks: int | Sequence[str],
        variant: str = "kendall",
        task_types: Sequence[str] | Mapping[str, str] | None = None,
        init: float | None = None,
        **kw: Any,
    ) -> None:
        if variant not in ("kendall", "paper", "positive"):
            raise ValueError(f"variant must be 'kendall', 'paper' or 'positive', got {variant!r}")
        names = task_names(tasks)
        if task_types is None:
            types = ["regression"] * len(names)
        elif isinstance(task_types, Mapping):
            extra = [n for n in task_types if n not in names]
            if extra:
                raise TaskMismatchError(
                    f"task types do not match the tasks {list(names)}: unexpected {extra}"
                )
            types = [task_types.get(t, "regression") for t in names]
        else:
            types = list(_by_task(names, task_types, "task types"))
        for task, kind in zip(names, types):
            if kind not in ("regression", "classification"):
                raise ValueError(
                    f"type of task {task!r} must be 'regression' or 'classification', got {kind!r}"
                )
        start = init if init is not None else (1.0 if variant == "positive" else 0.0)
        if not math.isfinite(start):
            raise ValueError(f"init must be finite, got {start}")
        if variant == "positive" and start == 0:
            raise ValueError("the positive variant needs a non-zero init for p (default 1)")
        self.variant, self.types, self.init = variant, types, float(start)
        super().__init__(tasks, **kw)
        self.log_vars = self.add_weight(
            name="log_vars",
            shape=(len(names),),
            initializer=keras.initializers.Constant(self.init),
            trainable=True,
            dtype="float32",
        )
        self.task_weights.assign(ops.stop_gradient(self._terms()[0]))

    def _config(self) -> dict[str, Any]:
        return {"variant": self.variant, "task_types": list(self.types), "init": self.init}

    def _terms(self) -> tuple[Any, Any]:
        s = _read(self.log_vars)
        if self.variant == "kendall":
            return ops.exp(-s), s
        if self.variant == "paper":
            scale = ops.convert_to_tensor(
                [1.0 if t == "classification" else 0.5 for t in self.types], "float32"
            )
            return scale * ops.exp(-s), 0.5 * s
        p2 = s * s
        return 0.5 / p2, ops.log1p(p2)

    @property
    def sigma(self) -> Any:
        """Current ``sigma_i`` per task."""
        s = ops.stop_gradient(_read(self.log_vars))
        return ops.abs(s) if self.variant == "positive" else ops.exp(0.5 * s)

    def extras(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        factor, reg = self._terms()
        return ops.sum(factor * losses + reg), ops.stop_gradient(factor), []

    def evaluation_loss(self, losses: Any) -> Any:
        factor, reg = self._terms()
        return ops.sum(factor * losses + reg)
