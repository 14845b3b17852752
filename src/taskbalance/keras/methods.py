"""The loss-level balancing methods in Keras 3, by name: :func:`make` and :data:`METHODS`.

Importing this module imports every method module of the package (one method per file,
each registered with :func:`~taskbalance.keras.base.register`), so that
:data:`METHODS` is complete and Keras can load every method from a ``.keras`` file. The
base class, its helpers and the error codes live in :mod:`taskbalance.keras.base` and
are re-exported here. See ``docs/keras.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskbalance.keras.base import (
    BAD_KPI,
    METHODS,
    NONFINITE,
    NONPOSITIVE,
    OK,
    KerasBalancer,
    register,
)

# the order of these imports is the order of METHODS
# isort: off
from taskbalance.keras.equal import EqualWeighting
from taskbalance.keras.static import StaticWeighting
from taskbalance.keras.uncertainty import UncertaintyWeighting
from taskbalance.keras.imtl_l import IMTLL
from taskbalance.keras.gls import GLS
from taskbalance.keras.rlw import RLW
from taskbalance.keras.dwa import DWA
from taskbalance.keras.dtp import DTP
from taskbalance.keras.famo import FAMO
# isort: on

__all__ = [
    "BAD_KPI",
    "DTP",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLL",
    "METHODS",
    "NONFINITE",
    "NONPOSITIVE",
    "OK",
    "RLW",
    "EqualWeighting",
    "KerasBalancer",
    "StaticWeighting",
    "UncertaintyWeighting",
    "make",
    "register",
]


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
