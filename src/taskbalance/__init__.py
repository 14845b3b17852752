"""taskbalance: multi-task loss balancing for PyTorch.

>>> import taskbalance as tb
>>> bal = tb.make("dwa", tasks=["seg", "depth"])
"""

from taskbalance.balancer import Balancer
from taskbalance.errors import (
    BalancerUsageError,
    InvalidKPIError,
    NonFiniteLossError,
    NonPositiveLossError,
    NotScalarLossError,
    SolverError,
    TaskBalanceError,
    TaskMismatchError,
)
from taskbalance.history import History
from taskbalance.registry import get, list_methods, make, register
from taskbalance.weighting import (
    DTP,
    DWA,
    GLS,
    RLW,
    EqualWeighting,
    StaticWeighting,
    UncertaintyWeighting,
)

__version__ = "0.1.0"

__all__ = [
    "DTP",
    "DWA",
    "GLS",
    "RLW",
    "Balancer",
    "BalancerUsageError",
    "EqualWeighting",
    "History",
    "InvalidKPIError",
    "NonFiniteLossError",
    "NonPositiveLossError",
    "NotScalarLossError",
    "SolverError",
    "StaticWeighting",
    "TaskBalanceError",
    "TaskMismatchError",
    "UncertaintyWeighting",
    "get",
    "list_methods",
    "make",
    "register",
]
