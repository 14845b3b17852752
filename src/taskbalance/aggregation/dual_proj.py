"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017 (GEM,
Eq. 10-11: a proposed update that conflicts with a task is replaced by its Euclidean
projection onto ``{d : g_i · d >= 0 for all i}``); in torchjd as ``DualProj`` (Quinton &
Rey 2024), where the proposed update is the mean gradient. With a preference vector p
(default uniform, ``p_i = 1/K``) the update is

    d = argmin_{x : J x >= 0} ||x - Jᵀp||²  =  Jᵀw,   w = argmin_{v >= p} vᵀ G v,

with G = JJᵀ (the dual of GEM's QP; Quinton & Rey, Prop. 1). KKT: ``w >= p``, ``Gw >= 0``
(``g_i · d >= 0``: no task conflicts with d) and ``(Gw)_j = 0`` where ``w_j > p_j``. When
the mean conflicts with no task, ``w = p`` and d is the mean. UPGrad projects each
``p_i g_i`` separately and sums the projections; DualProj projects their sum once (both
are the mean when nothing conflicts). The problem is solved exactly
(:func:`taskbalance.aggregation._dual_cone.project_dual_cone`); a point that fails its KKT
check falls back to accelerated projected gradient, logged on the ``taskbalance`` logger
and counted in :attr:`DualProj.fallbacks`.

torchjd normalises G by its trace (``norm_eps=1e-4``: a Gramian whose trace is below it is
replaced by zero, i.e. weights ``= p``) and adds ``reg_eps * I`` (``1e-4``) for its QP
solver. Here both default to 0 (the exact projection, GEM's definition);
``norm_eps=1e-4, reg_eps=1e-4`` reproduces torchjd. The ridge moves w off the exact
projection: then d may conflict slightly with a task (g1 = (1, 0), g2 = (-2, 1): exact
d = (0, 1/2); torchjd's d = (-6e-4, 1/2), so g1 · d < 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def dualproj_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
    on_fallback: Callable[[int], None] | None = None,
) -> Tensor:
    """DualProj weights ``w = argmin_{v >= p} vᵀGv`` (float64, ``(K,)``): ``wᵀJ`` is the
    projection of ``pᵀJ`` onto the dual cone. ``on_fallback`` as in ``project_dual_cone``."""
    g = gramian.detach().cpu().double().numpy()
    k = g.shape[0]
    p = np.full(k, 1.0 / k) if pref is None else pref.detach().cpu().double().numpy()
    g = torchjd_gramian(g, norm_eps, reg_eps)
    w = project_dual_cone(g, p[None, :], on_fallback=on_fallback)[0]
    return torch.as_tensor(w, dtype=torch.float64, device=gramian.device)


@register("dualproj", "dual_proj")
class DualProj(GradientBalancer):
    """GEM's projection of the mean gradient onto the dual cone (see the module docstring).

    Args:
        pref_vector: the K weights p of the vector that is projected (default ``1/K`` each).
        norm_eps, reg_eps: torchjd's Gramian normalisation and ridge (default 0: exact).

    ``fallbacks`` counts the steps whose projection fell back to projected gradient.
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
        check_torchjd_eps("DualProj", norm_eps, reg_eps)
        self.pref = self.preference_vector(pref_vector)
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        self.fallbacks = 0

    def _count_fallback(self, rows: int) -> None:
        self.fallbacks += 1

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return dualproj_weights(
            gramian, self.pref, self.norm_eps, self.reg_eps, on_fallback=self._count_fallback
        )

    def method_state(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.fallbacks = int(state["fallbacks"])
