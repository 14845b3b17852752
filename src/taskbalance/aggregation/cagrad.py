"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021. The update maximises the worst task improvement in a ball around the mean
gradient ``g0 = (1/K) sum_i g_i``; with ``s = c ||g0||`` and ``g_w = sum_i w_i g_i``:

    max_d min_i g_i·d  s.t. ||d - g0|| <= s    (dual: min_{w in simplex} g_w·g0 + s ||g_w||)
    d = g0 + (s / ||g_w*||) g_w* = sum_i (1/K + λ w*_i) g_i,    λ = s / ||g_w*||.

Only the Gramian is needed. ``c = 0`` gives the mean gradient exactly; c = 0.4 (default) is
the paper's value on its image benchmarks, 0.5 on its two-objective toy. The official code
divides d by ``1 + c²`` (``rescale="1+c^2"``; ``"1+c"`` is its other option); the default
``"none"`` keeps the paper's d, which has the conflict-averse property
``min_i g_i·d >= min_i g_i·g0``.

Solver (NumPy float64, :mod:`._cagrad_solver`). First an active-set pass on the dual: on a
guessed support the optimum has a closed form (one bordered K×K solve, Jacobi-scaled so
gradient norms from 1e-6 to 1e6 mix safely), and the support is corrected all at once until
it repeats. It starts from the previous step's support (kept in the state, so a resumed run
is bit-exact; the answer depends on the start only through the support it ends on) and
takes one to three solves in training. Its answer is kept only if the duality gap
``F(w) - min_i g_i·d`` is at most ``tol`` (relative to the mean ``||g_i||²``): d is then
within tol of the max-min optimum; ``∂F/∂w_i`` is equal on the support (to rounding) and not
below that level minus tol/2 off it (the KKT conditions). Otherwise (0 in the hull of the
gradients at or near the optimum, where F has a kink; a zero gradient; a support that does
not settle in 12 changes, seen with dependent gradients) a primal-dual interior point on
the primal ``max_{||u|| <= 1} min_i (g_i·g0 + s a_i·u)`` takes over: ``a_i`` = coordinates of
g_i from a pivoted Cholesky factor of the Jacobi-scaled Gramian (a unit gradient within 1e-6
of the span of the others adds no dimension), Mehrotra's centring kept >= 0.1, the
multipliers are the dual weights. It has no kink, its iterate ``d = g0 + s u`` is always in
the ball, and it stops at the same gap. If it does not get there (``max_iter`` iterations,
or a singular system) it logs a warning on the ``taskbalance`` logger and keeps its best
iterate, whose worst task improvement is never below the mean gradient's. Never NaN.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._cagrad_solver import active_set, interior_point
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

Rescale = Literal["none", "1+c^2", "1+c"]
DIVISOR = {"none": lambda c: 1.0, "1+c^2": lambda c: 1.0 + c * c, "1+c": lambda c: 1.0 + c}
ACTIVE_SET_STEPS = 12  #: support changes of the active-set pass before the interior point
SUPPORT_TOL = 1e-9  #: dual weights above this start the next step's active-set pass


def cagrad_solve(
    gramian: np.ndarray,
    c: float,
    *,
    tol: float = 1e-8,
    max_iter: int = 50,
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return ``(boost, w, gap)``: the update is ``d = sum_i (1/K + boost_i) g_i``.

    ``w`` are the dual (simplex) weights and ``gap`` the certified duality gap, in units of
    the mean ``||g_i||²``. ``start``: a boolean support for the active-set pass (e.g. the
    previous step's ``w > 0``; if it fails from there, it runs again from all tasks);
    ``max_iter`` caps both passes (active-set support changes at ``min(max_iter, 12)``,
    interior-point iterations at ``max_iter``).
    """
    k = gramian.shape[0]
    scale = float(gramian.trace()) / k
    if c == 0.0 or not scale > 0.0 or not np.isfinite(gramian).all():
        return np.zeros(k), np.full(k, 1.0 / k), 0.0
    a = (gramian + gramian.T) * (0.5 / scale)
    s2 = c * c * max(float(a.sum()) / (k * k), 0.0)  # s² = c² ||g0||², in units of scale
    if s2 > 0.0:
        steps = min(max_iter, ACTIVE_SET_STEPS)
        found = active_set(a, s2, tol, steps, start)
        if found is None and start is not None and start.any() and not start.all():
            found = active_set(a, s2, tol, steps)  # again, from every task
        if found is not None:
            return found
    return interior_point(a, s2, tol, max_iter)


def cagrad_weights(
    gramian: np.ndarray, c: float = 0.4, rescale: Rescale = "none", **solver: Any
) -> np.ndarray:
    """Task weights ``(K,)``: ``d = sum_i w_i g_i`` is the CAGrad update."""
    k = gramian.shape[0]
    boost, _, _ = cagrad_solve(gramian, c, **solver)
    return (1.0 / k + boost) / DIVISOR[rescale](c)


@register("cagrad")
class CAGrad(GradientBalancer):
    """Conflict-averse gradient descent; see the module docstring.

    Args:
        tasks: number of tasks or their names.
        c: radius of the ball around g0, relative to ``||g0||`` (default 0.4; ``c >= 0``).
        rescale: ``"none"`` (paper), ``"1+c^2"`` (official code's default) or ``"1+c"``.
        tol: duality-gap tolerance of the inner solve, relative to mean ``||g_i||²``.
        max_iter: interior-point iterations before the fallback (the active-set pass
            gets ``min(max_iter, 12)`` support changes).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    def __init__(
        self,
        tasks: Tasks,
        *,
        c: float = 0.4,
        rescale: Rescale = "none",
        tol: float = 1e-8,
        max_iter: int = 50,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not 0.0 <= c < float("inf"):
            raise ValueError(f"c must be a finite non-negative number, got {c}")
        if rescale not in ("none", "1+c^2", "1+c"):
            raise ValueError(f"rescale must be 'none', '1+c^2' or '1+c', got {rescale!r}")
        self.c, self.rescale, self.tol, self.max_iter = float(c), rescale, tol, int(max_iter)
        #: the dual weights' support at the last step: the active-set pass starts there.
        self.support: Tensor | None = None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        start = None if self.support is None else self.support.numpy()
        if start is not None and start.shape != (gramian.shape[0],):  # tasks_per_step
            start = None
        boost, w, _ = cagrad_solve(
            gramian.detach().cpu().numpy(),
            self.c,
            tol=self.tol,
            max_iter=self.max_iter,
            start=start,
        )
        self.support = torch.from_numpy(w > SUPPORT_TOL)
        weights = (1.0 / self.num_tasks + boost) / DIVISOR[self.rescale](self.c)
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"support": self.support}

    def load_method_state(self, state: dict[str, Any]) -> None:
        support = state.get("support")
        self.support = None if support is None else support.to(torch.bool).cpu()
