"""Exact solvers for the small quadratic programs of the gradient methods (NumPy float64).

Both take the Gramian ``G = J Jᵀ`` (K×K, symmetric PSD) and nothing else.

* :func:`min_norm_weights` — ``argmin_{w ∈ Δ} wᵀGw`` over the simplex: the weights of the
  min-norm point of the convex hull of the task gradients (MGDA). KKT: ``(Gw)_j >= λ = wᵀGw``
  for every j, with equality on the support.
* :func:`~taskbalance.aggregation._dual_cone.project_dual_cone` (in its own module, sharing
  the helpers here) — for each row u of U (B×K), ``argmin_{v >= u} vᵀGv``: the weights of
  the projection of ``Jᵀu`` onto the dual cone ``{x : Jx >= 0}`` (Quinton & Rey 2024,
  Prop. 1). KKT: ``v >= u``, ``Gv >= 0``, ``(Gv)_j = 0`` where ``v_j > u_j``.

Method: a primal-dual active-set pass (Hintermüller, Ito, Kunisch, SIAM J. Optim. 2002; for
the dual cone, all rows at once, one batched solve per iteration) usually ends in 1-4
linear solves. It is exact when its active set repeats, but it may cycle, so its point is
kept only if it passes the KKT check; otherwise a finite exact active-set method takes over:
Wolfe's min-norm-point algorithm (Math. Programming 1976) for the simplex, Lawson–Hanson
NNLS (1974, Gramian form, rows in lock-step) for the dual cone.

Numerics: the solves use the Jacobi-scaled Gramian ``Ĝ = D⁻¹GD⁻¹`` (``D = diag ||g_i||``),
so gradient norms from 1e-6 to 1e6 mix safely; a zero gradient (``G_ii = 0``) gets
``D_ii = 1`` and a zero row. A Gramian that is not numerically PSD (a float32 Gramian of a
rank-deficient J has eigenvalues near ±1e-7 λ_max) would make the problems non-convex: then
``Ĝ += 2|λ_min(Ĝ)| I``, a ridge at the precision to which G is known. Singular subsystems
(duplicated or dependent gradients) are solved by least squares. Tolerances are relative to
the rounding floor ``||g_j|| Σ_k |w_k| ||g_k||`` of ``(Gw)_j``. When the final KKT check fails
or an iteration cap is hit, the fallback is 2000 steps of accelerated projected gradient
from the best point so far, with a warning on the ``taskbalance`` logger. A non-finite
Gramian raises :class:`~taskbalance.errors.NonFiniteGradientError` (a
:class:`~taskbalance.errors.SolverError`); no solver returns NaN. The factorizations run
through ``torch.linalg`` in torch's thread pool (:mod:`taskbalance.aggregation._linalg`:
NumPy's own BLAS threads stalled them on busy CPUs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from taskbalance.aggregation import _linalg as linalg
from taskbalance.aggregation._simplex import project_simplex
from taskbalance.errors import NonFiniteGradientError

logger = logging.getLogger("taskbalance")

TOL = 1e-10  #: relative tolerance of the active-set decisions
CHECK_TOL = 1e-8  #: relative tolerance of the final KKT check
FALLBACK_STEPS = 2000
_EPS = float(np.finfo(np.float64).eps)
_TINY = float(np.finfo(np.float64).tiny)


def _prepare(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, d, Ĝ)``: the symmetrised (repaired) Gramian, the scales ``d`` and ``Ĝ``."""
    g = np.array(gramian, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"the Gramian must be a non-empty square matrix, got {g.shape}")
    if not np.isfinite(g).all():
        raise NonFiniteGradientError("the Gramian is not finite: some task gradient has NaN or inf")
    g = 0.5 * (g + g.T)
    zero = ~(np.diag(g) > 0)  # a zero gradient: its row must be zero as well
    if zero.any():
        g[zero, :] = 0.0
        g[:, zero] = 0.0
        d = np.where(zero, 1.0, np.sqrt(np.abs(np.diag(g))))
        sub: tuple[np.ndarray, ...] | slice = np.ix_(~zero, ~zero)
    else:
        d = np.sqrt(np.diag(g))
        sub = slice(None)
    hat = g / np.outer(d, d)
    if not linalg.is_positive_definite(hat[sub]):
        low = float(linalg.eigvalsh(hat[sub])[0])
        if low < 0:
            hat[sub] += -2.0 * low * np.eye(int((~zero).sum()))
            g = hat * np.outer(d, d)
    return g, d, hat


def _solve(m: np.ndarray, rhs: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """``m z = rhs`` (batched over leading axes); least squares where ``m`` is singular."""
    if ridge:
        m = m + ridge * np.eye(m.shape[-1])
    z = linalg.solve(m, rhs)
    if z is not None and np.isfinite(z).all():
        return z
    return linalg.lstsq(m, rhs)


def _fista(
    step: Callable[[np.ndarray], np.ndarray],
    project: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    objective: Callable[[np.ndarray], float],
) -> np.ndarray:
    """Accelerated projected gradient from ``x``; return the best iterate seen."""
    best, best_f = x, objective(x)
    y, t = x, 1.0
    for _ in range(FALLBACK_STEPS):
        x_new = project(step(y))
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y, x, t = x_new + ((t - 1.0) / t_new) * (x_new - x), x_new, t_new
        f = objective(x)
        if f < best_f:
            best, best_f = x, f
    return best


def _warn(what: str, count: str, k: int) -> None:
    logger.warning(
        "%s: %s without an exact KKT point (K=%d); falling back to %d steps of accelerated "
        "projected gradient",
        what,
        count,
        k,
        FALLBACK_STEPS,
    )


# ---------------------------------------------------------------------- min-norm point
class _MinNorm:
    """The simplex problem in scaled variables ``y = d w``: ``min yᵀĜy, aᵀy = 1, y >= 0``."""

    def __init__(self, g: np.ndarray, d: np.ndarray, hat: np.ndarray) -> None:
        self.g, self.d, self.hat = g, d, hat
        self.a = (1.0 / d) / (1.0 / d).max()  # border of the KKT system, scaled to at most 1

    def affine(self, s: np.ndarray) -> np.ndarray | None:
        """Weights (sum 1) of the min-norm point of the affine hull of the support ``s``."""
        idx = np.flatnonzero(s)
        n = idx.size
        m = np.zeros((n + 1, n + 1))
        m[:n, :n] = self.hat[idx[:, None], idx]
        m[:n, n] = m[n, :n] = self.a[idx]
        rhs = np.zeros(n + 1)
        rhs[n] = 1.0
        w = np.zeros(self.d.size)
        w[idx] = _solve(m, rhs)[:n] / self.d[idx]
        total = w.sum()
        return w / total if np.isfinite(total) and total != 0 else None

    def slack(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Gw - λ, unit)``: the KKT slack and its per-task tolerance unit."""
        gw = self.g @ w
        lam = float(w @ gw)
        mass = float(self.d @ np.abs(w))
        unit = mass * (self.d + np.sqrt(max(lam, 0.0))) + w.size * mass * mass * _EPS / TOL
        return gw - lam, unit

    def optimal(self, w: np.ndarray | None, tol: float = CHECK_TOL) -> bool:
        if w is None or not (w >= 0).all():
            return False
        slack, unit = self.slack(w)
        on = w > 0
        return bool((slack >= -tol * unit).all() and (np.abs(slack[on]) <= tol * unit[on]).all())

    def pdas(self, cap: int = 12) -> np.ndarray | None:
        s = np.ones(self.d.size, dtype=bool)
        for _ in range(cap):
            w = self.affine(s)
            if w is None:
                return None
            slack, unit = self.slack(w)
            new = np.where(s, w >= 0, slack < -TOL * unit)
            if (new == s).all() or not new.any():
                return np.maximum(w, 0.0) / np.maximum(w, 0.0).sum() if new.any() else None
            s = new
        return None

    def wolfe(self, cap: int) -> tuple[np.ndarray, bool]:
        """Wolfe's algorithm from the shortest gradient; ``(w, finished)``."""
        k = self.d.size
        start = int(np.argmin(np.diag(self.g)))
        s, w = np.zeros(k, dtype=bool), np.zeros(k)
        s[start], w[start] = True, 1.0
        it = 0
        while True:
            slack, unit = self.slack(w)
            j = int(np.argmin(slack / unit))
            if slack[j] >= -TOL * unit[j] or s[j]:
                return w, True
            s[j] = True
            while True:  # minor cycle: move towards the affine minimizer of the support
                it += 1
                v = self.affine(s) if it <= cap else None
                if v is None:
                    return w, False
                if (v[s] > 0).all():
                    w = v
                    break
                neg = s & (v <= 0)
                ratios = w[neg] / (w[neg] - v[neg])
                out = np.flatnonzero(neg)[int(np.argmin(ratios))]
                w = np.maximum(w + ratios.min() * (v - w), 0.0)
                w[out] = 0.0
                s &= w > 0
                w[~s] = 0.0
                w /= w.sum()
                if out == j and ratios.min() == 0.0:
                    return w, True  # the new point cannot enter: numerically optimal


def min_norm_weights(
    gramian: np.ndarray, *, max_iter: int | None = None, pdas: bool = True
) -> np.ndarray:
    """``argmin_{w >= 0, Σw = 1} wᵀGw`` (module docstring).

    ``pdas=False`` skips the primal-dual pass; ``max_iter`` caps Wolfe's steps (50 K + 100).
    """
    g, d, hat = _prepare(gramian)
    k = g.shape[0]
    zero = np.flatnonzero(np.diag(g) == 0)
    if k == 1 or zero.size:  # a zero gradient is the min-norm point
        return np.eye(k)[zero[0] if zero.size else 0]
    problem = _MinNorm(g, d, hat)
    if pdas:
        w = problem.pdas()
        if problem.optimal(w):
            return w  # type: ignore[return-value]
    w, finished = problem.wolfe(50 * k + 100 if max_iter is None else max_iter)
    if finished and problem.optimal(w):
        return w
    _warn("min-norm solver", "no convergence" if not finished else "a point", k)
    lip = max(float(linalg.eigvalsh(g)[-1]), _TINY)
    return _fista(lambda x: x - (g @ x) / lip, project_simplex, w, lambda x: float(x @ g @ x))
