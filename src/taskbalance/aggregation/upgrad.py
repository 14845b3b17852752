"""UPGrad: the average of the task gradients projected onto the dual cone.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (the torchjd
library). Each gradient is projected onto the dual cone ``{x : J x >= 0}`` of the rows of J,
the set of directions that conflict with no task; by their Proposition 1 the projection of
``Jᵀu`` is ``Jᵀv`` with

    v(u) = argmin_{v >= u} vᵀ G v.

With a preference vector p (default uniform, ``p_i = 1/K``) the weights are

    w = Σ_i v(p_i e_i) = Σ_i p_i v(e_i)   (the mean of the K projections by default),

so ``d = wᵀJ`` lies in the dual cone: ``g_i · d >= 0`` for every task. Each ``v(e_i)`` is
solved exactly (:func:`taskbalance.aggregation._qp.project_dual_cone`, all K at once).

torchjd additionally normalises G by its trace (``norm_eps=1e-4``: a Gramian whose trace is
below it is replaced by zero, i.e. weights ``= p``) and adds ``reg_eps * I`` (``1e-4``) so
that its QP solver sees a positive definite matrix. Here both default to 0 (the exact
problem, the paper's definition); ``norm_eps=1e-4, reg_eps=1e-4`` reproduces torchjd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._dual_cone import (
    check_torchjd_eps,
    project_dual_cone,
    torchjd_gramian,
)
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register


def upgrad_projections(
    gramian: Tensor, pref: Tensor | None = None, norm_eps: float = 0.0, reg_eps: float = 0.0
) -> Tensor:
    """The K projections as rows: row i holds ``v(p_i e_i)`` (float64, ``(K, K)``)."""
    g = gramian.detach().cpu().double().numpy()
    k = g.shape[0]
    p = np.full(k, 1.0 / k) if pref is None else pref.detach().cpu().double().numpy()
    v = project_dual_cone(torchjd_gramian(g, norm_eps, reg_eps), np.diag(p))
    return torch.as_tensor(v, dtype=torch.float64, device=gramian.device)


def upgrad_weights(
    gramian: Tensor, pref: Tensor | None = None, norm_eps: float = 0.0, reg_eps: float = 0.0
) -> Tensor:
    """UPGrad weights ``(K,)``: the sum of the rows of :func:`upgrad_projections`."""
    return upgrad_projections(gramian, pref, norm_eps, reg_eps).sum(dim=0)


@register("upgrad")
class UPGrad(GradientBalancer):
    """Unconflicting projection of gradients (see the module docstring).

    Args:
        pref_vector: the K weights p that combine the projections (default ``1/K`` each).
        norm_eps, reg_eps: torchjd's Gramian normalisation and ridge (default 0: exact).
    """

    def __init__(
        self,
        tasks: Tasks,
        pref_vector: Sequence[float] | Tensor | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        check_torchjd_eps("UPGrad", norm_eps, reg_eps)
        self.pref = self.preference_vector(pref_vector)
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return upgrad_weights(gramian, self.pref, self.norm_eps, self.reg_eps)
