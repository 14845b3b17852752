"""Nash-MTL: the Nash bargaining solution of the task gradients.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022. The update ``d = sum_i alpha_i g_i`` uses the weights
``alpha > 0`` that solve

    G alpha = 1 / alpha  (elementwise),    G = J Jᵀ,

so every task's utility is ``g_i · d = 1/alpha_i`` (the bargaining property) and
``||d||² = K``. This is the stationarity condition of ``f(a) = ½ aᵀGa − Σ log a_i``, whose
Hessian ``G + diag(1/a²)`` is positive definite; f is self-concordant, so a damped Newton
method converges from any positive start (here in the scaled form ``a ← a(1 + t u)``,
``(D G D + I) u = 1 − a ⊙ Ga``, ``D = diag(a)``; backtracking, never below the self-concordant
step ``1/(1 + λ)``). The paper solves it with a sequence of cvxpy problems instead.

Choices, against the official code (AvivNavon/nash-mtl):

* G is divided by its Frobenius norm n before solving and the solution is rescaled by
  ``1/sqrt(n)``: the weights are those of the unnormalised G, as in the official code
  (whose constraints carry the normalisation factor back in).
* Warm start from the previous weights (official) or the cold start ``a_i ∝ 1/||g_i||``
  (exact for K = 2), whichever has the lower f. No ``optim_niter`` (20 CCCP steps there):
  Newton stops at a residual ``max_i |a_i (Ga)_i − 1|`` of 1e-13 or when it stalls
  (usually 5–10 steps, cap ``max_iter``).
* ``max_norm=1.0`` (official default): this step's combined direction is scaled by
  ``min(1, max_norm / (||d|| + 1e-6))`` as ``clip_grad_norm_`` would (official: the shared
  parameters' gradient); ``max_norm=0`` disables it. The exact solution has ``||d|| = √K``.
  ``||d||`` is computed from the Gramian, ``sqrt(αᵀGα)`` (no pass over J; under DDP's
  features mode the global Gramian, so every rank scales alike). The recorded weights
  (``history``, ``last_weights``, the value ``backward`` returns) are those actually
  applied, ``c·α`` with the clip factor ``c <= 1``, so that ``d = wᵀJ`` holds;
  :attr:`NashMTL.alpha` keeps the unclipped solution (the warm start).
* ``update_weights_every`` (official default 1) is not offered: reusing weights only pays
  off if the K task backward passes are skipped, which is a job for the engine.
* Task-specific parameters follow the library rule (``task_specific="unweighted"``); the
  official code gives them ``alpha_i``-weighted gradients (``task_specific="weighted"``,
  which here uses the recorded weights ``c·α_i``, so that the whole update is the gradient
  of ``Σ w_i L_i``; the official code clips the shared parameters only).

No silent failure. A Nash solution exists iff no convex combination of the task gradients
is zero (Gordan); at a Pareto-stationary point, with a zero task gradient or two opposite
ones, f is unbounded below. A solve whose residual exceeds ``tol`` or is not finite falls back
to, in order: (1) the regularised system with ``G/n + ridge·I`` (current gradients; a
zero-gradient task then gets a large but harmless weight); (2) the previous weights;
(3) equal weights. Each fallback is logged as a warning on the ``taskbalance`` logger and
counted in :attr:`NashMTL.fallbacks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from taskbalance.aggregation._fallback_solve import solve_with_fallbacks
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register


def _objective(G: np.ndarray, a: np.ndarray) -> float:
    return float(0.5 * a @ G @ a - np.log(a).sum())


def _rescaled(G: np.ndarray, a: np.ndarray) -> np.ndarray | None:
    """``s·a`` with the s minimising f along a, or None if a is not a usable direction."""
    q = float(a @ G @ a)
    if not (np.isfinite(q) and q > 0 and np.all(np.isfinite(a)) and np.all(a > 0)):
        return None
    return a * np.sqrt(a.shape[0] / q)


def nash_solve(G: np.ndarray, start: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Damped Newton for ``G a = 1/a`` from ``start > 0``; return ``(a, residual)``.

    The residual is ``max_i |a_i (G a)_i − 1|`` of the best iterate (scale-free; 0 at the
    solution). When f is unbounded the iterates grow and the residual stays O(1).
    """
    eye = np.eye(G.shape[0])
    a = start
    best, best_r, stalled, local = a, np.inf, 0, False
    for i in range(max_iter + 1):
        aGa = a * (G @ a)
        r = float(np.max(np.abs(aGa - 1.0)))
        if r < best_r:
            best, best_r, stalled = a, r, 0
        elif local:
            stalled += 1
        if not np.isfinite(r) or r < 1e-13 or stalled >= 3 or i == max_iter:
            break
        rhs = 1.0 - aGa
        u = np.linalg.solve(a[:, None] * G * a[None, :] + eye, rhs)
        lam2 = max(float(rhs @ u), 0.0)
        t_min, t = 1.0 / (1.0 + np.sqrt(lam2)), 1.0
        local = lam2 <= 0.0625  # λ ≤ 1/4: the full step is safe and quadratically convergent
        if not local:
            f0 = _objective(G, a)
            while t > t_min:
                trial = a * (1.0 + t * u)
                if np.all(trial > 0) and _objective(G, trial) <= f0 - 0.25 * t * lam2:
                    break
                t *= 0.5
            t = max(t, t_min)
        a = a * (1.0 + t * u)
    return best, best_r


@register("nash_mtl", "nashmtl")
class NashMTL(GradientBalancer):
    """Nash-MTL (see the module docstring). ``fallbacks`` counts steps that used a fallback."""

    weights_per_task = True  # Gα = 1/α: about one per task (tasks_per_step)

    scales_direction = True  # the clip of ||d|| = sqrt(αᵀGα)

    def __init__(
        self,
        tasks: Tasks,
        max_norm: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        ridge: float = 1e-6,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if max_norm < 0 or max_iter < 1 or not tol > 0 or not ridge > 0:
            raise ValueError("need max_norm >= 0, max_iter >= 1, tol > 0 and ridge > 0")
        self.max_norm, self.max_iter, self.tol, self.ridge = max_norm, max_iter, tol, ridge
        self.alpha: Tensor | None = None  # last weights (float64), the warm start
        self.fallbacks = 0
        self.last_fallback: str | None = None

    def _try(self, G: np.ndarray, warm: np.ndarray | None) -> np.ndarray | None:
        cold = _rescaled(G, 1.0 / np.sqrt(np.maximum(np.diag(G), 1e-300)))
        starts = [s for s in (cold, None if warm is None else _rescaled(G, warm)) if s is not None]
        if not starts:
            return None
        start = min(starts, key=lambda s: _objective(G, s))
        try:
            a, r = nash_solve(G, start, self.max_iter)
        except np.linalg.LinAlgError:
            return None
        return a if np.all(np.isfinite(a)) and np.all(a > 0) and r <= self.tol else None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G = gramian.detach().cpu().double().numpy()
        prev = None if self.alpha is None else self.alpha.cpu().numpy()
        if prev is not None and prev.shape != (G.shape[0],):  # a subset step's (tasks_per_step)
            prev = None
        alpha = solve_with_fallbacks(
            self, G, prev, lambda n: 1.0 / np.sqrt(n), "NashMTL", "G alpha = 1/alpha"
        )
        self.alpha = alpha
        return alpha.to(gramian.device)

    def direction_scale(self, norm: float) -> float:
        """``min(1, max_norm / (norm + 1e-6))`` (1 when ``max_norm=0``), as clip_grad_norm_."""
        if self.max_norm > 0:
            coef = self.max_norm / (norm + 1e-6)
            if coef < 1.0:
                return coef
        return 1.0

    def method_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "fallbacks": self.fallbacks}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"]
        self.fallbacks = int(state["fallbacks"])
