"""The loss-level balancing methods in Keras 3, written once with ``keras.ops``.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from taskbalance.balancer import task_names
from taskbalance.errors import InvalidKPIError, TaskMismatchError

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
        are ``(variable, new value)`` pairs applied only when the step is valid."""
        raise NotImplementedError

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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EqualWeighting(KerasBalancer):
    """Equal weighting: ``sum_i L_i`` (or the mean with ``reduction="mean"``)."""

    method_name = "equal"

    def __init__(self, tasks: int | Sequence[str], reduction: str = "sum", **kw: Any) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        super().__init__(tasks, **kw)

    def _initial_weights(self) -> list[float]:
        k = len(self.tasks)
        return [1.0 if self.reduction == "sum" else 1.0 / k] * k

    def _config(self) -> dict[str, Any]:
        return {"reduction": self.reduction}

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        weights = ops.convert_to_tensor(self._initial_weights(), "float32")
        return ops.sum(weights * losses), weights, []


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StaticWeighting(KerasBalancer):
    """Static weighting: ``sum_i w_i L_i`` with fixed weights (by position or task name)."""

    method_name = "static"

    def __init__(
        self, tasks: int | Sequence[str], weights: Sequence[float] | Mapping[str, float], **kw: Any
    ) -> None:
        names = task_names(tasks)
        values = [float(w) for w in _by_task(names, weights, "static weights")]
        for task, value in zip(names, values):
            if not math.isfinite(value):
                raise ValueError(f"static weight of task {task!r} is not finite: {value}")
        self.fixed = values
        super().__init__(tasks, **kw)

    def _initial_weights(self) -> list[float]:
        return list(self.fixed)

    def _config(self) -> dict[str, Any]:
        return {"weights": list(self.fixed)}

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        weights = ops.convert_to_tensor(self.fixed, "float32")
        return ops.sum(weights * losses), weights, []


@keras.saving.register_keras_serializable(package=_PACKAGE)
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class IMTLL(KerasBalancer):
    """IMTL-L (Liu et al., ICLR 2021): ``sum_i exp(s_i) L_i - s_i`` with trainable ``s``
    (init 0), stepped by the model's optimizer without weight decay."""

    method_name = "imtl_l"

    def __init__(self, tasks: int | Sequence[str], **kw: Any) -> None:
        super().__init__(tasks, **kw)
        self.log_scales = self.add_weight(
            name="log_scales",
            shape=(self.num_tasks,),
            initializer="zeros",
            trainable=True,
            dtype="float32",
        )

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        s = _read(self.log_scales)
        return ops.sum(ops.exp(s) * losses - s), ops.stop_gradient(ops.exp(s)), []

    def evaluation_loss(self, losses: Any) -> Any:
        s = _read(self.log_scales)
        return ops.sum(ops.exp(s) * losses - s)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GLS(KerasBalancer):
    """GLS (Chennupati et al., CVPRW 2019): the geometric mean ``(prod_i L_i)^(1/K)``;
    recorded weights ``L / (K L_i)``. Every loss must be strictly positive."""

    method_name = "gls"
    positive_label = "GLS (log of losses)"

    def problems(self, losses: Any, kpi: Any) -> list[tuple[int, Any, Any]]:
        return [(NONPOSITIVE, losses <= 0, losses)]

    def _mean(self, losses: Any) -> Any:
        positive = ops.where(losses > 0, losses, ops.ones_like(losses))
        return ops.exp(ops.mean(ops.log(positive)))

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        total = self._mean(losses)
        weights = ops.stop_gradient(total / (self.num_tasks * losses))
        return total, weights, []

    def evaluation_loss(self, losses: Any) -> Any:
        return self._mean(losses)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RLW(KerasBalancer):
    """RLW (Lin et al., TMLR 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` drawn every step
    from the balancer's seeded Keras generator (its state is saved with the model)."""

    method_name = "rlw"

    def __init__(self, tasks: int | Sequence[str], seed: int = 0, **kw: Any) -> None:
        self.seed = int(seed)
        super().__init__(tasks, **kw)
        self.generator = keras.random.SeedGenerator(self.seed, name="rlw_generator")

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed}

    _STATE_KEY = "rlw_generator_state"

    def save_own_variables(self, store: Any) -> None:
        """Saves the generator's state too (Keras leaves seed generators out of a
        ``.keras`` file, so a resumed run would repeat the draws)."""
        super().save_own_variables(store)
        store[self._STATE_KEY] = self.generator.state

    def load_own_variables(self, store: Any) -> None:
        keys = [k for k in store.keys() if k != self._STATE_KEY]  # noqa: SIM118 (an H5 store)
        super().load_own_variables({k: store[k] for k in keys})
        self.generator.state.assign(ops.convert_to_tensor(np.asarray(store[self._STATE_KEY])))

    def compute(self, losses: Any, kpi: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
        state = self.generator.state
        before = _read(state) + 0  # a copy: a skipped step draws nothing
        z = keras.random.normal((self.num_tasks,), seed=self.generator, dtype="float32")
        after = _read(state) + 0
        weights = ops.softmax(z)
        updates = [(state, after)]
        state.assign(before)  # put back; applied through `updates` only on a valid step
        return ops.sum(weights * losses), weights, updates


@keras.saving.register_keras_serializable(package=_PACKAGE)
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
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


METHODS: dict[str, type[KerasBalancer]] = {}
for _cls, _names in (
    (EqualWeighting, ("equal", "ew", "ls", "linear_scalarization")),
    (StaticWeighting, ("static", "fixed")),
    (UncertaintyWeighting, ("uncertainty", "uw", "kendall")),
    (IMTLL, ("imtl_l",)),
    (GLS, ("gls", "geometric")),
    (RLW, ("rlw", "random")),
    (DWA, ("dwa",)),
    (DTP, ("dtp",)),
    (FAMO, ("famo",)),
):
    for _name in _names:
        METHODS[_name] = _cls


def make(name: str, tasks: int | Sequence[str], **kwargs: Any) -> KerasBalancer:
    """Build a Keras balancer by name (the PyTorch side's names and arguments).

    Gradient-based methods and the loss methods not ported raise ``ValueError`` pointing to
    the PyTorch API.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in METHODS:
        from taskbalance.registry import get

        try:
            get(key)
            in_torch = True
        except KeyError:
            in_torch = False
        known = sorted(set(METHODS))
        where = (
            f"{name!r} exists in taskbalance's PyTorch API (tb.make({name!r}, ...)) but not "
            "for Keras: gradient-based methods need per-task gradients, which the Keras API "
            "does not compute. "
            if in_torch
            else f"unknown method {name!r}. "
        )
        raise ValueError(f"{where}Keras methods: {known}")
    return METHODS[key](tasks, **kwargs)
