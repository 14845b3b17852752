"""Multi-task architectures as plain :class:`torch.nn.Module` s.

Every model maps an input to ``{task: output}``, takes ``tasks`` (a count or names) and
exposes ``shared_parameters()`` and ``task_parameters(task)`` (lists), which partition its
parameters so that ``balancer.backward(losses, shared=model.shared_parameters())`` works
for gradient methods: a parameter that two task losses reach is shared. Models with a
shared representation (all but the cross-stitch network) also offer ``z = features(x)``
and ``heads(z, x)`` (``== forward(x)``) for ``balancer.backward(losses, features=z)``;
see each class for what ``z`` is.

* :class:`HardParameterSharing`: shared bottom MLP + towers (Caruana 1997).
* :class:`MMoE` / :class:`OMoE`: multi-/one-gate mixture of experts (Ma et al., KDD 2018).
* :class:`PLE` / :class:`CGC`: progressive layered extraction (Tang et al., RecSys 2020).
* :class:`MTAN`: multi-task attention network (Liu, Johns, Davison, CVPR 2019).
* :class:`CrossStitchNetwork`: cross-stitch units (Misra et al., CVPR 2016).
* :class:`DSelectK`: experts with differentiable top-k gates (Hazimeh et al., NeurIPS 2021).
* :class:`LearningToBranch`: a tree whose branching is learned (Guo et al., ICML 2020).
"""

from taskbalance.models.cross_stitch import CrossStitchNetwork
from taskbalance.models.dselect_k import DSelectK
from taskbalance.models.hps import HardParameterSharing
from taskbalance.models.learning_to_branch import LearningToBranch
from taskbalance.models.mmoe import MMoE, OMoE
from taskbalance.models.mtan import MTAN
from taskbalance.models.ple import CGC, PLE

__all__ = [
    "CGC",
    "MTAN",
    "PLE",
    "CrossStitchNetwork",
    "DSelectK",
    "HardParameterSharing",
    "LearningToBranch",
    "MMoE",
    "OMoE",
]
