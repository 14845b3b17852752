"""Gradient methods: weights (or a direction) computed from the task gradients.

Importing this package registers every method; adding one is one file plus one import here.
"""

from taskbalance.aggregation.aligned_mtl import AlignedMTL
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.aggregation.cagrad import CAGrad
from taskbalance.aggregation.config import ConFIG
from taskbalance.aggregation.cr_mogm import CRMOGM
from taskbalance.aggregation.db_mtl import DBMTL
from taskbalance.aggregation.dual_proj import DualProj
from taskbalance.aggregation.excess_mtl import ExcessMTL
from taskbalance.aggregation.fairgrad import FairGrad
from taskbalance.aggregation.graddrop import GradDrop
from taskbalance.aggregation.gradnorm import GradNorm
from taskbalance.aggregation.gradvac import GradVac
from taskbalance.aggregation.imtl import IMTL, IMTLL
from taskbalance.aggregation.lr_annealing import LRAnnealing
from taskbalance.aggregation.m_config import MConFIG
from taskbalance.aggregation.metabalance import MetaBalance
from taskbalance.aggregation.mgda import MGDA, MGDAUB
from taskbalance.aggregation.moco import MoCo
from taskbalance.aggregation.modo import MoDo
from taskbalance.aggregation.nash_mtl import NashMTL
from taskbalance.aggregation.pcd import PCD
from taskbalance.aggregation.pcgrad import PCGrad
from taskbalance.aggregation.sdmgrad import SDMGrad
from taskbalance.aggregation.sdmgrad_os import SDMGradOS
from taskbalance.aggregation.upgrad import UPGrad

__all__ = [
    "CRMOGM",
    "DBMTL",
    "IMTL",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "PCD",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "LRAnnealing",
    "MConFIG",
    "MetaBalance",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "SDMGradOS",
    "UPGrad",
]
