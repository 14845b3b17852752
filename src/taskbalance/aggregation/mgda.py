"""MGDA: the min-norm point of the convex hull of the task gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
C. R. Math. 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018. The weights solve

    w = argmin_{w >= 0, Σ w_i = 1} || Σ_i w_i g_i ||²  =  argmin_{w ∈ Δ} wᵀ G w,

so ``d = Σ_i w_i g_i`` is the min-norm element of the convex hull of the gradients. By the
KKT conditions ``g_i · d >= ||d||²`` for every task: ``-d`` is a descent direction for all
of them, and ``d = 0`` exactly at a Pareto-stationary point. Solved exactly on G
(:func:`taskbalance.aggregation._qp.min_norm_weights`), not by the paper's Frank–Wolfe loop.

``normalization`` follows the authors' ``gradient_normalizers``: the problem is solved for
``g_i / n_i`` with ``n_i = 1`` (``"none"``, default), ``||g_i||`` (``"l2"``), ``L_i``
(``"loss"``) or ``L_i ||g_i||`` (``"loss+"``), and, as in their training script, the weights
found multiply the raw losses: the update is ``Σ_i w_i g_i``.

**MGDA-UB** (the paper's Sec. 3.3 upper bound) is MGDA on the gradients with respect to the
shared representation Z: ``backward(losses, features=z)``. :class:`MGDAUB` (``"mgda_ub"``)
is the same method restricted to that mode, so it cannot silently run the exact variant.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._qp import min_norm_weights
from taskbalance.aggregation.base import GradientBalancer, Mode
from taskbalance.balancer import Tasks
from taskbalance.errors import NonPositiveLossError
from taskbalance.registry import register

Normalization = Literal["none", "l2", "loss", "loss+"]


def gradient_normalizers(
    gramian: np.ndarray, losses: np.ndarray, normalization: str = "none", tasks: Any = None
) -> np.ndarray:
    """The per-task divisors ``n_i`` of the authors' code (a zero gradient norm counts as 1)."""
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    norms = np.where(norms > 0, norms, 1.0)
    if normalization == "none":
        return np.ones_like(norms)
    if normalization == "l2":
        return norms
    if normalization in ("loss", "loss+"):
        for i, value in enumerate(np.asarray(losses, dtype=np.float64).tolist()):
            if not value > 0:
                task = tasks[i] if tasks is not None else str(i)
                raise NonPositiveLossError(task, value, f"MGDA(normalization={normalization!r})")
        return losses if normalization == "loss" else losses * norms
    raise ValueError(f"unknown normalization {normalization!r}")


def mgda_weights(
    gramian: Tensor, losses: Tensor | None = None, normalization: str = "none", tasks: Any = None
) -> Tensor:
    """MGDA weights ``(K,)`` (float64, non-negative, summing to 1) from the Gramian ``(K, K)``."""
    g = gramian.detach().cpu().double().numpy()
    if normalization != "none":
        values = np.ones(g.shape[0]) if losses is None else losses.detach().cpu().double().numpy()
        n = gradient_normalizers(g, values, normalization, tasks)
        g = g / np.outer(n, n)
    w = min_norm_weights(g)
    return torch.as_tensor(w, dtype=torch.float64, device=gramian.device)


@register("mgda")
class MGDA(GradientBalancer):
    """Multiple-gradient descent: weights of the min-norm point (see the module docstring)."""

    def __init__(self, tasks: Tasks, normalization: Normalization = "none", **kw: Any) -> None:
        super().__init__(tasks, **kw)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(
                f"normalization must be 'none', 'l2', 'loss' or 'loss+', got {normalization!r}"
            )
        self.normalization = normalization

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return mgda_weights(gramian, losses, self.normalization, self.tasks)


@register("mgda_ub", "mgdaub")
class MGDAUB(MGDA):
    """MGDA-UB: MGDA on the gradients w.r.t. the shared features (``features=`` required)."""

    modes: ClassVar[tuple[Mode, ...]] = ("features",)
