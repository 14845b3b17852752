"""taskbalance: multi-task loss balancing for PyTorch.

>>> import taskbalance as tb
>>> bal = tb.make("dwa", tasks=["seg", "depth"])
"""

from taskbalance.aggregation import (
    CRMOGM,
    DBMTL,
    IMTL,
    IMTLL,
    MGDA,
    MGDAUB,
    PCD,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradDrop,
    GradientBalancer,
    GradNorm,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from taskbalance.balancer import Balancer
from taskbalance.errors import (
    BalancerUsageError,
    InvalidKPIError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonPositiveLossError,
    NotScalarLossError,
    SolverError,
    TaskBalanceError,
    TaskBalanceWarning,
    TaskMismatchError,
)
from taskbalance.gradients import fork
from taskbalance.history import History
from taskbalance.registry import get, list_methods, make, register
from taskbalance.training import train_alternating, train_joint
from taskbalance.weighting import (
    DTP,
    DWA,
    FAMO,
    GLS,
    RLW,
    SI,
    STCH,
    EqualWeighting,
    ReLoBRaLo,
    SoftAdapt,
    StaticWeighting,
    UncertaintyWeighting,
)

__version__ = "0.1.0"

__all__ = [
    "CRMOGM",
    "DBMTL",
    "DTP",
    "DWA",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "PCD",
    "RLW",
    "SI",
    "STCH",
    "AlignedMTL",
    "Balancer",
    "BalancerUsageError",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EqualWeighting",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "History",
    "InvalidKPIError",
    "NashMTL",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonPositiveLossError",
    "NotScalarLossError",
    "PCGrad",
    "ReLoBRaLo",
    "SoftAdapt",
    "SolverError",
    "StaticWeighting",
    "TaskBalanceError",
    "TaskBalanceWarning",
    "TaskMismatchError",
    "UPGrad",
    "UncertaintyWeighting",
    "fork",
    "get",
    "list_methods",
    "make",
    "register",
    "train_alternating",
    "train_joint",
]
