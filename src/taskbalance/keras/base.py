"""The base of the Keras 3 balancers: :class:`KerasBalancer`, its helpers and the registry.

Each method is a :class:`keras.layers.Layer` whose state (DWA's period means, DTP's KPI
averages, RLW's random generator, uncertainty weighting's and IMTL-L's learnable scales)
is held in Keras variables, so that it is traced into the compiled train step of every
backend, saved with the model (``.keras``) and restored exactly. The formulas, defaults
and state transitions are those of the PyTorch classes in :mod:`taskbalance.weighting`
and :mod:`taskbalance.aggregation.imtl` (the cross-framework tests compare both).

A step never raises inside the compiled function (it cannot, under ``jax.jit`` or
``tf.function``): it records an error code, the first offending task and its value in
variables, leaves the method's state untouched and returns a zero loss; the
:class:`~taskbalance.keras.model.BalancedModel` reads them from the step's logs and raises
the error of the PyTorch side (or, for a non-finite loss under ``nonfinite="skip_step"``,
logs the skipped step). See ``docs/keras.md``.

Every method lives in its own module of this package and is registered by name with
:func:`register`, which also registers it with Keras as ``taskbalance>ClassName`` (what a
``.keras`` file names it by). Adding a method: one module with the class decorated by
``@register("name", "alias", ...)``, and its import in :mod:`taskbalance.keras.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import keras
from keras import ops

from taskbalance.balancer import task_names
from taskbalance.errors import TaskMismatchError

#: error codes written by a step (read back by the model's callback)
OK, NONFINITE, NONPOSITIVE, BAD_KPI = 0, 1, 2, 3

_PACKAGE = "taskbalance"


def _by_task(tasks: tuple[str, ...], values: Any, what: str) -> list[Any]:
    """Per-task values in task order from a mapping or a sequence (the PyTorch side's
    ``values_by_task``: unknown or missing names raise ``TaskMismatchError``)."""
    if isinstance(values, Mapping):
        by_name = {str(k): v for k, v in values.items()}
        missing = [t for t in tasks if t not in by_name]
        extra = [n for n in by_name if n not in tasks]
        if missing or extra:
            raise TaskMismatchError(
                f"{what} do not match the tasks {list(tasks)}: missing {missing}, "
                f"unexpected {extra}"
            )
        return [by_name[t] for t in tasks]
    items = list(values)
    if len(items) != len(tasks):
        raise TaskMismatchError(
            f"expected {len(tasks)} {what} (one per task of {list(tasks)}), got {len(items)} {what}"
        )
    return items


def _read(variable: Any) -> Any:
    """A variable's current value as a tensor (inside a traced step: the traced value)."""
    return ops.convert_to_tensor(variable)


class KerasBalancer(keras.layers.Layer):
    """Base class of the Keras balancers: one step maps the ``(K,)`` task losses to the
    scalar to minimise, updating the method's state in Keras variables.

    Args:
        tasks: the number of tasks or their names (the model's output names).
        nonfinite: ``"raise"`` (default) or ``"skip_step"``, as in PyTorch.
    """

    method_name: ClassVar[str] = ""
    #: the method needs per-task KPIs in (0, 1] (DTP)
    uses_kpi: ClassVar[bool] = False
    #: label used in :class:`~taskbalance.errors.NonPositiveLossError`
    positive_label: ClassVar[str] = ""

    def __init__(
        self, tasks: int | Sequence[str], *, nonfinite: str = "raise", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if nonfinite not in ("raise", "skip_step"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip_step', got {nonfinite!r}")
        self.tasks: tuple[str, ...] = task_names(tasks)
        self.nonfinite = nonfinite
        k = len(self.tasks)
        self.task_weights = self._state("task_weights", (k,), self._initial_weights())
        self.steps = self._state("steps", (), 0.0)
        self.skipped_steps = self._state("skipped_steps", (), 0.0)
        self.error = self._state("error", (3,), 0.0)  # code, task index, value
        self.built = True

    # ------------------------------------------------------------------ helpers
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _state(self, name: str, shape: tuple[int, ...], value: Any) -> keras.Variable:
        if isinstance(value, (int, float)):
            init = keras.initializers.Constant(float(value))
        else:
            values = [float(v) for v in value]
            init = keras.initializers.Constant(values)
        return self.add_weight(
            name=name, shape=shape, initializer=init, trainable=False, dtype="float32"
        )

    def _initial_weights(self) -> list[float]:
        return [1.0] * len(self.tasks)

    def _config(self) -> dict[str, Any]:
        """The method's constructor arguments (besides tasks and nonfinite)."""
        return {}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"tasks": list(self.tasks), "nonfinite": self.nonfinite})
        config.update(self._config())
        return config

    # ------------------------------------------------------------------ the method
    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        """``(total, weights, updates)`` for finite, checked losses ``(K,)``; ``updates``
        are ``(variable, new value)`` pairs applied only when the step is valid. Every
        method overrides it."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute")

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        """Method-specific invalid inputs: ``(code, bad mask (K,), values (K,))``."""
        return []

    def evaluation_loss(self, losses: Any) -> Any:
        """The loss reported by ``evaluate``: no state changes (PyTorch's ``evaluate``)."""
        weights = ops.stop_gradient(_read(self.task_weights))
        return ops.sum(weights * losses)

    def extras(self) -> dict[str, Any]:
        """Per-task values ``(K,)`` logged next to the weights (e.g. sigma)."""
        return {}

    def balance(self, losses: Any, kpi: Any = None) -> Any:
        """One training step: the scalar to minimise from the ``(K,)`` task losses.

        ``kpi`` is a ``(K,)`` tensor of KPIs for methods that use them (DTP).
        """
        losses = ops.cast(ops.reshape(losses, (-1,)), "float32")
        finite_mask = ops.isfinite(losses)
        finite = ops.all(finite_mask)
        safe = ops.where(finite_mask, losses, ops.ones_like(losses))
        if kpi is not None:
            kpi = ops.cast(ops.reshape(kpi, (-1,)), "float32")
        # the first failing check, in the PyTorch side's order
        checks = [(NONFINITE, ops.logical_not(finite_mask), losses)]
        checks += self.problems(safe, kpi)
        code = ops.zeros((), "float32")
        where_bad = ops.zeros((), "float32")
        value = ops.zeros((), "float32")
        for check_code, bad, values in reversed(checks):
            any_bad = ops.any(bad)
            index = ops.argmax(ops.cast(bad, "int32"))
            code = ops.where(any_bad, float(check_code), code)
            where_bad = ops.where(any_bad, ops.cast(index, "float32"), where_bad)
            value = ops.where(any_bad, ops.take(values, index), value)
        ok = ops.equal(code, 0.0)
        if kpi is not None:
            kpi = ops.where(ops.logical_and(kpi > 0, kpi <= 1), kpi, ops.ones_like(kpi))
        total, weights, updates = self.compute(safe, kpi)
        for variable, new in updates:
            variable.assign(ops.where(ok, ops.stop_gradient(new), _read(variable)))
        self.task_weights.assign(
            ops.where(ok, ops.stop_gradient(weights), _read(self.task_weights))
        )
        self.steps.assign(_read(self.steps) + ops.cast(ok, "float32"))
        if self.nonfinite == "skip_step":
            skipped = ops.cast(ops.logical_not(finite), "float32")
            self.skipped_steps.assign(_read(self.skipped_steps) + skipped)
        self.error.assign(ops.stack([code, where_bad, value]))
        return ops.where(ok, total, ops.zeros_like(total))

    def call(self, losses: Any, kpi: Any = None) -> Any:
        return self.balance(losses, kpi)


#: every Keras method by name and alias (filled by :func:`register`)
METHODS: dict[str, type[KerasBalancer]] = {}

_Method = TypeVar("_Method", bound=type[KerasBalancer])


def register(*names: str) -> Callable[[_Method], _Method]:
    """Class decorator: a method under ``names`` in :data:`METHODS` (its ``method_name``
    first, then the aliases), registered with Keras as ``taskbalance>ClassName`` so that
    a saved ``.keras`` file loads it back."""

    def add(cls: _Method) -> _Method:
        taken = [n for n in names if n in METHODS and METHODS[n] is not cls]
        if taken:
            raise ValueError(f"method name {taken[0]!r} is already registered")
        keras.saving.register_keras_serializable(package=_PACKAGE)(cls)
        METHODS.update(dict.fromkeys(names, cls))
        return cls

    return add
