"""Random Loss Weighting (RLW).

Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022. Every step draws fresh weights

    z ~ N(0, I_K),    w = softmax(z),

so the weights form a probability distribution (non-negative, summing to 1). The draws
come from the balancer's own seeded generator, whose state is part of ``state_dict()``,
so a resumed run draws the same weights as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.registry import register


def rlw_weights(k: int, generator: torch.Generator) -> Tensor:
    """``softmax(z)`` for ``z ~ N(0, I_k)`` drawn from ``generator`` (float64, CPU)."""
    z = torch.randn(k, generator=generator, dtype=torch.float64)
    return torch.softmax(z, dim=0)


@register("rlw", "random")
class RLW(Balancer):
    """RLW (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I), drawn afresh every step."""

    def __init__(self, tasks: Tasks, seed: int = 0, **kw: Any) -> None:
        super().__init__(tasks, **kw)
        self.generator = torch.Generator().manual_seed(int(seed))

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        return rlw_weights(self.num_tasks, self.generator).to(losses.device, losses.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
