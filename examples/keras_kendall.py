"""The uncertainty-weighting toy of Kendall et al. (CVPR 2018) in Keras 3.

The recipe of :mod:`taskbalance.problems.kendall` (the same data draw: N = 100,
y1 = 2x + 8 + 10 e1, y2 = 3x + 3 + e2; one shared layer of 1024 ReLU units, a linear head per
task; Adam lr 1e-3, batch 20, 2000 epochs), trained with ``model.fit`` and
``taskbalance.keras``'s uncertainty weighting. The learned sigmas should land near the
published (8.6, 0.92). Run it on any backend::

    KERAS_BACKEND=jax python examples/keras_kendall.py
    KERAS_BACKEND=torch python examples/keras_kendall.py --epochs 500

The last line printed is JSON: ``{"backend": ..., "sigma": [s1, s2], "seconds": ...}``.
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


def main(epochs: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Train the toy; return the learned sigmas (y1, y2)."""
    keras.utils.set_random_seed(seed)
    x, y1, y2 = (t.numpy().astype("float32") for t in make_data(100, seed))
    balancer = tbk.make("uncertainty", tasks=["y1", "y2"])
    model = tbk.BalancedModel(build(), balancer)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"y1": "mse", "y2": "mse"})
    start = time.perf_counter()
    history = model.fit(x, {"y1": y1, "y2": y2}, batch_size=20, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    sigma = (history.history["y1_sigma"][-1], history.history["y2_sigma"][-1])
    print(f"learned sigma: y1 {sigma[0]:.3f}, y2 {sigma[1]:.3f} (published: 8.6, 0.92)")
    report = {"backend": keras.backend.backend(), "sigma": [float(s) for s in sigma]}
    report["seconds"] = round(seconds, 1)
    report["sigma_variables"] = np.asarray(balancer.sigma).tolist()
    print(json.dumps(report))
    return sigma


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.epochs, args.seed)
