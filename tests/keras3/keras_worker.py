"""Run by test_keras_cross_framework.py in a subprocess with ``KERAS_BACKEND`` set (JAX):
the Keras side of the cross-framework checks, printed as one JSON line."""

from __future__ import annotations

import json
import tempfile

import keras
import keras_cases as kc
import numpy as np


def main() -> None:
    report: dict = {"backend": keras.backend.backend(), "weights": {}, "learnable": {}}
    for name, kwargs in kc.CASES:
        report["weights"][kc.case_id(name, kwargs)] = kc.keras_weights(name, kwargs).tolist()
    values = np.array([0.3, -0.7, 1.2], dtype="float32")
    for name, kwargs in [
        ("uncertainty", {}),
        (
            "uncertainty",
            {"variant": "paper", "task_types": ["regression", "classification", "regression"]},
        ),
        ("uncertainty", {"variant": "positive"}),
        ("imtl_l", {}),
    ]:
        report["learnable"][kc.case_id(name, kwargs)] = kc.keras_learnable_terms(
            name, kwargs, values
        )
    x, y = kc.tiny_data()
    history = kc.balanced("dwa", {}).fit(x, y, batch_size=16, epochs=1, verbose=0)
    fit: dict = {"history_keys": sorted(history.history)}
    with tempfile.TemporaryDirectory() as folder:
        fit["resume"] = {
            kc.case_id(name, kwargs): kc.resume_check(name, kwargs, folder)
            for name, kwargs in kc.RESUME_CASES
            if name in ("dwa", "uncertainty", "rlw")  # all six run on the torch backend
        }
    fit["nan_error"] = kc.nan_error()
    report["fit"] = fit
    print(json.dumps(report))


if __name__ == "__main__":
    main()
