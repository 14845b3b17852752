"""SDMGrad-OS: SDMGrad with objective sampling, for many tasks.

Xiao, Ban, Ji, NeurIPS 2023 (see :mod:`taskbalance.aggregation.sdmgrad`), the objective
sampling variant. Each step draws a subset S of ``n`` of the K tasks, uniformly without
replacement, and back-propagates only their losses (the cost of n tasks, not K; see
:meth:`~taskbalance.aggregation.base.GradientBalancer.task_subset`). With ``J_S`` the
sampled gradients and zero rows for the others, the inner problem of SDMGrad runs on that
Gramian, and the update is scaled by ``K/n`` so that it is unbiased over the draws:

    d = (K/n) Σ_{i∈S} ((w_i + λ/K) / (1 + λ)) g_i,       E_S[d] = (g_w + λ g0) / (1 + λ)

for the same w (each task is in S with probability n/K). Unsampled tasks get weight 0 and
their task-specific parameters (heads) no gradient in that step.

Behaviour to know (it is the authors' code's, which also solves the inner problem with zero
rows for the unsampled tasks): a zero row costs nothing in ``½||g_w + λ g0||²``, so the
inner steps move w's mass onto the unsampled tasks unless a sampled gradient conflicts with
the (sampled) mean. Then ``g_w = 0`` and the update is ``(K/n) λ/(1+λ) g0``, i.e. the
sampled tasks' mean gradient times ``λ/(n(1+λ))`` each (0.1875 at the defaults): on steps
without conflict SDMGrad-OS is a scaled mean of the sampled gradients, and its
conflict-avoiding part acts only when the sampled gradients conflict.

Defaults: the paper's one objective-sampling setting (Meta-World MT10, authors' run script):
``n = 4``, λ = 0.6; the inner solver's as SDMGrad. ``n >= K`` samples every task: the method
is then SDMGrad. The authors' code draws each task with probability n/K (redrawn if none
is drawn, so S has a random size); the paper, and this class, take exactly n.

The draws come from the balancer's own seeded generator (``seed=``), saved in
``state_dict()`` and broadcast from rank 0 under DDP, so every rank samples the same tasks;
under gradient accumulation every micro-batch of an accumulated step uses the same subset
and the generator advances once per accumulated step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import embed_gramian
from taskbalance.aggregation.sdmgrad import SDMGrad
from taskbalance.balancer import Tasks
from taskbalance.errors import SolverError
from taskbalance.gradients import gramian as compute_gramian
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def sample_tasks(k: int, n: int, generator: torch.Generator) -> list[int]:
    """``n`` of ``k`` task indices, uniformly without replacement, sorted."""
    return sorted(torch.randperm(k, generator=generator)[:n].tolist())


@register("sdmgrad_os", "sdmgrados")
class SDMGradOS(SDMGrad):
    """SDMGrad-OS (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        n: tasks sampled (and back-propagated) per step (default 4).
        seed: seed of the balancer's own generator (the draws).
        lam: the regularisation λ (default 0.6).
        **kw: SDMGrad's ``niter``, ``lr``, ``momentum``, ``reduction``, and see
            :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    def __init__(
        self, tasks: Tasks, *, n: int = 4, seed: int = 0, lam: float = 0.6, **kw: Any
    ) -> None:
        super().__init__(tasks, lam=lam, **kw)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (tasks sampled per step) must be a positive int, got {n!r}")
        self.n = n
        self.generator = torch.Generator().manual_seed(int(seed))
        if n >= self.num_tasks:
            logger.info(
                "SDMGrad-OS: n=%d >= K=%d tasks: every task is back-propagated every step "
                "(this is SDMGrad with lam=%g); pass n < K to sample",
                n,
                self.num_tasks,
                lam,
            )

    def task_subset(self) -> list[int] | None:
        if self.n >= self.num_tasks:
            return None
        saved = self.generator.get_state()  # the draw is repeated, advancing, in the solve
        subset = sample_tasks(self.num_tasks, self.n, self.generator)
        self.generator.set_state(saved)
        return subset

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        subset = self.current_subset
        if subset is None:
            return super().aggregate(jacobian, losses)
        index = torch.tensor(subset, device=jacobian.device)
        rows = jacobian.index_select(0, index)  # the Gramian of the sampled rows only
        gram = embed_gramian(compute_gramian(rows).double(), subset, self.num_tasks)
        weights = self.scaled_weights(gram, losses).to(jacobian.dtype)
        return weights.index_select(0, index) @ rows, weights

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        subset = self.current_subset
        weights = self.solve(gramian)
        if subset is not None:
            drawn = sample_tasks(self.num_tasks, self.n, self.generator)  # advances it
            if drawn != subset:
                raise SolverError(
                    f"SDMGrad-OS: the generator draws {drawn}, but this step sampled {subset}; "
                    "was its state changed between the backward passes and the solve?"
                )
            mask = torch.zeros(self.num_tasks, dtype=torch.float64)
            mask[subset] = self.num_tasks / self.n
            weights = weights * mask.numpy()
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)

    def method_state(self) -> dict[str, Any]:
        return {**super().method_state(), "generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        super().load_method_state(state)
        self.generator.set_state(state["generator"])
