"""BalancedModel on Keras's torch backend (in this process): compile/fit, the per-task
logs, saving and exact resumption, the weight-decay guarantee, and every misuse raising
the PyTorch side's error (test_keras_cross_framework.py runs the JAX side)."""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras_cases as kc
import numpy as np
import pytest

from taskbalance.errors import (
    BalancerUsageError,
    InvalidKPIError,
    NonPositiveLossError,
    TaskMismatchError,
)

keras = pytest.importorskip("keras", reason="Keras 3 is not installed (pip install keras)")
import taskbalance.keras as tbk  # noqa: E402


def test_import_taskbalance_does_not_import_keras() -> None:
    code = "import sys, taskbalance; print('keras' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_a_method_name_is_registered_once() -> None:
    from taskbalance.keras.base import register

    class Other(tbk.EqualWeighting):
        pass

    with pytest.raises(ValueError, match="'dwa' is already registered"):
        register("dwa")(Other)
    assert tbk.METHODS["dwa"] is tbk.DWA
    assert register("equal", "ew")(tbk.EqualWeighting) is tbk.EqualWeighting  # itself: fine


def test_fit_logs_losses_and_weights_per_task(tmp_path: Path) -> None:
    x, y = kc.tiny_data()
    model = kc.balanced("uncertainty", {})
    log = tmp_path / "log.csv"
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[keras.callbacks.CSVLogger(log)]
    )
    expected = {"loss", "a_loss", "b_loss", "a_weight", "b_weight", "a_sigma", "b_sigma"}
    # (CSVLogger adds val_ entries of its own to the logs)
    assert {k for k in history.history if not k.startswith("val_")} == expected
    sigma = np.asarray(keras.ops.convert_to_numpy(model.balancer.sigma))
    # logged at the last step, before its update of sigma
    assert history.history["b_sigma"][-1] == pytest.approx(float(sigma[1]), rel=2e-2)
    logged = history.history["a_sigma"][-1]
    assert history.history["a_weight"][-1] == pytest.approx(logged**-2, rel=1e-5)
    with log.open() as f:
        columns = next(csv.reader(f))
    assert {c for c in columns if not c.startswith("val_")} == expected | {"epoch"}


def test_dwa_epoch_closes_a_period_per_epoch_of_fit() -> None:
    """Weights stay 1 for the first two epochs and follow K softmax(L(t-1)/L(t-2)/T) of the
    epochs' mean losses from the third on."""
    x, y = kc.tiny_data()
    model = kc.balanced("dwa", {})
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    h = history.history
    assert h["a_weight"][:2] == [1.0, 1.0]
    # the epoch means logged are the means of the steps' losses (weights used in epoch 3)
    means = np.array([[h["a_loss"][e], h["b_loss"][e]] for e in range(2)], dtype=np.float64)
    r = means[1] / means[0]
    expected = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    assert h["a_weight"][2] == pytest.approx(expected[0], abs=1e-6)
    assert h["b_weight"][2] == pytest.approx(expected[1], abs=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"), kc.RESUME_CASES, ids=[kc.case_id(n, k) for n, k in kc.RESUME_CASES]
)
def test_save_load_resumes_exactly(name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    straight, resumed = kc.resume_check(name, kwargs, str(tmp_path))
    assert np.abs(np.array(straight) - np.array(resumed)).max() < 1e-6


def _fixed_loss_model() -> Any:
    """Frozen heads (the losses do not change with training) and one trainable layer that
    the outputs do not depend on (0 * it): AdamW decays it, and nothing else moves."""
    x = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", trainable=False)(x)
    extra = keras.layers.Dense(1, name="extra")(x)
    outputs = {t: keras.layers.Dense(1, trainable=False)(h) + 0.0 * extra for t in "ab"}
    return keras.Model(x, outputs)


def test_learnable_variables_get_no_weight_decay() -> None:
    """AdamW's decay would pull log sigma^2 towards 0. With losses that training does not
    change, log sigma^2 ends the same with weight_decay=0.5 as with 0 (while the decayed
    layer shows that the decay is applied)."""
    x, y = kc.tiny_data()
    ends = []
    for decay in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        model = tbk.BalancedModel(_fixed_loss_model(), tbk.make("uncertainty", ["a", "b"]))
        optimizer = keras.optimizers.AdamW(0.05, weight_decay=decay)
        model.compile(optimizer=optimizer, loss={"a": "mse", "b": "mse"})
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        extra = model.inner.get_layer("extra").kernel.numpy()
        ends.append((np.asarray(model.balancer.log_vars.numpy()), np.asarray(extra)))
    (s0, e0), (s1, e1) = ends
    assert np.abs(s0).max() > 0.05  # s moved
    assert np.abs(s0 - s1).max() < 1e-6
    assert np.abs(e0 - e1).max() > 1e-3  # the decay did act on the other layer


def test_user_exclusions_from_weight_decay_are_kept() -> None:
    optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model = kc.balanced("uncertainty", {}, optimizer=optimizer)
    bias = next(v for v in model.inner.trainable_variables if "bias" in v.path)
    assert not optimizer._use_weight_decay(bias)
    assert not optimizer._use_weight_decay(model.balancer.log_vars)


def test_nan_loss_raises_naming_the_task() -> None:
    message = kc.nan_error()
    assert message.startswith("NonFiniteLossError: loss of task 'b' is not finite (nan)")


def test_nan_loss_is_skipped_under_skip_step(caplog: pytest.LogCaptureFixture) -> None:
    x, y = kc.tiny_data()
    y = {**y, "b": y["b"].copy()}
    y["b"][20] = np.nan  # batch 1 of 3
    model = kc.balanced("dwa", {"period": "step", "nonfinite": "skip_step"})
    with caplog.at_level(logging.WARNING, logger="taskbalance"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    # the skipped batch's update was not applied: the model's weights stayed finite
    assert all(np.isfinite(v.numpy()).all() for v in model.inner.trainable_variables)
    assert float(model.balancer.steps.numpy()) == 2
    assert float(model.balancer.skipped_steps.numpy()) == 1
    assert "skipped a step because the loss of task 'b' is nan (1 skipped so far)" in caplog.text
    # the skipped batch left DWA's state alone: L(t-1), L(t-2) are batches 0 and 2
    assert np.isfinite(model.balancer.previous.numpy()).all()


def _negative_mse(y_true: Any, y_pred: Any) -> Any:
    return -keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize(
    ("name", "kwargs", "label"),
    [("gls", {}, "GLS (log of losses)"), ("dwa", {"period": "step"}, "DWA (loss ratios)")],
)
def test_non_positive_loss_under_a_log_raises(name: str, kwargs: dict, label: str) -> None:
    x, y = kc.tiny_data()
    model = tbk.BalancedModel(kc.tiny_model(), tbk.make(name, ["a", "b"], **kwargs))
    model.compile(optimizer="sgd", loss={"a": "mse", "b": _negative_mse})
    with pytest.raises(
        NonPositiveLossError,
        match=rf"{re.escape(label)} needs strictly positive losses, but task 'b'",
    ):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def _too_large(y_true: Any, y_pred: Any) -> Any:
    return 1.5 + 0 * keras.ops.mean(y_pred, axis=-1)


def test_kpi_outside_0_1_raises() -> None:
    x, y = kc.tiny_data()
    model = tbk.BalancedModel(
        kc.tiny_model(),
        tbk.make("dtp", ["a", "b"]),
        kpi={"a": kc.registered_kpi(), "b": _too_large},
    )
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"})
    with pytest.raises(InvalidKPIError, match=r"KPI of task 'b' must be in \(0, 1\], got 1.5"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_dtp_without_kpi_is_refused() -> None:
    with pytest.raises(InvalidKPIError, match="needs the tasks' KPIs: give BalancedModel"):
        tbk.BalancedModel(kc.tiny_model(), tbk.make("dtp", ["a", "b"]))


def test_kpi_with_a_method_that_ignores_it_is_refused() -> None:
    with pytest.raises(BalancerUsageError, match="does not use KPIs; kpi= would be ignored"):
        tbk.BalancedModel(kc.tiny_model(), tbk.make("dwa", ["a", "b"]), kpi={"a": "mse"})


def test_wrong_task_names_in_compile_raise() -> None:
    model = tbk.BalancedModel(kc.tiny_model(), tbk.make("dwa", ["a", "b"]))
    with pytest.raises(TaskMismatchError, match=r"missing \['b'\], unexpected \['c'\]"):
        model.compile(optimizer="sgd", loss={"a": "mse", "c": "mse"})


def test_outputs_not_matching_the_tasks_raise() -> None:
    x, y = kc.tiny_data()
    model = tbk.BalancedModel(kc.tiny_model(("a", "z")), tbk.make("dwa", ["a", "b"]))
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"})
    with pytest.raises(
        TaskMismatchError, match=r"model outputs do not match .* unexpected \['z'\]"
    ):
        model.fit(x, {"a": y["a"], "b": y["b"]}, batch_size=16, epochs=1, verbose=0)


def test_loss_weights_are_refused() -> None:
    model = tbk.BalancedModel(kc.tiny_model(), tbk.make("dwa", ["a", "b"]))
    with pytest.raises(BalancerUsageError, match="loss_weights cannot be combined"):
        model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"}, loss_weights=[1, 2])


def test_gradient_methods_point_to_the_pytorch_api() -> None:
    with pytest.raises(ValueError, match=r"'upgrad' exists in taskbalance's PyTorch API"):
        tbk.make("upgrad", ["a", "b"])
    with pytest.raises(ValueError, match="unknown method 'dwaa'"):
        tbk.make("dwaa", ["a", "b"])


def test_validation_logs_the_tasks_validation_losses() -> None:
    x, y = kc.tiny_data()
    model = kc.balanced("dwa", {"period": "step"})
    y16 = {t: v[:16] for t, v in y.items()}
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x[:16], y16))
    result = model.evaluate(x[:16], y16, batch_size=16, verbose=0, return_dict=True)
    for task in ("a", "b"):
        assert history.history[f"val_{task}_loss"][-1] == pytest.approx(result[f"{task}_loss"])
        assert result[f"{task}_loss"] > 0


def test_dwa_with_steps_per_period_ignores_the_epochs() -> None:
    """With steps_per_period=N the periods are N steps long, as in PyTorch: fit's epochs do
    not close periods of their own (3 steps an epoch, periods of 2 steps here)."""
    x, y = kc.tiny_data()
    model = kc.balanced("dwa", {"steps_per_period": 2})
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert float(model.balancer.period_count.numpy()) == 0  # 6 steps: 3 full periods
    assert float(model.balancer.closed.numpy()) == 2


def test_evaluate_changes_no_state() -> None:
    x, y = kc.tiny_data()
    model = kc.balanced("dwa", {"period": "step"})
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = kc.state_vector(model)
    result = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert kc.state_vector(model)[: len(before)] == before
    assert not any(key.startswith("tb_") for key in result)


def test_an_optimizer_built_with_weight_decay_is_refused() -> None:
    """A built optimizer can no longer exclude the balancer's variables from its decay."""
    optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    model = tbk.BalancedModel(kc.tiny_model(), tbk.make("uncertainty", ["a", "b"]))
    optimizer.build(model.trainable_variables)
    with pytest.raises(BalancerUsageError, match="built before the balancer's variables"):
        model.compile(optimizer=optimizer, loss={"a": "mse", "b": "mse"})


def test_steps_per_execution_above_one_is_refused() -> None:
    """Several steps per call would report only the last step's status, hiding an error."""
    model = tbk.BalancedModel(kc.tiny_model(), tbk.make("dwa", ["a", "b"]))
    with pytest.raises(BalancerUsageError, match=r"steps_per_execution=4 .* use 1"):
        model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"}, steps_per_execution=4)


def test_sample_weight_is_refused() -> None:
    x, y = kc.tiny_data()
    model = kc.balanced("dwa", {})
    with pytest.raises(BalancerUsageError, match="sample_weight is not supported"):
        model.fit(x, y, sample_weight=np.ones(len(x)), batch_size=16, epochs=1, verbose=0)
