"""MetaBalance: auxiliary gradients rescaled towards the main task's, per parameter tensor.

He, Feng, Cheng, Ji, Guo, Caverlee, "MetaBalance: Improving Multi-Task Recommendations via
Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022 (arXiv:2203.06801), Algorithm 1.
One task is the main (target) task (``main=``, a name or an index, default the first task);
the others are auxiliary. For every shared parameter tensor t (a "layer") and every task i,
a moving average of the norm of the task's gradient block ``g_{i,t}``,

    m_{i,t} <- β m_{i,t} + (1 - β) ||g_{i,t}||        (m = 0 at the start),

rescales each auxiliary block towards the main task's magnitude, with relax factor r:

    s_{i,t} = r m_{main,t} / m_{i,t} + (1 - r),    d_t = g_{main,t} + Σ_{i≠main} s_{i,t} g_{i,t}.

r = 1 gives every auxiliary block the main's (averaged) norm, r = 0 the plain sum. The
main task's scale is exactly 1. Defaults: β = 0.9 (paper and the official code), r = 0.7
(the official code's default; the paper tunes r per data set). The official code refuses
r = 1; here r is allowed in [0, 1].

Where ``m_{i,t} = 0`` (the task's gradient in that tensor has been zero at every step so
far, this one included) the scale is undefined and taken as 1: the block is zero either
way, so the update is unchanged. Such steps are logged (INFO, logger ``taskbalance``) and
counted in :attr:`MetaBalance.zero_scales`. A non-finite gradient raises
:class:`~taskbalance.errors.NonFiniteGradientError` naming the task, state unchanged.

The scale differs per tensor, so no single weight per task reproduces d. The recorded
weight of task i is the factor by which its whole gradient's norm was scaled,
``w_i = ||ĝ_i|| / ||g_i||`` with ``ĝ_{i,t} = s_{i,t} g_{i,t}`` (the mean of its scales
over the tensors when ``g_i = 0``); the main task's is 1. ``d = wᵀJ`` holds when the
shared part is one tensor. Heads get their plain gradients (``task_specific="unweighted"``,
as in the official code). Only the exact mode (``shared=``) is offered: the method is
defined per parameter tensor. ``needs = "jacobian"``; state: the averages (K × tensors).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import PerTensorBalancer, task_index
from taskbalance.balancer import Tasks
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def block_norms(jacobian: Tensor, sizes: list[int]) -> Tensor:
    """``||g_{i,t}||`` (float64, ``(K, T)``) for the column blocks of sizes ``sizes``."""
    norms = [block.double().norm(dim=1) for block in jacobian.split(sizes, dim=1)]
    return torch.stack(norms, dim=1)


def relaxed_scales(averages: Tensor, main: int, relax: float) -> Tensor:
    """``s = r m_main / m + (1 - r)`` per task and tensor ``(K, T)``; 1 where ``m = 0``
    and for the main task."""
    safe = torch.where(averages > 0, averages, torch.ones_like(averages))
    scales = relax * averages[main] / safe + (1.0 - relax)
    scales = torch.where(averages > 0, scales, torch.ones_like(scales))
    scales[main] = 1.0
    return scales


def rescaled_sum(jacobian: Tensor, sizes: list[int], scales: Tensor) -> Tensor:
    """``d_t = Σ_i s_{i,t} g_{i,t}`` for every block t, concatenated ``(P,)``."""
    blocks = jacobian.split(sizes, dim=1)
    s = scales.to(device=jacobian.device, dtype=jacobian.dtype)
    return torch.cat([s[:, t] @ block for t, block in enumerate(blocks)])


def norm_factors(norms: Tensor, scales: Tensor) -> Tensor:
    """``||ĝ_i|| / ||g_i||`` per task (the mean scale where ``g_i = 0``)."""
    total = norms.square().sum(dim=1)
    scaled = (scales * norms).square().sum(dim=1)
    ratio = (scaled / torch.where(total > 0, total, torch.ones_like(total))).sqrt()
    return torch.where(total > 0, ratio, scales.mean(dim=1))


@register("metabalance", "meta_balance")
class MetaBalance(PerTensorBalancer):
    """MetaBalance (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        main: the main (target) task, by name or index (default the first task).
        relax: relax factor r in [0, 1] (default 0.7, the official code).
        beta: moving-average coefficient β in [0, 1) (default 0.9).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.

    ``zero_scales`` counts the steps with a tensor whose auxiliary average was zero.
    """

    def __init__(
        self,
        tasks: Tasks,
        *,
        main: int | str = 0,
        relax: float = 0.7,
        beta: float = 0.9,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        self.main_index = task_index(self.tasks, main)
        if not 0.0 <= relax <= 1.0:
            raise ValueError(f"relax must be in [0, 1], got {relax}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.relax, self.beta = float(relax), float(beta)
        self.averages: Tensor | None = None
        self.zero_scales = 0

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        sizes = self.tensor_sizes(jacobian.shape[1])
        norms = block_norms(jacobian, sizes)
        bad = ~torch.isfinite(norms).all(dim=1)
        if bool(bad.any()):
            task = self.tasks[int(bad.nonzero()[0])]
            raise NonFiniteGradientError(
                f"the gradient of task {task!r} is not finite; no update can be computed",
                task=task,
            )
        previous = self.averages
        if previous is not None and previous.shape != norms.shape:
            raise BalancerUsageError(
                f"MetaBalance keeps moving averages for {previous.shape[1]} shared tensors, "
                f"but this step has {norms.shape[1]}: the shared parameters changed"
            )
        averages = (1.0 - self.beta) * norms
        if previous is not None:
            averages = averages + self.beta * previous.to(averages.device)
        scales = relaxed_scales(averages, self.main_index, self.relax)
        unknown = averages <= 0
        unknown[self.main_index] = False
        if bool(unknown.any()):
            self.zero_scales += 1
            logger.info(
                "MetaBalance: %d tensor(s) where an auxiliary task's average gradient norm is "
                "zero (tasks %s); their scale is taken as 1 (the block is zero)",
                int(unknown.any(dim=0).sum()),
                [self.tasks[i] for i in unknown.any(dim=1).nonzero().flatten().tolist()],
            )
        self.averages = averages
        weights = norm_factors(norms, scales).to(device=jacobian.device, dtype=jacobian.dtype)
        return rescaled_sum(jacobian, sizes, scales), weights

    def method_state(self) -> dict[str, Any]:
        averages = None if self.averages is None else self.averages.clone()
        return {"averages": averages, "zero_scales": self.zero_scales}

    def load_method_state(self, state: dict[str, Any]) -> None:
        averages = state["averages"]
        self.averages = None if averages is None else averages.detach().double().clone()
        self.zero_scales = int(state["zero_scales"])
