"""Loss-weighting methods: weights computed from loss values (and their history)."""

from taskbalance.weighting.auto_lambda import AutoLambda
from taskbalance.weighting.dtp import DTP
from taskbalance.weighting.dwa import DWA
from taskbalance.weighting.ew import EqualWeighting
from taskbalance.weighting.famo import FAMO
from taskbalance.weighting.gls import GLS
from taskbalance.weighting.relobralo import ReLoBRaLo
from taskbalance.weighting.rlw import RLW
from taskbalance.weighting.si import SI
from taskbalance.weighting.softadapt import SoftAdapt
from taskbalance.weighting.static import StaticWeighting
from taskbalance.weighting.stch import STCH
from taskbalance.weighting.uncertainty import UncertaintyWeighting

__all__ = [
    "DTP",
    "DWA",
    "FAMO",
    "GLS",
    "RLW",
    "SI",
    "STCH",
    "AutoLambda",
    "EqualWeighting",
    "ReLoBRaLo",
    "SoftAdapt",
    "StaticWeighting",
    "UncertaintyWeighting",
]
