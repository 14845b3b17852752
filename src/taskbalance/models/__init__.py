"""Multi-task architectures as plain :class:`torch.nn.Module` s."""

from taskbalance.models.hps import HardParameterSharing
from taskbalance.models.mmoe import MMoE, OMoE

__all__ = ["HardParameterSharing", "MMoE", "OMoE"]
