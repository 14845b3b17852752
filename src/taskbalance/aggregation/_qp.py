"""Exact solvers for the small quadratic programs of the gradient methods (NumPy float64).

Both take the Gramian ``G = J Jᵀ`` (K×K, symmetric PSD) and nothing else.

* :func:`min_norm_weights` — ``argmin_{w ∈ Δ} wᵀGw`` over the simplex: the weights of the
  min-norm point of the convex hull of the task gradients (MGDA). Wolfe's exact active-set
  method ("Finding the nearest point in a polytope", Math. Programming 1976); it first tries
  the full support, which is the answer for generic high-dimensional gradients. Optimality
  (KKT): ``(Gw)_j >= λ = wᵀGw`` for all j, with equality on the support.
* :func:`project_dual_cone` — for each row u of U (B×K), ``argmin_{v >= u} vᵀGv``: the
  weights of the projection of ``Jᵀu`` onto the dual cone ``{x : Jx >= 0}`` (Quinton & Rey
  2024, Prop. 1). A Lawson–Hanson active-set method run on all rows at once (one batched
  ``solve`` per iteration). KKT: ``v >= u``, ``Gv >= 0``, ``(Gv)_j = 0`` where ``v_j > u_j``.

Numerics: the linear solves use the Jacobi-scaled Gramian ``Ĝ = D⁻¹GD⁻¹``
(``D = diag ||g_i||``, unit diagonal), so gradients of norms 1e-6 and 1e6 mix safely; a
zero gradient (``G_ii = 0``) gets ``D_ii = 1`` and a zero row. Singular subsystems (duplicated
or dependent gradients) are solved by least squares. Tolerances are relative to the rounding
floor ``||g_j|| * sum_k |w_k| ||g_k||`` of ``(Gw)_j``. Every result is checked against its KKT
conditions; on a failed check or on hitting the iteration cap the solver runs a fallback
(accelerated projected gradient, 2000 steps, from the best point so far), logs a warning on
the ``taskbalance`` logger and returns the fallback's point. A non-finite Gramian raises
:class:`~taskbalance.errors.SolverError`; no solver returns NaN.
"""

from __future__ import annotations

import logging

import numpy as np

from taskbalance.aggregation._simplex import project_simplex
from taskbalance.errors import SolverError

logger = logging.getLogger("taskbalance")

TOL = 1e-10  #: relative tolerance of the active-set decisions
CHECK_TOL = 1e-8  #: relative tolerance of the final KKT check
FALLBACK_STEPS = 2000
_EPS = np.finfo(np.float64).eps


def _prepare(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, d, Ĝ)``: the symmetrised Gramian, the scales ``d_i`` and ``Ĝ = G / d dᵀ``."""
    g = np.asarray(gramian, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"the Gramian must be a non-empty square matrix, got {g.shape}")
    if not np.isfinite(g).all():
        raise SolverError("the Gramian is not finite: some task gradient has NaN or inf")
    g = 0.5 * (g + g.T)
    zero = ~(np.diag(g) > 0)  # a zero gradient: its row must be zero as well
    g[zero, :] = 0.0
    g[:, zero] = 0.0
    d = np.where(zero, 1.0, np.sqrt(np.abs(np.diag(g))))
    return g, d, g / np.outer(d, d)


def _solve(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``m x = rhs`` (batched); least squares where ``m`` is singular."""
    try:
        x = np.linalg.solve(m, rhs[..., None])[..., 0]
        if np.isfinite(x).all():
            return x
    except np.linalg.LinAlgError:
        pass
    if m.ndim == 2:
        return np.linalg.lstsq(m, rhs, rcond=None)[0]
    return np.stack([np.linalg.lstsq(mi, ri, rcond=None)[0] for mi, ri in zip(m, rhs)])


def _fista(grad_step, project, x: np.ndarray, objective) -> np.ndarray:
    """Accelerated projected gradient from ``x``; return the best iterate seen."""
    best, best_f = x, objective(x)
    y, t = x, 1.0
    for _ in range(FALLBACK_STEPS):
        x_new = project(grad_step(y))
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y, x, t = x_new + ((t - 1.0) / t_new) * (x_new - x), x_new, t_new
        f = objective(x)
        if f < best_f:
            best, best_f = x, f
    return best


# ---------------------------------------------------------------------- min-norm point
def _min_norm_slack(g: np.ndarray, d: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(Gw - λ, tolerance unit per j)`` for the KKT conditions of the min-norm problem."""
    gw = g @ w
    lam = float(w @ gw)
    mass = float(d @ np.abs(w))
    unit = mass * (d + np.sqrt(max(lam, 0.0))) + g.shape[0] * mass * mass * _EPS / TOL
    return gw - lam, unit


def _affine_minimizer(hat: np.ndarray, a: np.ndarray, d: np.ndarray, s: np.ndarray):
    """Min-norm point of the affine hull of the gradients in support ``s`` (weights, sum 1)."""
    idx = np.flatnonzero(s)
    n = idx.size
    m = np.zeros((n + 1, n + 1))
    m[:n, :n] = hat[np.ix_(idx, idx)]
    m[:n, n] = m[n, :n] = a[idx]
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    v = np.zeros(d.size)
    v[idx] = _solve(m, rhs)[:n] / d[idx]
    total = v.sum()
    return v / total if np.isfinite(total) and total != 0 else None


def min_norm_weights(gramian: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """``argmin_{w >= 0, sum w = 1} wᵀ G w`` (see the module docstring)."""
    g, d, hat = _prepare(gramian)
    k = g.shape[0]
    zero = np.flatnonzero(np.diag(g) == 0)
    if k == 1 or zero.size:  # a zero gradient is the min-norm point
        return np.eye(k)[zero[0] if zero.size else 0]
    a = 1.0 / d
    a = a / a.max()
    cap = 50 * k + 100 if max_iter is None else max_iter
    w = _affine_minimizer(hat, a, d, np.ones(k, dtype=bool))
    if w is not None and (w >= 0).all():
        slack, unit = _min_norm_slack(g, d, w)
        if (np.abs(slack) <= CHECK_TOL * unit).all():
            return w
    start = int(np.argmin(np.diag(g)))
    s = np.zeros(k, dtype=bool)
    s[start] = True
    w = np.zeros(k)
    w[start] = 1.0
    it, exhausted, stuck = 0, False, False
    while not (exhausted or stuck):
        slack, unit = _min_norm_slack(g, d, w)
        j = int(np.argmin(slack / unit))
        if slack[j] >= -TOL * unit[j] or s[j]:
            break
        s[j] = True
        while True:  # minor cycle: move towards the affine minimizer of the support s
            it += 1
            v = _affine_minimizer(hat, a, d, s) if it <= cap else None
            if v is None:
                exhausted = True
                break
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
                stuck = True  # the new point cannot enter: numerically optimal, go check
                break
    slack, unit = _min_norm_slack(g, d, w)
    on = w > 0
    if (
        not exhausted
        and (slack >= -CHECK_TOL * unit).all()
        and (np.abs(slack[on]) <= CHECK_TOL * unit[on]).all()
    ):
        return w
    logger.warning(
        "min-norm solver: no exact KKT point after %d iterations (K=%d); falling back to "
        "%d steps of accelerated projected gradient",
        it,
        k,
        FALLBACK_STEPS,
    )
    lip = max(float(np.linalg.eigvalsh(g)[-1]), np.finfo(np.float64).tiny)
    return _fista(lambda x: x - (g @ x) / lip, project_simplex, w, lambda x: float(x @ g @ x))


# ---------------------------------------------------------------------- dual-cone projection
# In the scaled variables y = d * v each problem reads min yᵀĜy s.t. y >= low, x = y - low >= 0.
def _masked_solve(hat: np.ndarray, free: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """For each row: ``Ĝ_FF z_F = rhs_F`` on its free set F, ``z = 0`` elsewhere."""
    k = hat.shape[0]
    m = np.where(free[:, :, None] & free[:, None, :], hat, 0.0) + np.eye(k) * ~free[:, None, :]
    return np.where(free, _solve(m, np.where(free, rhs, 0.0)), 0.0)


def _pdas(hat: np.ndarray, low: np.ndarray, cap: int = 12) -> np.ndarray:
    """Primal-dual active set (semismooth Newton; Hintermüller, Ito, Kunisch 2002), batched.

    Exact when a row's active set repeats; usually 1-4 iterations. Rows that cycle or meet a
    singular subsystem are left as they are for the KKT check to catch.
    """
    c = low @ hat
    x = np.zeros_like(low)
    active = c > 0
    todo = np.arange(low.shape[0])
    for _ in range(cap):
        try:
            z = _masked_solve(hat, ~active[todo], -c[todo])
        except np.linalg.LinAlgError:
            break
        x[todo] = z
        lam = np.where(active[todo], z @ hat + c[todo], 0.0)
        new = lam - z > 0
        moved = (new != active[todo]).any(axis=1)
        active[todo] = new
        todo = todo[moved]
        if todo.size == 0:
            break
    return x


def _lawson_hanson(hat: np.ndarray, low: np.ndarray, cap: int) -> np.ndarray:
    """Lawson–Hanson NNLS in Gramian form, all rows in lock-step; finite and exact."""
    b, k = low.shape
    x = np.zeros((b, k))
    free = np.zeros((b, k), dtype=bool)
    inner = np.zeros(b, dtype=bool)
    done = np.zeros(b, dtype=bool)
    added = np.full(b, -1)
    rows = np.arange(b)
    for _ in range(cap):
        grad = (x + low) @ hat
        unit = np.maximum(np.abs(x + low).sum(axis=1, keepdims=True), np.finfo(float).tiny)
        score = np.where(free, np.inf, grad / unit)
        j = np.argmin(score, axis=1)
        outer = ~inner & ~done
        done |= outer & (score[rows, j] >= -TOL)
        grow = outer & ~done
        free[rows[grow], j[grow]] = True
        added = np.where(grow, j, added)
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        f, xa = free[act], x[act]
        z = _masked_solve(hat, f, -(low[act] @ hat))
        ok = ((z > 0) | ~f).all(axis=1)
        neg = f & (z <= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(neg, xa / (xa - z), np.inf)
        out = np.argmin(ratios, axis=1)
        alpha = np.where(ok, 1.0, ratios[np.arange(act.size), out])
        xn = np.where(ok[:, None], z, np.maximum(xa + alpha[:, None] * (z - xa), 0.0))
        xn[~ok, out[~ok]] = 0.0
        stuck = ~ok & (alpha == 0.0) & (out == added[act])
        x[act], free[act] = np.where(f & (xn > 0), xn, 0.0), f & (xn > 0)
        inner[act] = ~ok
        done[act[stuck]] = True  # the new index cannot enter: numerically optimal, go check
    return x


def _box_violations(hat: np.ndarray, low: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` that break the KKT conditions (or are not finite)."""
    y = x + low
    grad = y @ hat
    unit = CHECK_TOL * np.abs(y).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        bad = (grad < -unit).any(axis=1) | ((x > 0) & (np.abs(grad) > unit)).any(axis=1)
    return bad | ~np.isfinite(x).all(axis=1) | (x < 0).any(axis=1)


def project_dual_cone(
    gramian: np.ndarray, lower: np.ndarray, *, max_iter: int | None = None, pdas: bool = True
) -> np.ndarray:
    """Row-wise ``argmin_{v >= u} vᵀ G v`` for the rows u of ``lower`` (B, K) (module docs).

    A batched primal-dual active-set pass first (``pdas=True``); rows it leaves unsolved go
    to Lawson–Hanson (at most ``max_iter`` iterations, default ``10 K + 20``), then to the
    fallback.
    """
    g, d, hat = _prepare(gramian)
    u = np.atleast_2d(np.asarray(lower, dtype=np.float64))
    if u.ndim != 2 or u.shape[1] != g.shape[0] or not np.isfinite(u).all():
        raise ValueError(f"lower must be finite, of shape (B, {g.shape[0]}), got {u.shape}")
    k = g.shape[0]
    low = u * d
    x = _pdas(hat, low) if pdas else np.full_like(low, np.nan)
    bad = _box_violations(hat, low, x)
    if bad.any():
        cap = 10 * k + 20 if max_iter is None else max_iter
        x[bad] = _lawson_hanson(hat, low[bad], cap)
        bad = _box_violations(hat, low, x)
    if bad.any():
        logger.warning(
            "dual-cone projection: %d of %d problems have no exact KKT point (K=%d); falling "
            "back to %d steps of accelerated projected gradient",
            int(bad.sum()),
            u.shape[0],
            k,
            FALLBACK_STEPS,
        )
        lip = max(float(np.linalg.eigvalsh(hat)[-1]), 1.0)
        lo = low[bad]
        x[bad] = _fista(
            lambda t: t - (t @ hat) / lip,
            lambda t: np.maximum(t, lo),
            np.where(np.isfinite(x[bad]), x[bad], 0.0) + lo,
            lambda t: float(np.einsum("bi,ij,bj->", t, hat, t)),
        ) - lo
    return (x + low) / d
