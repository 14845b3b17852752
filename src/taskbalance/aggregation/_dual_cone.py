"""The dual-cone projection of UPGrad: for each row u of U, ``argmin_{v >= u} vᵀGv``.

Its weights give the projection of ``Jᵀu`` onto the dual cone ``{x : Jx >= 0}`` (Quinton &
Rey 2024, Prop. 1); KKT: ``v >= u``, ``Gv >= 0``, ``(Gv)_j = 0`` where ``v_j > u_j``. A
batched primal-dual active-set pass, then Lawson–Hanson NNLS in Gramian form (rows in
lock-step) when its point fails the KKT check, then accelerated projected gradient as the
logged fallback. The scaling, ridge and tolerances are those of
:mod:`taskbalance.aggregation._qp`, whose helpers this module shares.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from taskbalance.aggregation import _linalg as linalg
from taskbalance.aggregation._qp import (
    _TINY,
    CHECK_TOL,
    TOL,
    _fista,
    _prepare,
    _solve,
    _warn,
)

# ---------------------------------------------------------------------- dual-cone projection
# In scaled variables y = d * v each row reads min yᵀĜy s.t. y >= low; x = y - low >= 0.
#: up to this K the masked systems are solved at full width (one call, no gathering); above
#: it the free indices are gathered first, as the systems are then mostly much smaller.
DENSE_MAX_K = 16


def _masked_solve(hat: np.ndarray, free: np.ndarray, rhs: np.ndarray, ridge: float = 0.0):
    """For each row: ``Ĝ_FF z_F = rhs_F`` on its free set F, ``z = 0`` elsewhere.

    Small K: every row's system is K×K with the identity outside F (one batched solve).
    Large K: rows with an empty F are skipped and the free indices are gathered first, so
    the batched solve is only max|F| wide.
    """
    k = free.shape[1]
    if k <= DENSE_MAX_K:
        eye = np.eye(k)
        m = np.where(free[:, :, None] & free[:, None, :], hat + ridge * eye, eye)
        return _solve(m, np.where(free, rhs, 0.0))
    out = np.zeros(free.shape)
    rows = np.flatnonzero(free.any(axis=1))
    if rows.size == 0:
        return out
    free, rhs = free[rows], rhs[rows]
    n = int(free.sum(axis=1).max())
    order = np.argsort(~free, axis=1, kind="stable")[:, :n]
    valid = np.take_along_axis(free, order, axis=1)
    m = np.where(valid[:, :, None] & valid[:, None, :], hat[order[:, :, None], order[:, None]], 0)
    m = m + np.eye(n) * ~valid[:, None, :]
    z = _solve(m, np.where(valid, np.take_along_axis(rhs, order, axis=1), 0.0), ridge)
    sub = np.zeros((rows.size, k))
    np.put_along_axis(sub, order, np.where(valid, z, 0.0), axis=1)
    out[rows] = sub
    return out


def _pdas(hat: np.ndarray, low: np.ndarray, cap: int = 12) -> np.ndarray:
    """Primal-dual active set, all rows at once; rows freeze when their active set repeats.

    A ridge of 1e-13 keeps singular subsystems from stopping the batch; the points are
    verified against the exact KKT conditions afterwards.
    """
    c = low @ hat
    x = np.zeros_like(low)
    active = c >= 0
    if active.all():
        return x  # v = u is optimal for every row (no conflict): no solve at all
    todo = np.arange(low.shape[0])
    for _ in range(cap):
        act, ct = active[todo], c[todo]
        z = _masked_solve(hat, ~act, -ct, ridge=1e-13)
        x[todo] = z
        y = z + low[todo]
        unit = TOL * np.abs(y).sum(axis=1, keepdims=True)
        new = np.where(act, y @ hat >= -unit, z < 0)
        moved = (new != act).any(axis=1)
        if not moved.any():
            break
        active[todo] = new
        todo = todo[moved]
    return np.maximum(x, 0.0)


def _lawson_hanson(hat: np.ndarray, low: np.ndarray, cap: int) -> np.ndarray:
    """Lawson–Hanson NNLS in Gramian form, all rows in lock-step."""
    b, k = low.shape
    x = np.zeros((b, k))
    free = np.zeros((b, k), dtype=bool)
    inner, done = np.zeros(b, dtype=bool), np.zeros(b, dtype=bool)
    added, rows = np.full(b, -1), np.arange(b)
    for _ in range(cap):
        unit = np.maximum(np.abs(x + low).sum(axis=1, keepdims=True), _TINY)
        score = np.where(free, np.inf, ((x + low) @ hat) / unit)
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
        done[act[stuck]] = True  # the new index cannot enter: numerically optimal
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
    gramian: np.ndarray,
    lower: np.ndarray,
    *,
    max_iter: int | None = None,
    pdas: bool = True,
    on_fallback: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Row-wise ``argmin_{v >= u} vᵀGv`` for the rows u of ``lower`` (B, K) (module docs).

    ``pdas=False`` skips the primal-dual pass; ``max_iter`` caps Lawson–Hanson (10 K + 20).
    ``on_fallback(n)`` is called when ``n`` rows fell back to projected gradient (logged).
    """
    g, d, hat = _prepare(gramian)
    u = np.atleast_2d(np.asarray(lower, dtype=np.float64))
    k = g.shape[0]
    if u.ndim != 2 or u.shape[1] != k or not np.isfinite(u).all():
        raise ValueError(f"lower must be finite, of shape (B, {k}), got {u.shape}")
    low = u * d
    x = _pdas(hat, low) if pdas else np.full_like(low, np.nan)
    bad = _box_violations(hat, low, x)
    if bad.any():
        x[bad] = _lawson_hanson(hat, low[bad], 10 * k + 20 if max_iter is None else max_iter)
        bad = _box_violations(hat, low, x)
    if bad.any():
        _warn("dual-cone projection", f"{int(bad.sum())} of {u.shape[0]} problems", k)
        if on_fallback is not None:
            on_fallback(int(bad.sum()))
        lip, lo = max(float(linalg.eigvalsh(hat)[-1]), 1.0), low[bad]
        start = np.where(np.isfinite(x[bad]), x[bad], 0.0) + lo
        x[bad] = -lo + _fista(
            lambda t: t - (t @ hat) / lip,
            lambda t: np.maximum(t, lo),
            start,
            lambda t: float(np.einsum("bi,ij,bj->", t, hat, t)),
        )
    return np.where(x > 0, (x + low) / d, u)  # exactly u on the active constraints


def check_torchjd_eps(method: str, norm_eps: float, reg_eps: float) -> None:
    """Refuse a negative or NaN ``norm_eps`` / ``reg_eps`` (UPGrad's and DualProj's torchjd
    conventions), naming the method and the values that work."""
    if not (norm_eps >= 0 and reg_eps >= 0):
        raise ValueError(
            f"{method}: norm_eps and reg_eps must be >= 0 (0: the exact projection; torchjd "
            f"uses 1e-4 for both), got norm_eps={norm_eps}, reg_eps={reg_eps}"
        )


def torchjd_gramian(gramian: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """torchjd's ``G / trace(G) + reg_eps I`` (zero instead when ``trace < norm_eps``);
    ``G`` itself when both are 0 (the exact problem)."""
    if norm_eps == 0 and reg_eps == 0:
        return gramian
    trace = float(np.trace(gramian))
    g = np.zeros_like(gramian) if trace < norm_eps or trace <= 0 else gramian / trace
    return g + reg_eps * np.eye(gramian.shape[0])
