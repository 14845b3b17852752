"""``BalancedModel``: a multi-output Keras model trained with a taskbalance method.

Wrap a model whose outputs are one per task (a dict keyed by task name, or a list in task
order), then compile and fit as usual::

    model = BalancedModel(net, tbk.make("dwa", tasks=["a", "b"]))
    model.compile(optimizer="adam", loss={"a": "mse", "b": "mse"})
    model.fit(x, {"a": ya, "b": yb}, epochs=3)

The per-task losses are computed from ``compile``'s ``loss=`` dict and combined by the
balancer inside the train step (:meth:`BalancedModel.compute_loss`), on every backend.
The balancer's trainable variables (uncertainty weighting, IMTL-L) are trained by the
model's optimizer and always excluded from its weight decay. ``fit`` logs, per task,
``<task>_loss``, ``<task>_weight`` (and ``<task>_sigma`` for uncertainty weighting), and
raises the PyTorch side's errors after the step that produced them. See ``docs/keras.md``
and ``docs/adr/0004-keras-balanced-model.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from taskbalance.errors import (
    BalancerUsageError,
    InvalidKPIError,
    NonFiniteLossError,
    NonPositiveLossError,
    TaskMismatchError,
)
from taskbalance.keras.methods import BAD_KPI, NONFINITE, NONPOSITIVE, KerasBalancer

logger = logging.getLogger("taskbalance")

#: log keys used only to carry a step's status from the compiled step to the callback
STATUS_KEYS = ("tb_error_code", "tb_error_task", "tb_error_value")


class _BalancerLogs(keras.metrics.Metric):
    """Carries the balancer's per-task values out of the compiled train step: the epoch's
    mean loss per task, the last weights (and extras), and the last step's status."""

    def __init__(self, balancer: KerasBalancer, name: str = "taskbalance") -> None:
        super().__init__(name=name)
        self.tasks = balancer.tasks
        k = len(self.tasks)
        self.extra_names = tuple(balancer.extras())
        self.loss_sum = self.add_variable(shape=(k,), initializer="zeros", name="loss_sum")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")
        self.weights_last = self.add_variable(shape=(k,), initializer="zeros", name="weights")
        self.extras_last = self.add_variable(
            shape=(max(len(self.extra_names), 1), k), initializer="zeros", name="extras"
        )
        self.status = self.add_variable(shape=(3,), initializer="zeros", name="status")

    def update_state(self, losses: Any, balancer: KerasBalancer, training: bool = True) -> None:
        """Add a step's losses; on a training step, also take the balancer's weights,
        extras and status (an evaluation step only adds its losses)."""
        finite = ops.all(ops.isfinite(losses))
        ok = ops.equal(ops.convert_to_tensor(balancer.error)[0], 0.0) if training else finite
        safe = ops.where(ops.isfinite(losses), losses, ops.zeros_like(losses))
        kept = ops.where(ok, safe, ops.zeros_like(safe))
        self.loss_sum.assign(ops.convert_to_tensor(self.loss_sum) + kept)
        self.count.assign(ops.convert_to_tensor(self.count) + ops.cast(ok, "float32"))
        if not training:
            return
        self.weights_last.assign(ops.convert_to_tensor(balancer.task_weights))
        extras = balancer.extras()
        if extras:
            self.extras_last.assign(ops.stack([extras[n] for n in self.extra_names]))
        self.status.assign(ops.convert_to_tensor(balancer.error))

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        mean = ops.convert_to_tensor(self.loss_sum) / ops.maximum(
            ops.convert_to_tensor(self.count), 1.0
        )
        for i, task in enumerate(self.tasks):
            out[f"{task}_loss"] = mean[i]
            out[f"{task}_weight"] = self.weights_last[i]
            for j, extra in enumerate(self.extra_names):
                out[f"{task}_{extra}"] = self.extras_last[j, i]
        for i, key in enumerate(STATUS_KEYS):
            out[key] = self.status[i]
        return out

    def reset_state(self) -> None:
        for variable in self.variables:
            if variable is not self.weights_last and variable is not self.extras_last:
                variable.assign(ops.zeros(variable.shape, variable.dtype))


class BalancerCallback(keras.callbacks.Callback):
    """Added first by :meth:`BalancedModel.fit`: closes DWA's epoch periods, raises the
    errors a step recorded (or logs a skipped step) and removes the status keys from the
    logs."""

    def __init__(self, balanced: BalancedModel) -> None:
        super().__init__()
        self.balanced = balanced
        self._skipped = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        balancer = self.balanced.balancer
        if getattr(balancer, "period", None) == "epoch" and balancer.steps_per_period is None:
            balancer.end_period()  # the previous epoch's period closes at this epoch's 1st step

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        status = [logs.pop(key, 0.0) for key in STATUS_KEYS]
        self.balanced.raise_for_status(*status, counter=self)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key in list(logs or {}):
            if key.removeprefix("val_") in STATUS_KEYS:
                del logs[key]


@keras.saving.register_keras_serializable(package="taskbalance")
class BalancedModel(keras.Model):
    """A multi-output model whose per-task losses are combined by a taskbalance method.

    Args:
        model: the network; its outputs are a dict keyed by task name (or a list in the
            balancer's task order).
        balancer: a :class:`~taskbalance.keras.methods.KerasBalancer`
            (:func:`taskbalance.keras.make`).
        kpi: for DTP, one KPI per task: a Keras metric function of ``(y_true, y_pred)``
            (or its name, e.g. ``"binary_accuracy"``) with values in (0, 1].
    """

    def __init__(
        self,
        model: keras.Model,
        balancer: KerasBalancer,
        kpi: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(balancer, KerasBalancer):
            raise TypeError(
                "balancer must be a taskbalance.keras balancer (taskbalance.keras.make(...)), "
                f"got {type(balancer).__name__}; PyTorch balancers do not run in Keras"
            )
        self.inner = model
        self.balancer = balancer
        self.tasks = balancer.tasks
        if balancer.uses_kpi and kpi is None:
            raise InvalidKPIError(
                f"{type(balancer).__name__} needs the tasks' KPIs: give "
                "BalancedModel(..., kpi={task: metric}) with one metric per task of "
                f"{list(self.tasks)} (a function of (y_true, y_pred) with values in (0, 1])"
            )
        if kpi is not None and not balancer.uses_kpi:
            raise BalancerUsageError(
                f"{type(balancer).__name__} does not use KPIs; kpi= would be ignored: drop it"
            )
        self.kpi_config = None if kpi is None else dict(kpi)
        self.kpi_fns = None
        if kpi is not None:
            self._check_names(kpi, "kpi functions")
            self.kpi_fns = {t: keras.metrics.get(kpi[t]) for t in self.tasks}
        self.balancer_logs = _BalancerLogs(balancer)
        self._loss_fns: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def _check_names(self, given: Mapping[str, Any], what: str) -> None:
        missing = [t for t in self.tasks if t not in given]
        extra = [str(n) for n in given if n not in self.tasks]
        if missing or extra:
            raise TaskMismatchError(
                f"{what} do not match the balancer's tasks {list(self.tasks)}: missing "
                f"{missing}, unexpected {extra}"
            )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.inner(inputs, training=training)

    def compile(
        self, optimizer: Any = "rmsprop", loss: Any = None, loss_weights: Any = None, **kw: Any
    ) -> None:
        """``keras.Model.compile`` with ``loss=`` a dict of one loss per task.

        ``loss_weights`` is refused (the balancer sets the weights). The balancer's
        trainable variables are excluded from the optimizer's weight decay. The optimizer
        is wrapped in a ``keras.optimizers.LossScaleOptimizer`` with scale 1 (no scaling;
        unless it is one already), which skips an update whose gradients are not finite:
        the step of a NaN loss changes no weight, whether it is raised or skipped.
        """
        if loss_weights is not None:
            raise BalancerUsageError(
                "loss_weights cannot be combined with a balancer (it sets the task weights "
                "itself): drop loss_weights, or use taskbalance.keras.make('static', "
                "tasks, weights=...) for fixed weights"
            )
        if not isinstance(loss, Mapping):
            raise TaskMismatchError(
                f"compile(loss=...) must be a dict with one loss per task of {list(self.tasks)}"
                f", got {type(loss).__name__}"
            )
        self._check_names(loss, "compile(loss=...) keys")
        steps = kw.get("steps_per_execution", 1)
        if steps != 1:
            raise BalancerUsageError(
                f"steps_per_execution={steps} runs several steps per call and reports only "
                "the last one's status, which would hide an error of the others: use 1"
            )
        optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # skips an update whose gradients are not finite (the step of a NaN loss), so
            # that a raised or skipped step leaves the model as it was; scale 1: no scaling
            optimizer = keras.optimizers.LossScaleOptimizer(
                optimizer, initial_scale=1.0, dynamic_growth_steps=2**30
            )
        super().compile(optimizer=optimizer, loss=dict(loss), **kw)
        self._loss_fns = {t: keras.losses.get(loss[t]) for t in self.tasks}
        self._exclude_balancer_from_weight_decay()

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compile a loaded model as it was saved (``keras.models.load_model``), with the
        optimizer built so that its saved state can be restored."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _exclude_balancer_from_weight_decay(self) -> None:
        optimizer = self.optimizer
        variables = self.balancer.trainable_variables
        if optimizer is None or not variables:
            return
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        if getattr(inner, "built", False):
            if inner.weight_decay and any(inner._use_weight_decay(v) for v in variables):
                raise BalancerUsageError(
                    "the optimizer was built before the balancer's variables were excluded "
                    "from its weight decay: compile with a fresh optimizer"
                )
            return
        # exclude_from_weight_decay() replaces the set: keep the user's exclusions
        keep = set(getattr(inner, "_exclude_from_weight_decay", set()) or set())
        pattern = getattr(inner, "_exclude_from_weight_decay_pattern", None)
        inner.exclude_from_weight_decay(var_list=variables)
        inner._exclude_from_weight_decay |= keep
        inner._exclude_from_weight_decay_pattern = pattern

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        """``keras.Model.fit`` with the balancer's callback added first."""
        given = list(callbacks or [])
        return super().fit(*args, callbacks=[BalancerCallback(self), *given], **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """``keras.Model.evaluate``; the balancer's state is not changed (as PyTorch's
        ``balancer.evaluate``) and its status entries are not returned."""
        result = super().evaluate(*args, **kwargs)
        if isinstance(result, dict):
            for key in STATUS_KEYS:
                result.pop(key, None)
        return result

    # ------------------------------------------------------------------ the step
    def task_losses(self, y: Any, y_pred: Any) -> Any:
        """The ``(K,)`` per-task losses from ``compile``'s loss dict."""
        if self._loss_fns is None:
            raise BalancerUsageError("compile the BalancedModel before training it")
        y = self._by_task(y, "targets")
        y_pred = self._by_task(y_pred, "model outputs")
        values = []
        for task in self.tasks:
            value = self._loss_fns[task](y[task], y_pred[task])
            values.append(ops.mean(ops.cast(value, "float32")))
        return ops.stack(values)

    def _by_task(self, values: Any, what: str) -> dict[str, Any]:
        if isinstance(values, Mapping):
            self._check_names(values, what)
            return dict(values)
        if isinstance(values, (list, tuple)) and len(values) == len(self.tasks):
            return dict(zip(self.tasks, values))
        raise TaskMismatchError(
            f"{what} must be a dict keyed by the tasks {list(self.tasks)} (or a list in that "
            f"order), got {type(values).__name__}"
        )

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        if sample_weight is not None:
            raise BalancerUsageError(
                "sample_weight is not supported with a balancer: weight the samples inside "
                "the per-task loss functions instead"
            )
        losses = self.task_losses(y, y_pred)
        if training:
            kpi = None
            if self.kpi_fns is not None:
                y_t, p_t = self._by_task(y, "targets"), self._by_task(y_pred, "outputs")
                kpi = ops.stack(
                    [
                        ops.mean(ops.cast(self.kpi_fns[t](y_t[t], p_t[t]), "float32"))
                        for t in self.tasks
                    ]
                )
            total = self.balancer.balance(losses, kpi)
            self.balancer_logs.update_state(losses, self.balancer)
        else:
            total = self.balancer.evaluation_loss(losses)
            self.balancer_logs.update_state(losses, self.balancer, training=False)
        regularization = self.losses
        if regularization:
            total = total + ops.sum(ops.stack([ops.cast(r, "float32") for r in regularization]))
        return total

    def raise_for_status(self, code: float, task: float, value: float, counter: Any = None) -> None:
        """Raise the error that a step recorded (host side; see the module docstring)."""
        code, name, value = int(code), self.tasks[int(task)], float(value)
        if code == NONFINITE:
            if self.balancer.nonfinite == "raise":
                raise NonFiniteLossError(name, value)
            if counter is not None:
                counter._skipped += 1
            logger.warning(
                "%s: skipped a step because the loss of task %r is %s (%d skipped so far)",
                type(self.balancer).__name__,
                name,
                value,
                getattr(counter, "_skipped", 0),
            )
        elif code == NONPOSITIVE:
            raise NonPositiveLossError(name, value, self.balancer.positive_label)
        elif code == BAD_KPI:
            raise InvalidKPIError(f"KPI of task {name!r} must be in (0, 1], got {value}")

    # ------------------------------------------------------------------ saving
    def get_config(self) -> dict[str, Any]:
        config = {"name": self.name, "trainable": self.trainable}
        config["model"] = keras.saving.serialize_keras_object(self.inner)
        config["balancer"] = keras.saving.serialize_keras_object(self.balancer)
        if self.kpi_config is not None:
            config["kpi"] = {
                t: keras.saving.serialize_keras_object(fn) for t, fn in self.kpi_config.items()
            }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> BalancedModel:
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        balancer = keras.saving.deserialize_keras_object(config.pop("balancer"))
        kpi = config.pop("kpi", None)
        if kpi is not None:
            kpi = {t: keras.saving.deserialize_keras_object(fn) for t, fn in kpi.items()}
        return cls(model, balancer, kpi=kpi, **config)
