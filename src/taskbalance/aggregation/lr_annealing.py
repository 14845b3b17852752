"""Learning-rate annealing: task weights from gradient statistics (PINNs).

Wang, Teng, Perdikaris, "Understanding and Mitigating Gradient Flow Pathologies in
Physics-Informed Neural Networks", SIAM J. Sci. Comput. 43(5), 2021 (arXiv:2001.04536),
Algorithm 1. One task r is the reference (the PDE residual in the paper; here ``main=``, a
name or an index, default the first task) and keeps ``λ_r = 1``; every other task gets

    λ̂_i = max_θ |∇_θ L_r| / mean_θ |∇_θ L_i|,    λ_i <- (1 - α) λ_i + α λ̂_i,

with max and mean over all the shared parameters θ (the entries of a row of J), λ_i = 1 at
the start, and the update ``d = Σ_i λ_i g_i`` with the new λ. Paper defaults: α = 0.9, λ
updated at every step (``every=1``; ``every=n`` updates it at steps 0, n, 2n, ... and keeps
it in between).

The authors' code (GradientPathologiesPINNs) differs in four ways. It differentiates the
already weighted loss λ_i L_i, so ``λ̂_i = max|g_r| / (λ_i m_i)`` (fixed point
``λ_i = sqrt(max|g_r| / m_i)``, not the paper's ``max|g_r| / m_i``), and takes the mean
``m_i`` as the mean over the parameter tensors of each tensor's mean ``|g_i|``: both are
``variant="code"``. It keeps 0.9 of the old value (``alpha=0.1``) and updates every 10
steps (``every=10``). It restricts both statistics to the weight matrices (no biases);
here every shared tensor counts.

A task whose gradient is zero (``mean |g_i| = 0``) keeps its previous λ_i, and a zero
reference gradient (``max |g_r| = 0``) keeps every λ: each such update is logged (INFO,
logger ``taskbalance``) and counted in :attr:`LRAnnealing.fallbacks`. A non-finite gradient
raises :class:`~taskbalance.errors.NonFiniteGradientError` naming the task, state unchanged.
The recorded weights are λ (``d = wᵀJ`` exactly). The statistics are taken over parameters,
so only the exact mode (``shared=``) is offered. ``needs = "jacobian"``; state: λ and the
step counter.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.aggregation.base import PerTensorBalancer, task_index
from taskbalance.balancer import Tasks
from taskbalance.errors import NonFiniteGradientError
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def gradient_statistics(jacobian: Tensor, sizes: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """``(max |g_i|, mean |g_i|)`` per row ``(K,)`` (float64): the mean over all entries, or
    with ``sizes`` (the parameter tensors' numels) the mean of the per-tensor means."""
    absolute = jacobian.abs()
    peak = absolute.amax(dim=1).double()
    if sizes is None:
        return peak, absolute.mean(dim=1).double()
    means = [block.mean(dim=1).double() for block in absolute.split(sizes, dim=1)]
    return peak, torch.stack(means, dim=1).mean(dim=1)


def annealed(lam: Tensor, target: Tensor, alpha: float, valid: Tensor) -> Tensor:
    """``(1 - α) λ + α λ̂`` where ``valid``, the previous λ elsewhere."""
    return torch.where(valid, (1.0 - alpha) * lam + alpha * target, lam)


@register("lr_annealing", "gradient_pathologies")
class LRAnnealing(PerTensorBalancer):
    """Learning-rate annealing of Wang, Teng & Perdikaris (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        main: the reference task r (the PDE residual), by name or index (default the first).
        alpha: weight α in [0, 1] of the new estimate (default 0.9, the paper; the authors'
            code: 0.1).
        every: update λ every that many steps (default 1, the paper; the code: 10).
        variant: ``"paper"`` (default) or ``"code"``: λ̂ from the gradient of the weighted
            loss and the mean of the per-tensor means (see the module docstring).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.

    ``fallbacks`` counts the updates that kept a λ because a gradient was zero.
    """

    def __init__(
        self,
        tasks: Tasks,
        *,
        main: int | str = 0,
        alpha: float = 0.9,
        every: int = 1,
        variant: Literal["paper", "code"] = "paper",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if variant not in ("paper", "code"):
            raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
        self.variant = variant
        self.main_index = task_index(self.tasks, main)
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.alpha, self.every = alpha, every
        self.lam = torch.ones(self.num_tasks, dtype=torch.float64)
        self.t = 0
        self.fallbacks = 0

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        sizes = self.tensor_sizes(jacobian.shape[1]) if self.variant == "code" else None
        peak, mean = gradient_statistics(jacobian, sizes)
        bad = ~(torch.isfinite(peak) & torch.isfinite(mean))
        if bool(bad.any()):
            task = self.tasks[int(bad.nonzero()[0])]
            raise NonFiniteGradientError(
                f"the gradient of task {task!r} is not finite; no weights can be computed",
                task=task,
            )
        if self.t % self.every == 0:
            self._update(peak[self.main_index], mean)
        self.t += 1
        weights = self.lam.to(device=jacobian.device, dtype=jacobian.dtype)
        return weights @ jacobian, weights

    def _update(self, reference: Tensor, mean: Tensor) -> None:
        """λ from the reference's max |g_r| and the tasks' mean |g_i| (zeros: kept)."""
        lam = self.lam
        others = torch.ones_like(lam, dtype=torch.bool)
        others[self.main_index] = False
        zero = others & (mean.cpu() <= 0)
        if float(reference) <= 0:
            zero = others
        if bool(zero.any()):
            self.fallbacks += 1
            logger.info(
                "LR annealing: zero gradient (%s); kept the previous weights of %s",
                "reference task" if float(reference) <= 0 else "mean |g| = 0",
                [self.tasks[i] for i in zero.nonzero().flatten().tolist()],
            )
        valid = others & ~zero
        denominator = torch.where(valid, mean.cpu(), torch.ones_like(lam))
        if self.variant == "code":
            denominator = denominator * lam
        self.lam = annealed(lam, float(reference) / denominator, self.alpha, valid)

    def method_state(self) -> dict[str, Any]:
        return {"lam": self.lam.clone(), "t": self.t, "fallbacks": self.fallbacks}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"].detach().to(torch.float64).clone()
        self.t = int(state["t"])
        self.fallbacks = int(state["fallbacks"])
