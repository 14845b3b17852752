"""The margin problem of PCD: follow one gradient while every other gains a fixed amount.

Given the Gramian ``G`` of gradients ``g_1..g_K`` (already normalised by the caller), a
primary index p and margins ``b_j >= 0`` (j != p),

    d* = argmin_d ½||d − g_p||²   subject to   g_j · d >= b_j   (j != p).

Stationarity gives ``d* = g_p + Σ_{j≠p} μ_j g_j`` with multipliers ``μ >= 0``; they solve the
dual, a convex quadratic program over the non-negative orthant,

    μ = argmin_{μ >= 0} ½ μᵀAμ + qᵀμ,    A = G_SS,  q = G_Sp − b   (S = the tasks j != p),

whose gradient ``Aμ + q`` is the vector of slacks ``g_j · d − b_j``; KKT: slack >= 0 and
slack = 0 where μ_j > 0. Solved here by Lawson–Hanson's active-set method in Gramian form
(one small least-squares solve per step, exact when it stops), checked against the KKT
conditions. With every b_j = 0 the problem is the dual-cone projection of
:mod:`taskbalance.aggregation._dual_cone`.

Infeasible constraints (possible only with some ``b_j > 0`` and K >= 3, e.g. two opposite
secondary gradients) leave the dual unbounded below: by Farkas' lemma they are infeasible
exactly when some ``ν >= 0`` with ``Σ_j ν_j b_j = 1`` has ``Σ_j ν_j g_j = 0``, i.e. when the
min-norm point of the convex hull of the ``g_j / b_j`` is zero. That test runs only when the
active-set solve fails its KKT check; the caller decides what to do with an infeasible step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from taskbalance.aggregation._qp import _fista, _warn, min_norm_weights

#: relative tolerance of the KKT check (slacks against the rounding scale of ``g_j · d``)
CHECK_TOL = 1e-8
#: the hull's min-norm point counts as zero below this fraction of its largest vertex
INFEASIBLE_TOL = 1e-9


def _least_squares(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(a, rhs, rcond=None)[0]


def nonnegative_qp(a: np.ndarray, q: np.ndarray, cap: int) -> np.ndarray:
    """``argmin_{μ >= 0} ½ μᵀaμ + qᵀμ`` by Lawson–Hanson (``a`` PSD); at most ``cap`` steps."""
    m = q.shape[0]
    mu = np.zeros(m)
    free = np.zeros(m, dtype=bool)
    scale = max(float(np.abs(q).max(initial=0.0)), float(np.abs(a).max(initial=0.0)), 1e-300)
    steps = 0
    while steps < cap:
        slack = a @ mu + q
        candidates = np.where(free, np.inf, slack)
        j = int(np.argmin(candidates)) if m else 0
        if m == 0 or candidates[j] >= -1e-12 * scale:
            break
        free[j] = True
        while steps < cap:
            steps += 1
            z = np.zeros(m)
            z[free] = _least_squares(a[np.ix_(free, free)], -q[free])
            if (z[free] > 0).all():
                mu = z
                break
            shrink = free & (z <= 0)
            ratios = np.full(m, np.inf)
            ratios[shrink] = mu[shrink] / (mu[shrink] - z[shrink])
            t = float(ratios.min())
            mu = np.maximum(mu + t * (z - mu), 0.0)
            mu[shrink & (ratios <= t)] = 0.0
            free &= mu > 0
    return mu


def kkt_holds(a: np.ndarray, q: np.ndarray, mu: np.ndarray, magnitude: float) -> bool:
    """Whether ``mu`` passes the KKT check up to ``CHECK_TOL · magnitude``."""
    slack = a @ mu + q
    unit = CHECK_TOL * magnitude
    ok = np.isfinite(mu).all() and (mu >= 0).all() and (slack >= -unit).all()
    return bool(ok and (np.abs(slack[mu > 0]) <= unit).all())


def infeasible(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``{d : g_j · d >= b_j}`` is empty (module docstring); ``a`` = the g_j's Gramian."""
    pos = b > 0
    if not pos.any():
        return False  # d = 0 satisfies homogeneous constraints
    sub = a[np.ix_(pos, pos)] / np.outer(b[pos], b[pos])
    nu = min_norm_weights(sub)
    return float(nu @ sub @ nu) <= INFEASIBLE_TOL * float(np.diag(sub).max())


def margin_weights(
    gramian: np.ndarray,
    primary: int,
    margins: np.ndarray,
    on_fallback: Callable[[int], None] | None = None,
) -> np.ndarray | None:
    """Weights ``w`` (``w_p = 1``, ``w_j = μ_j``) with ``d* = Σ w_i g_i``; ``None`` if the
    constraints are infeasible. ``margins`` (K,) holds ``b_j`` (its entry p is ignored).
    A solve that fails its KKT check on feasible constraints falls back to accelerated
    projected gradient on the dual, logged; ``on_fallback(1)`` is then called."""
    g = 0.5 * (gramian + gramian.T)
    k = g.shape[0]
    rest = np.arange(k) != primary
    a, b = g[np.ix_(rest, rest)], margins[rest]
    q = g[rest, primary] - b
    w = np.zeros(k)
    w[primary] = 1.0
    if k == 1:
        return w
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    mu = nonnegative_qp(a, q, cap=10 * k + 20)
    magnitude = float(norms[rest].max()) * float(norms[primary] + mu @ norms[rest]) + b.max()
    if not kkt_holds(a, q, mu, magnitude):
        if infeasible(a, b):
            return None
        _warn("PCD margin problem", "the active-set solve", k)
        if on_fallback is not None:
            on_fallback(1)
        lip = max(float(np.linalg.eigvalsh(a)[-1]), 1e-300)
        mu = _fista(
            lambda x: x - (a @ x + q) / lip,
            lambda x: np.maximum(x, 0.0),
            np.where(np.isfinite(mu), np.maximum(mu, 0.0), 0.0),
            lambda x: float(0.5 * x @ a @ x + q @ x),
        )
    w[rest] = mu
    return w
