"""Shared by the Keras tests: backend setup, the loss sequences of the cross-framework
checks, and the Keras side of each check (backend-agnostic: run in-process on the torch
backend and by ``keras_worker.py`` on JAX).

Importing this module selects the torch backend unless Keras was already imported (Keras
fixes its backend per process at import); ``KERAS_BACKEND`` set for a subprocess is kept.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if "keras" not in sys.modules and os.environ.get("TB_KERAS_WORKER") != "1":
    os.environ["KERAS_BACKEND"] = "torch"

import numpy as np

TASKS = ("a", "b", "c")
#: a loss sequence (steps x tasks), positive, varied enough to move every method
LOSSES = np.abs(np.random.default_rng(3).normal(1.0, 0.6, size=(9, 3))).astype("float32") + 0.05
#: per-step KPIs in (0, 1] for DTP
KPIS = np.random.default_rng(4).uniform(0.05, 1.0, size=(9, 3)).astype("float32")
#: DWA(period="epoch") closes a period after these steps (epochs of 3 steps)
EPOCH_ENDS = (2, 5)

#: (name, kwargs) of the methods compared without training (learnable ones aside)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("equal", {}),
    ("equal", {"reduction": "mean"}),
    ("static", {"weights": [0.5, 2.0, 1.5]}),
    ("gls", {}),
    ("dwa", {}),
    ("dwa", {"period": "step", "temperature": 1.5}),
    ("dwa", {"steps_per_period": 2}),
    ("dtp", {"gamma": [1.0, 2.0, 0.5], "alpha": 0.3}),
    ("famo", {}),
    # (float32 against PyTorch's float64 logs: lr 0.1 differs by 1.1e-6 after 9 steps)
    ("famo", {"gamma": 0.0, "min_losses": [0.01, 0.0, 0.02]}),
]


def closes_epoch(name: str, kwargs: dict[str, Any], step: int) -> bool:
    """Does DWA(period="epoch") without steps_per_period end a period after ``step``?"""
    epochs = name == "dwa" and kwargs.get("period", "epoch") == "epoch"
    return epochs and "steps_per_period" not in kwargs and step in EPOCH_ENDS


def case_id(name: str, kwargs: dict[str, Any]) -> str:
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def keras_weights(name: str, kwargs: dict[str, Any]) -> np.ndarray:
    """The Keras balancer's weights ``(steps, K)`` on :data:`LOSSES` (eager calls)."""
    import keras

    import taskbalance.keras as tbk

    balancer = tbk.make(name, list(TASKS), **kwargs)
    rows = []
    for step, losses in enumerate(LOSSES):
        kpi = keras.ops.convert_to_tensor(KPIS[step]) if name == "dtp" else None
        balancer.balance(keras.ops.convert_to_tensor(losses), kpi)
        rows.append(np.asarray(keras.ops.convert_to_numpy(balancer.task_weights)))
        if closes_epoch(name, kwargs, step):
            balancer.end_period()
    return np.stack(rows)


def keras_learnable_terms(name: str, kwargs: dict[str, Any], values: np.ndarray) -> list:
    """Weights and total loss of a learnable method at the given parameter values, for each
    loss vector of :data:`LOSSES`."""
    import keras

    import taskbalance.keras as tbk

    balancer = tbk.make(name, list(TASKS), **kwargs)
    variable = balancer.trainable_variables[0]
    variable.assign(values)
    out = []
    for losses in LOSSES:
        total = balancer.balance(keras.ops.convert_to_tensor(losses))
        weights = keras.ops.convert_to_numpy(balancer.task_weights)
        out.append((np.asarray(weights).tolist(), float(keras.ops.convert_to_numpy(total))))
    return out


def dwa_step_by_hand(losses: np.ndarray, temperature: float) -> np.ndarray:
    """DWA with a period of one batch, by hand: ones for the first two batches, then
    ``K softmax((L(t-1) / L(t-2)) / T)``."""
    k = losses.shape[1]
    rows = []
    for t in range(len(losses)):
        if t < 2:
            rows.append(np.ones(k))
            continue
        r = losses[t - 1].astype(np.float64) / losses[t - 2]
        e = np.exp(r / temperature)
        rows.append(k * e / e.sum())
    return np.stack(rows)


# ---------------------------------------------------------------- training through fit
def _kpi(y_true: Any, y_pred: Any) -> Any:
    """A KPI in (0, 1]: exp(-|error|) per sample."""
    import keras

    return keras.ops.exp(-keras.ops.abs(y_true - y_pred))


def registered_kpi() -> Any:
    import keras

    name = "tbtests>_kpi"
    found = keras.saving.get_registered_object(name)
    if found is None:
        found = keras.saving.register_keras_serializable(package="tbtests")(_kpi)
    return found


def tiny_model(tasks: tuple[str, ...] = ("a", "b")) -> Any:
    import keras

    x = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(x)
    return keras.Model(x, {t: keras.layers.Dense(1, name=t)(h) for t in tasks})


def tiny_data(n: int = 48) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, {"a": 2 * x[:, :1] + 0.1, "b": x[:, 1:2] * x[:, 2:3]}


def balanced(name: str, kwargs: dict[str, Any], seed: int = 0, **compile_kw: Any) -> Any:
    import keras

    import taskbalance.keras as tbk

    keras.utils.set_random_seed(seed)
    balancer = tbk.make(name, ["a", "b"], **kwargs)
    kpi = {"a": registered_kpi(), "b": registered_kpi()} if balancer.uses_kpi else None
    model = tbk.BalancedModel(tiny_model(), balancer, kpi=kpi)
    compile_kw.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    model.compile(loss={"a": "mse", "b": "mse"}, **compile_kw)
    return model


def state_vector(model: Any) -> list[float]:
    """Every variable of the model and its balancer, flattened."""
    import keras

    values = [keras.ops.convert_to_numpy(v).reshape(-1) for v in model.variables]
    return np.concatenate(values).astype(np.float64).tolist()


RESUME_CASES = [
    ("dwa", {}),
    ("dwa", {"period": "step"}),
    ("uncertainty", {}),
    ("rlw", {"seed": 5}),
    ("dtp", {}),
    ("imtl_l", {}),
    ("famo", {}),
]


def resume_check(name: str, kwargs: dict[str, Any], folder: str) -> tuple[list, list]:
    """(state after 4 epochs straight, state after 2 epochs + save/load + 2 epochs)."""
    import keras

    x, y = tiny_data()
    straight = balanced(name, kwargs)
    straight.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    first = balanced(name, kwargs)
    first.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    path = os.path.join(folder, f"{name}.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return state_vector(straight), state_vector(loaded)


def nan_error() -> str:
    """The error fit raises when task b's loss is NaN."""
    x, y = tiny_data()
    y = {**y, "b": y["b"].copy()}
    y["b"][20] = np.nan
    model = balanced("dwa", {})
    try:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    except Exception as err:  # reported to the parent process as text
        return f"{type(err).__name__}: {err}"
    return "no error"
