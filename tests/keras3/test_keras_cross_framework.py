"""Each Keras method against the PyTorch implementation (``tb.make``) on the same loss
sequence, to 1e-6: in this process on Keras's torch backend, and on JAX in a subprocess
(``keras_worker.py`` with ``KERAS_BACKEND=jax``). DWA ``"step"`` is also checked against
the per-batch formula written out by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras_cases as kc
import numpy as np
import pytest
import torch

import taskbalance as tb

keras = pytest.importorskip("keras", reason="Keras 3 is not installed (pip install keras)")
import taskbalance.keras as tbk  # noqa: E402

TOL = 1e-6
HERE = Path(__file__).resolve().parent


def torch_weights(name: str, kwargs: dict[str, Any]) -> np.ndarray:
    """The PyTorch balancer's weights ``(steps, K)`` on the same sequence."""
    balancer = tb.make(name, tasks=list(kc.TASKS), **kwargs)
    rows = []
    for step, losses in enumerate(kc.LOSSES):
        context = {"kpi": kc.KPIS[step].tolist()} if name == "dtp" else {}
        balancer(torch.tensor(losses, dtype=torch.float32), **context)
        rows.append(balancer.last_weights.double().numpy())
        if kc.closes_epoch(name, kwargs, step):
            balancer.end_period()
    return np.stack(rows)


def torch_learnable_terms(name: str, kwargs: dict[str, Any], values: np.ndarray) -> list:
    balancer = tb.make(name, tasks=list(kc.TASKS), **kwargs)
    with torch.no_grad():
        balancer.parameters()[0].copy_(torch.as_tensor(values))
    out = []
    for losses in kc.LOSSES:
        weights = balancer.compute_weights(torch.tensor(losses))
        total = balancer.combine(torch.tensor(losses), weights)
        out.append((weights.double().tolist(), float(total.detach())))
    return out


LEARNABLE = [
    ("uncertainty", {}),
    (
        "uncertainty",
        {"variant": "paper", "task_types": ["regression", "classification", "regression"]},
    ),
    ("uncertainty", {"variant": "positive"}),
    ("imtl_l", {}),
]
VALUES = np.array([0.3, -0.7, 1.2], dtype="float32")


@pytest.mark.parametrize(("name", "kwargs"), kc.CASES, ids=[kc.case_id(n, k) for n, k in kc.CASES])
def test_same_weights_as_pytorch(name: str, kwargs: dict[str, Any]) -> None:
    expected = torch_weights(name, kwargs)
    got = kc.keras_weights(name, kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOL
    assert not np.allclose(expected, expected[:1]) or name in ("equal", "static")


@pytest.mark.parametrize(
    ("name", "kwargs"), LEARNABLE, ids=[kc.case_id(n, k) for n, k in LEARNABLE]
)
def test_learnable_terms_match_pytorch(name: str, kwargs: dict[str, Any]) -> None:
    """Weights and the combined loss at the same parameter values."""
    expected = torch_learnable_terms(name, kwargs, VALUES)
    got = kc.keras_learnable_terms(name, kwargs, VALUES)
    for (w_e, t_e), (w_g, t_g) in zip(expected, got):
        assert np.abs(np.array(w_g) - np.array(w_e)).max() < TOL
        assert abs(t_g - t_e) < TOL * max(1.0, abs(t_e))


def _trajectory(name: str, torch_optimizer: str, keras_optimizer: Any) -> tuple[float, float]:
    """Worst weight difference over 20 steps of the learnable parameters on the same losses,
    and how far the parameters moved."""
    if torch_optimizer == "own":
        torch_balancer = tb.make(name, tasks=list(kc.TASKS), lr=1e-2)
        step = None
    else:
        torch_balancer = tb.make(name, tasks=list(kc.TASKS), optimizer="external")
        step = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
        torch_balancer.attach(step, lr=0.05)
    keras_balancer = tbk.make(name, list(kc.TASKS))
    variable = keras_balancer.trainable_variables[0]
    worst = 0.0
    for i in range(20):
        losses = kc.LOSSES[i % len(kc.LOSSES)]
        if step is not None:
            step.zero_grad()
        torch_balancer(torch.tensor(losses)).backward()
        if step is not None:
            step.step()
        total = keras_balancer.balance(keras.ops.convert_to_tensor(losses))
        total.backward()  # Keras's torch backend: the variable holds a torch Parameter
        grad = variable.value.grad.detach().clone()
        variable.value.grad = None
        keras_optimizer.apply([grad], [variable])
        expected = torch_balancer.compute_weights(torch.tensor(losses)).double().numpy()
        got = keras.ops.convert_to_numpy(keras_balancer.compute(total, None)[1])
        worst = max(worst, float(np.abs(np.asarray(got) - expected).max()))
    moved = float(torch_balancer.parameters()[0].detach().abs().max())
    return worst, moved


TORCH_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="takes gradients with torch autograd: needs Keras's torch backend in this process",
)


@TORCH_ONLY
@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_learnable_trajectory_matches_pytorch_sgd(name: str) -> None:
    """20 SGD steps (lr 0.05) of the learnable parameters: PyTorch (optimizer="external")
    and the Keras optimizer give the same weights to 1e-6."""
    worst, moved = _trajectory(name, "external", keras.optimizers.SGD(0.05))
    assert worst < TOL
    assert moved > 0.05  # the parameters did move


@TORCH_ONLY
@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_learnable_trajectory_matches_pytorch_adam(name: str) -> None:
    """With PyTorch's default (its own Adam, lr 1e-2 here) against Keras's Adam: Keras adds
    epsilon to sqrt(v) before the bias correction, torch after it, so the two differ by
    about epsilon; 20 steps agree to 1e-5 (measured 5.4e-7)."""
    worst, moved = _trajectory(name, "own", keras.optimizers.Adam(1e-2, epsilon=1e-8))
    assert worst < 1e-5
    assert moved > 0.05


def test_dwa_step_matches_the_per_batch_formula_by_hand() -> None:
    got = kc.keras_weights("dwa", {"period": "step", "temperature": 1.5})
    expected = kc.dwa_step_by_hand(kc.LOSSES, 1.5)
    assert np.abs(got - expected).max() < TOL
    assert np.abs(expected[2:] - 1).max() > 0.01  # not equal weighting


def test_rlw_draws_softmax_weights_and_replays_after_reload(tmp_path: Path) -> None:
    """RLW's draws cannot match torch's generator; the weights are softmax(z): positive,
    summing to 1, fresh every step, and the same after a save/load of the state."""
    balancer = tbk.make("rlw", list(kc.TASKS), seed=3)
    rows = []
    for losses in kc.LOSSES[:4]:
        balancer.balance(keras.ops.convert_to_tensor(losses))
        rows.append(np.asarray(keras.ops.convert_to_numpy(balancer.task_weights)))
    weights = np.stack(rows)
    assert (weights > 0).all() and np.abs(weights.sum(axis=1) - 1).max() < 1e-6
    assert not np.allclose(weights[0], weights[1])
    saved = [v.numpy() for v in balancer.variables]
    copy = tbk.make("rlw", list(kc.TASKS), seed=3)
    for v, value in zip(copy.variables, saved):
        v.assign(value)
    a = balancer.balance(keras.ops.convert_to_tensor(kc.LOSSES[0]))
    b = copy.balance(keras.ops.convert_to_tensor(kc.LOSSES[0]))
    assert float(keras.ops.convert_to_numpy(a)) == float(keras.ops.convert_to_numpy(b))


def _worker(backend: str) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TB_KERAS_WORKER": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE.parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, str(HERE / "keras_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def jax_results() -> dict[str, Any]:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (pip install jax): the JAX backend is not tested")
    return _worker("jax")


@pytest.mark.xdist_group("keras_jax_worker")  # one worker subprocess
def test_jax_backend_matches_pytorch(jax_results: dict[str, Any]) -> None:
    assert jax_results["backend"] == "jax"
    for name, kwargs in kc.CASES:
        got = np.array(jax_results["weights"][kc.case_id(name, kwargs)])
        assert np.abs(got - torch_weights(name, kwargs)).max() < TOL, (name, kwargs)
    for name, kwargs in LEARNABLE:
        expected = torch_learnable_terms(name, kwargs, VALUES)
        got = jax_results["learnable"][kc.case_id(name, kwargs)]
        for (w_e, t_e), (w_g, t_g) in zip(expected, got):
            assert np.abs(np.array(w_g) - np.array(w_e)).max() < TOL
            assert abs(t_g - t_e) < TOL * max(1.0, abs(t_e))
    by_hand = kc.dwa_step_by_hand(kc.LOSSES, 1.5)
    got = np.array(
        jax_results["weights"][kc.case_id("dwa", {"period": "step", "temperature": 1.5})]
    )
    assert np.abs(got - by_hand).max() < TOL


@pytest.mark.xdist_group("keras_jax_worker")  # one worker subprocess
def test_jax_backend_trains_and_resumes(jax_results: dict[str, Any]) -> None:
    """On JAX (jit-compiled train step): fit logs the weights per task, a model saved and
    loaded resumes exactly as an uninterrupted run, and a NaN loss raises the PyTorch
    side's error."""
    fit = jax_results["fit"]
    assert fit["history_keys"] >= ["a_loss", "a_weight", "b_loss", "b_weight"]
    for method, (straight, resumed) in fit["resume"].items():
        assert np.abs(np.array(straight) - np.array(resumed)).max() < 1e-6, method
    assert fit["nan_error"].startswith("NonFiniteLossError: loss of task 'b' is not finite")
