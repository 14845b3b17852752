"""The uncertainty-weighting toy of Kendall et al. (CVPR 2018) in Keras 3.

The recipe of :mod:`taskbalance.problems.kendall` (the same data draw: N = 100,
y1 = 2x + 8 + 10 e1, y2 = 3x + 3 + e2; one shared layer of 1024 ReLU units, a linear head per
task; Adam lr 1e-3, batch 20, 2000 epochs), trained with ``model.fit`` and
``taskbalance.keras``'s uncertainty weighting. The learned sigmas should land near the
published (8.6, 0.92). Run it on any backend::

    KERAS_BACKEND=jax python examples/keras_kendall.py
    KERAS_BACKEND=torch python examples/keras_kendall.py --epochs 500

``--seeds 0 1 2`` trains one run per seed (a new data draw and initialisation each) and
prints their mean too. Measured (JAX, CPU, about 8 s a run): seed 0 (7.80, 1.085), as
PyTorch's toy on the same draw (7.82, 1.06); mean over seeds 0-9 (8.49, 0.970), PyTorch's
(8.48, 0.947). The last line printed is JSON: ``{"backend": ..., "sigma": [s1, s2],
"runs": [[s1, s2], ...], "seconds": ...}`` (``sigma``: the mean over the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

import taskbalance.keras as tbk
from taskbalance.problems.kendall import make_data


def build(hidden: int = 1024) -> keras.Model:
    """One shared hidden layer of ``hidden`` ReLU units and a linear head per task."""
    x = keras.Input((1,))
    h = keras.layers.Dense(hidden, activation="relu")(x)
    return keras.Model(x, {"y1": keras.layers.Dense(1)(h), "y2": keras.layers.Dense(1)(h)})


def train(epochs: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Train the toy once; return the learned sigmas (y1, y2)."""
    keras.utils.set_random_seed(seed)
    x, y1, y2 = (t.numpy().astype("float32") for t in make_data(100, seed))
    balancer = tbk.make("uncertainty", tasks=["y1", "y2"])
    model = tbk.BalancedModel(build(), balancer)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"y1": "mse", "y2": "mse"})
    model.fit(x, {"y1": y1, "y2": y2}, batch_size=20, epochs=epochs, verbose=0)
    s1, s2 = (float(s) for s in keras.ops.convert_to_numpy(balancer.sigma))
    print(f"seed {seed}: learned sigma y1 {s1:.3f}, y2 {s2:.3f}")
    return s1, s2


def main(epochs: int = 2000, seeds: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Train one run per seed; print and return the mean sigmas (y1, y2)."""
    start = time.perf_counter()
    runs = [train(epochs, seed) for seed in seeds]
    mean = tuple(float(v) for v in np.mean(runs, axis=0))
    print(f"mean sigma: y1 {mean[0]:.3f}, y2 {mean[1]:.3f} (published run: 8.6, 0.92)")
    report = {"backend": keras.backend.backend(), "sigma": list(mean), "runs": runs}
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return mean[0], mean[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    main(args.epochs, tuple(args.seeds))
