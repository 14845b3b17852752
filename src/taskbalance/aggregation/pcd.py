"""PCD: priority-constrained descent, the primary task's gradient made harmless to the others.

"Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
Multi-Objective Optimization" (TMLR 2026, https://openreview.net/forum?id=HT01yGHLEt), as in
torchjd 0.18 (``torchjd.aggregation.PCD``). One task p is primary; the update follows its
gradient as closely as possible while no other task gets worse to first order:

    d* = argmin_{x : g_j · x >= 0 for j != p} ||x - g_p||²,    d = ||g_p|| d* / ||d*||.

Gramian form: d* is the projection of ``g_p`` onto the closed convex cone
``C = {x : Jx >= 0}``. Dropping the primary's own constraint changes nothing: a projection P
onto a cone has ``g_p · P(g_p) = ||P(g_p)||² >= 0`` (Moreau), so the projection onto the
secondary constraints alone already lies in C. Hence ``d* = Jᵀv`` with
``v = argmin_{v >= e_p} vᵀGv`` (G = JJᵀ; Quinton & Rey 2024, Prop. 1), solved exactly by
:func:`~taskbalance.aggregation._dual_cone.project_dual_cone` with the lower bound ``e_p``.
KKT: ``v >= e_p``, ``Gv >= 0`` (``g_j · d* >= 0`` for every task) and ``(Gv)_j = 0`` where
``v_j > (e_p)_j`` (a task that pulls the update is exactly orthogonal to it). When ``g_p``
conflicts with no task, ``v = e_p`` and ``d = g_p``. K = 2 (p = 1): ``d = g_1`` if
``G_12 >= 0``, else ``d* = g_1 - (G_12 / G_22) g_2``.

``rescale=True`` (default, as torchjd and the paper) gives d the norm of ``g_p``;
``rescale=False`` returns the projection d* itself. When d* is zero up to the rounding of
the Gramian (``||d*||² <= 10 eps (Σ|v_i| ||g_i||)²``, eps that of J's dtype, float32 when
only the Gramian is known (DDP's features mode): ``g_p`` inside the polar cone, e.g. opposite
to a task, or ``g_p = 0``) the update is zero, as in torchjd; such steps are logged (INFO)
and counted in :attr:`PCD.zero_steps`. A projection that fails its KKT check falls
back to accelerated projected gradient, logged on the ``taskbalance`` logger and counted in
:attr:`PCD.fallbacks`.

The margin ``tau`` (default 0.02, as torchjd and the paper's reference code): each
secondary task j gets at least a fraction τ_j of the first-order progress of a step along
its own normalised gradient,

    d̃ = argmin_d ½||d − g̃_p||²  subject to  g̃_j · d >= τ_j ||g̃_j||²  (j != p),

with ``g̃_i = s_i g_i``, ``s_i = 1 / sqrt(v̂_i + eps)`` and ``v̂_i`` the bias-corrected moving
average of ``||g_i||²`` (``beta = 0.999``, ``eps = 1e-8``; the state), then rescaled to
``||g_p||``. With τ > 0 the primary task may get worse (only the secondary tasks are
constrained) and the normalisation matters. The margin problem is solved exactly by an
active-set method (:mod:`taskbalance.aggregation._margin_qp`); constraints that cannot hold
together (two opposite secondary gradients with τ > 0) are dropped for that step: the update
is ``g_p``, as in torchjd — logged (warning) and counted in :attr:`PCD.infeasible_steps`.
``tau=0`` is the projection above (the normalisation cannot change it: the cone and the
rescaling are scale-free). ``tau`` is a number or one value per secondary task (in task
order, the primary left out). torchjd accepts a constraint violated by up to 1e-9 of the
largest normalised squared norm; the solves here are exact to the rounding floor
(docs/methods.md has the cross-check).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._dual_cone import project_dual_cone
from taskbalance.aggregation._margin_qp import margin_weights
from taskbalance.aggregation.base import GradientBalancer, task_index
from taskbalance.balancer import Tasks
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")

#: ``||d*||²`` below this times its rounding scale ``(Σ|v_i| ||g_i||)²`` counts as zero
#: (J in float32; ``10 eps`` of J's dtype when the engine hands J over).
ZERO_TOL = 10.0 * float(torch.finfo(torch.float32).eps)


def pcd_projection_weights(gramian: Tensor, primary: int = 0, on_fallback: Any = None) -> Tensor:
    """``v = argmin_{v >= e_p} vᵀGv`` (float64, ``(K,)``): ``vᵀJ`` is the projection of
    ``g_p`` onto ``{x : Jx >= 0}``. ``on_fallback`` as in ``project_dual_cone``."""
    g = gramian.detach().cpu().double().numpy()
    low = np.zeros((1, g.shape[0]))
    low[0, primary] = 1.0
    v = project_dual_cone(g, low, on_fallback=on_fallback)[0]
    return torch.as_tensor(v, dtype=torch.float64, device=gramian.device)


def rescale_to_primary(
    gramian: Tensor, v: Tensor, primary: int, zero_tol: float = ZERO_TOL
) -> Tensor | None:
    """``v · ||g_p|| / ||vᵀJ||`` (so that ``||wᵀJ|| = ||g_p||``), or ``None`` when ``vᵀJ``
    is zero up to the rounding of the Gramian."""
    g = gramian.double()
    sq_norm = float(v @ g @ v)
    magnitude = float(v.abs() @ g.diagonal().clamp(min=0.0).sqrt()) ** 2
    if not sq_norm > zero_tol * magnitude:
        return None
    return v * float(np.sqrt(max(float(g[primary, primary]), 0.0) / sq_norm))


@register("pcd")
class PCD(GradientBalancer):
    """Priority-constrained descent (see the module docstring).

    Args:
        primary: the primary task, by name or index (default the first task).
        rescale: give the update the norm of the primary gradient (default, as torchjd);
            ``False`` keeps the projection itself (with τ > 0: ``d̃ / s_p``).
        tau: the margin τ in [0, 1], one number or one per secondary task (default 0.02).
        beta, eps: the moving average of the squared gradient norms that normalises them.

    ``fallbacks`` counts the steps whose projection fell back to projected gradient;
    ``zero_steps`` the steps whose update was zero (the primary gradient in the polar cone);
    ``infeasible_steps`` those whose margins could not all hold (update ``g_p``).
    """

    tasks_per_step_refusal = (
        "it keeps EMAs of the task gradients' statistics across steps and a primary task "
        "that a subset step may leave out"
    )

    def __init__(
        self,
        tasks: Tasks,
        primary: int | str = 0,
        rescale: bool = True,
        tau: float | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        self.primary_index = task_index(self.tasks, primary, "primary")
        self.primary = primary
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True or False, got {rescale!r}")
        self.rescale = rescale
        self.tau = self._margins(tau)
        if not 0 <= beta < 1 or not eps >= 0:
            raise ValueError(f"PCD needs beta in [0, 1) and eps >= 0, got {beta!r}, {eps!r}")
        self.beta, self.eps = float(beta), float(eps)
        self.fallbacks = 0
        self.zero_steps = 0
        self.infeasible_steps = 0
        self._sq_norm_ema = np.zeros(self.num_tasks)
        self._ema_steps = 0
        self._zero_tol = ZERO_TOL  # set from J's dtype by aggregate

    def _margins(self, tau: float | Sequence[float]) -> np.ndarray:
        """τ for every task (0 at the primary), checked to lie in [0, 1]."""
        k, p = self.num_tasks, self.primary_index
        values = np.full(k - 1, float(tau)) if np.ndim(tau) == 0 else np.asarray(tau, float)
        if values.shape != (k - 1,) or not ((values >= 0) & (values <= 1)).all():
            raise ValueError(
                f"PCD's tau must be a number in [0, 1] or {k - 1} such numbers (one per "
                f"secondary task, in task order without {self.tasks[p]!r}), got {tau!r}"
            )
        return np.insert(values, p, 0.0)

    def _count_fallback(self, rows: int) -> None:
        self.fallbacks += 1

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        self._zero_tol = 10.0 * float(torch.finfo(jacobian.dtype).eps)
        try:
            return super().aggregate(jacobian, losses)
        finally:
            self._zero_tol = ZERO_TOL

    def _scales(self, sq_norms: np.ndarray) -> np.ndarray:
        """Advance the moving average of ``||g_i||²``; return ``s_i = 1/sqrt(v̂_i + eps)``."""
        self._ema_steps += 1
        self._sq_norm_ema = self.beta * self._sq_norm_ema + (1 - self.beta) * sq_norms
        root = np.sqrt(self._sq_norm_ema / (1 - self.beta**self._ema_steps) + self.eps)
        return np.where(root > 0, 1.0 / np.where(root > 0, root, 1.0), 0.0)

    def _margin_solution(self, gramian: Tensor) -> Tensor:
        """τ > 0: the weights of ``d̃`` on the raw gradients (in g_p's units)."""
        g = gramian.detach().cpu().double().numpy()
        p = self.primary_index
        s = self._scales(np.clip(np.diag(g), 0.0, None))
        normalised = g * np.outer(s, s)
        if not g[p, p] > 0:
            return torch.zeros(self.num_tasks, dtype=torch.float64, device=gramian.device)
        w = margin_weights(normalised, p, self.tau * np.diag(normalised), self._count_fallback)
        if w is None:
            self.infeasible_steps += 1
            logger.warning(
                "PCD: step %d: the margins tau of the secondary tasks cannot all hold (their "
                "gradients conflict with each other); they are dropped for this step and the "
                "update is task %r's gradient (infeasible step %d)",
                self.steps,
                self.tasks[p],
                self.infeasible_steps,
            )
            w = np.eye(self.num_tasks)[p]
        v = w * s / s[p]
        return torch.as_tensor(v, dtype=torch.float64, device=gramian.device)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        p = self.primary_index
        if self.tau.any():
            v = self._margin_solution(gramian)
        else:
            self._scales(np.clip(gramian.detach().cpu().double().diagonal().numpy(), 0.0, None))
            v = pcd_projection_weights(gramian, p, on_fallback=self._count_fallback)
        if not self.rescale:
            return v
        w = rescale_to_primary(gramian, v, p, self._zero_tol) if bool(v.any()) else None
        if w is None:
            self.zero_steps += 1
            logger.info(
                "PCD: the projection of task %r's gradient is zero (it conflicts with the "
                "others as a whole); the update is zero",
                self.tasks[p],
            )
            return torch.zeros_like(v)
        return w

    def method_state(self) -> dict[str, Any]:
        return {
            "fallbacks": self.fallbacks,
            "zero_steps": self.zero_steps,
            "infeasible_steps": self.infeasible_steps,
            "sq_norm_ema": torch.tensor(self._sq_norm_ema, dtype=torch.float64),
            "ema_steps": self._ema_steps,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.fallbacks = int(state["fallbacks"])
        self.zero_steps = int(state["zero_steps"])
        self.infeasible_steps = int(state.get("infeasible_steps", 0))
        ema = state.get("sq_norm_ema")
        k = self.num_tasks
        self._sq_norm_ema = np.zeros(k) if ema is None else torch.as_tensor(ema).double().numpy()
        self._ema_steps = int(state.get("ema_steps", 0))
