"""taskbalance for Keras 3: the loss-level balancing methods on every Keras backend.

Install with ``pip install 'taskbalance[keras]'`` and a backend (JAX, PyTorch or
TensorFlow; set ``KERAS_BACKEND`` before Keras is first imported). ``import taskbalance``
never imports Keras; this subpackage does::

    import taskbalance.keras as tbk

    model = tbk.BalancedModel(net, tbk.make("uncertainty", tasks=["a", "b"]))
    model.compile(optimizer="adam", loss={"a": "mse", "b": "mse"})
    model.fit(x, {"a": ya, "b": yb})

Methods: equal, static, uncertainty (kendall, paper, positive), DWA (epoch and step
periods), DTP, GLS, RLW, IMTL-L, FAMO (the next batch's losses as its "after"
losses). Gradient-based methods exist only in the PyTorch API.
See ``docs/keras.md``.
"""

from __future__ import annotations

try:
    import keras as _keras
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taskbalance.keras needs Keras 3: pip install 'taskbalance[keras]' (and a backend: "
        "jax, torch or tensorflow)"
    ) from err

if not _keras.__version__.startswith("3."):  # pragma: no cover
    raise ImportError(f"taskbalance.keras needs Keras 3, found Keras {_keras.__version__}")

from taskbalance.keras.methods import (
    DTP,
    DWA,
    FAMO,
    GLS,
    IMTLL,
    METHODS,
    RLW,
    EqualWeighting,
    KerasBalancer,
    StaticWeighting,
    UncertaintyWeighting,
    make,
)
from taskbalance.keras.model import BalancedModel, BalancerCallback

__all__ = [
    "DTP",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLL",
    "METHODS",
    "RLW",
    "BalancedModel",
    "BalancerCallback",
    "EqualWeighting",
    "KerasBalancer",
    "StaticWeighting",
    "UncertaintyWeighting",
    "make",
]
