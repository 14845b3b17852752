"""The two solvers of CAGrad's inner problem (NumPy float64); see :mod:`.cagrad`.

Both work on ``A = G / scale`` (``scale`` = mean ``||g_i||²``), with ``b = A 1/K`` (``b_i =
g_i·g0``) and ``s² = c² ||g0||²`` in the same units, and return ``(boost, w, gap)``.

* :func:`active_set` — the dual ``min_{w ∈ Δ} F(w) = bᵀw + s ||g_w||`` by a primal-dual
  active-set (semismooth Newton) iteration. On a support S the optimum of F over the affine
  hull ``{w_S, Σ w = 1}`` is in closed form: with ``(w0, w1)`` from one bordered solve
  (``w0`` the min-norm point of the hull, ``w1 = argmin_{Σv = 0} ½vᵀAv + bᵀv``), ``μ0 =
  ||g_w0||²`` and ``q = ||g_w1||²``, it is ``w = w0 + t w1`` with ``t = sqrt(μ0 / (s² - q))``,
  and ``λ = s / ||g_w|| = 1 / t``. The support is then updated all at once (drop ``w_i <= 0``,
  add the tasks whose ``∂F/∂w_i`` is below the common value on S) until it repeats; where F
  is unbounded below on the hull (``s² <= q``, dependent gradients) the tasks with
  ``(w1)_i <= 0`` are dropped. Usually 1-3 solves (1 if the support is the previous step's).
  Its answer is kept only if certified (duality gap at most ``tol``); 0 in the hull of S
  with the optimum there (``μ0 = 0``, the kink of F), a zero gradient, cancellation in
  ``||g_w||`` or no repeat within ``steps`` hand the problem to the interior point.
* :func:`interior_point` — the primal SOCP in the span of the gradients (described in
  :mod:`.cagrad`): no kink, slower; it logs the warning when it stops above ``tol``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger("taskbalance")
RANK_TOL = 1e-12  #: residual squared norm (of a unit gradient) below which it is dropped
SIGMA_MIN = 0.1  #: lower bound of the centring parameter (the plain Mehrotra one oscillates)
HUGE = 1e8  #: a solution this large means a singular system: least squares instead
CANCEL = 1e-4  #: ||g_w||² below CANCEL (Σ w_i ||g_i||)² is left to the interior point


def active_set(
    a: np.ndarray, s2: float, tol: float, steps: int, start: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(λ w, w, gap)`` certified to ``gap <= tol``, or ``None`` (the interior point's turn).

    ``start`` is a boolean support to begin with (default: every task). Written for few
    NumPy calls per step: at K <= 40 their overhead, not the arithmetic, is the cost.
    """
    k = a.shape[0]
    norms = np.sqrt(a.diagonal())
    if not norms.min() > 0.0:
        return None  # a zero gradient: w = its vertex is a kink of F
    b = a.sum(axis=1) / k
    inv = 1.0 / norms
    # the bordered matrix [[Â, e], [eᵀ, 0]] of all tasks, Â = D⁻¹AD⁻¹ (Jacobi scaling, the
    # unknowns are y = D w), e = D⁻¹1 / max; each step takes the rows and columns of S
    full = np.zeros((k + 1, k + 1))
    full[:k, :k] = a * inv * inv[:, None]
    full[k, :k] = full[:k, k] = inv / inv.max()
    full_rhs = np.zeros((k + 1, 2))  # columns: (0, 1/max) -> w0, (-D⁻¹b, 0) -> w1
    full_rhs[:k, 1] = -b * inv
    full_rhs[k, 0] = 1.0 / inv.max()  # so that Σ w0 = 1
    to_w = np.append(inv, 0.0)[:, None]  # y -> w, and the multiplier row -> 0
    ext = np.ones(k + 1, dtype=bool)  # S and the border
    if start is not None and start.any():
        ext[:k] = start
    for _ in range(steps):
        support = ext[:k]
        rows = np.flatnonzero(ext)
        y = _solve(full[rows[:, None], rows], full_rhs[rows])
        pair = np.zeros((k + 1, 2))
        pair[rows] = y * to_w[rows]
        pair = pair[:k]
        a_pair = a @ pair
        mu0, q = np.einsum("ij,ij->j", pair, a_pair)
        if not s2 > q:  # F is unbounded below on the hull: head along w1, drop where it falls
            new = support & (pair[:, 1] > 0)
        elif not mu0 > 0.0:
            return None  # 0 in the hull and the optimum on it is there: F's kink
        else:
            t = math.sqrt(mu0 / (s2 - q))
            mix = np.array((1.0, t))
            w, aw = pair @ mix, a_pair @ mix  # w = w0 + t w1, A w
            grad = b + aw / t  # ∂F/∂w = b + λ A w with λ = 1 / t
            new = np.where(support, w > 0.0, grad < float(w @ grad) - 0.5 * tol)
            if np.array_equal(new, support):
                break
        if not new.any():
            return None
        ext[:k] = new
    else:
        return None
    # certificate: w > 0 on S, 0 off it; d = g0 + λ g_w with λ = s / ||g_w|| lies on the
    # sphere ||d - g0|| = s; gap = F(w) - min_i g_i·d >= 0 bounds both sides' suboptimality
    total = float(w.sum())  # 1 to rounding
    w, aw = w / total, aw / total
    norm2 = float(w @ aw)
    if not norm2 > CANCEL * float(w @ norms) ** 2:
        return None  # ||g_w|| is lost to cancellation
    lam = math.sqrt(s2 / norm2)
    gap = float(b @ w) + math.sqrt(s2 * norm2) - float((b + lam * aw).min())
    return (lam * w, w, gap) if gap <= tol else None


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``system⁻¹ rhs``; least squares (singular values below RANK_TOL dropped) where the
    system is singular: dependent gradients, whose weights F does not see."""
    try:
        y = np.linalg.solve(system, rhs)
        if np.abs(y).max() < HUGE:  # also False for NaN
            return y
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(system, rhs, rcond=RANK_TOL)[0]


def _span_coordinates(unit_gram: np.ndarray) -> np.ndarray:
    """``M (m, K)`` with ``MᵀM = unit_gram`` (pivoted Cholesky; residuals below RANK_TOL, i.e.
    gradients in the span of the others to 1e-6, are dropped). Plain NumPy on purpose: a
    threaded LAPACK eigensolver is 50x slower on a busy machine at K = 40."""
    k = unit_gram.shape[0]
    low, residual = np.zeros((k, k)), np.diag(unit_gram).copy()
    limit, m = RANK_TOL * max(float(residual.max()), 0.0), 0
    while m < k:
        p = int(np.argmax(residual))
        if not residual[p] > limit:
            break
        low[:, m] = (unit_gram[:, p] - low[:, :m] @ low[p, :m]) / np.sqrt(residual[p])
        residual -= low[:, m] ** 2
        residual[p], m = 0.0, m + 1
    return low[:, :m].T


def _newton_pair(coords: np.ndarray, s: float, x: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """Newton directions for ``max t`` s.t. ``b + s Mᵀu - t >= 0`` and ``||u|| <= 1``.

    ``x = (u, t, multipliers)`` and ``slack`` (K linear slacks, then ``1 - ||u||²``). Returns
    rows ``(du, dt, d_multipliers, d_slack)``; column 0 is the affine step (complementarity
    target 0), column 1 the change per unit of target (centring): the system is linear in
    the target, so the step for target ``σμ`` is ``col0 + σμ col1``.
    """
    m, k = coords.shape
    u, mult = x[:m], x[m + 1 :]
    ratio = mult[:k] / slack[:k]
    weighted = coords * ratio
    eta, ball = mult[k], slack[k]
    system = np.empty((m + 1, m + 1))
    system[:m, :m] = (s * s) * weighted @ coords.T + (4.0 * eta / ball) * np.outer(u, u)
    system[np.arange(m), np.arange(m)] += 2.0 * eta
    system[:m, m] = system[m, :m] = -s * weighted.sum(axis=1)
    system[m, m] = ratio.sum()
    comp = np.stack((-slack * mult, np.ones(k + 1)), axis=1)
    scaled = comp[:k] / slack[:k, None]
    rhs = np.empty((m + 1, 2))
    rhs[:m] = s * (coords @ scaled) - np.outer(u, 2.0 * comp[k] / ball)
    rhs[m] = -scaled.sum(axis=0)
    rhs[:m, 0] -= 2.0 * eta * u - s * (coords @ mult[:k])  # dual residuals
    rhs[m, 0] -= mult[:k].sum() - 1.0
    dx = np.linalg.solve(system, rhs)
    d_slack = np.vstack((s * (coords.T @ dx[:m]) - dx[m], -2.0 * (u @ dx[:m])))
    d_mult = (comp - mult[:, None] * d_slack) / slack[:, None]
    return np.vstack((dx, d_mult, d_slack))


def _max_step(z: np.ndarray, dz: np.ndarray, u: np.ndarray, du: np.ndarray) -> float:
    """Largest step in [0, 1] keeping ``z`` (multipliers, slacks) >= 0 and ``||u|| <= 1``."""
    neg = dz < 0
    ratio = min(1.0, float(np.min(-z[neg] / dz[neg]))) if neg.any() else 1.0
    quad, lin = float(du @ du), float(u @ du)
    if quad > 0:  # exact root of ||u + a du||² = 1 (the linearised ball slack is in z)
        ratio = min(ratio, (-lin + np.sqrt(lin * lin + quad * (1.0 - float(u @ u)))) / quad)
    return ratio


def interior_point(
    a: np.ndarray, s2: float, tol: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(boost, w, gap)`` from the primal-dual interior point; warns if ``gap > tol``."""
    k = a.shape[0]
    uniform = np.full(k, 1.0 / k)
    norms = np.sqrt(np.maximum(np.diag(a), 0.0))
    unit = np.where(norms > 0, norms, 1.0)  # Jacobi scaling: any mix of norms is safe
    unit_coords = _span_coordinates(a / np.outer(unit, unit))
    coords = unit_coords * norms  # M (m, K): a_i·a_j = A_ij
    b = coords.T @ coords.mean(axis=1)  # g_i · g0
    s = float(np.sqrt(s2))
    m = coords.shape[0]
    x = np.concatenate((np.zeros(m), [b.min() - 1.0], uniform, [1.0]))  # (u, t, mult)
    best_u, best_t, best_w, best_f = x[:m], -np.inf, uniform, np.inf
    for it in range(max_iter + 1):
        u, mult = x[:m], x[m + 1 :]
        margins = b + s * (u @ coords)  # g_i · d for d = g0 + s u
        w = mult[:k] / mult[:k].sum()
        dual = float(b @ w) + s * float(np.linalg.norm(coords @ w))  # F(w) >= max-min value
        if dual < best_f:
            best_w, best_f = w, dual
        if margins.min() > best_t:
            best_u, best_t = u, float(margins.min())
        if best_f - best_t <= tol or it == max_iter:
            break
        slack = np.append(margins - x[m], 1.0 - float(u @ u))
        try:
            dirs = _newton_pair(coords, s, x, slack)
        except np.linalg.LinAlgError:
            break
        z = np.concatenate((mult, slack))
        mu = float(slack @ mult) / (k + 1)
        step_aff = _max_step(z, dirs[m + 1 :, 0], u, dirs[:m, 0])
        z_aff = z + step_aff * dirs[m + 1 :, 0]
        sigma = max((float(z_aff[: k + 1] @ z_aff[k + 1 :]) / (k + 1) / mu) ** 3, SIGMA_MIN)
        step = dirs[:, 0] + sigma * mu * dirs[:, 1]
        x = x + 0.99 * _max_step(z, step[m + 1 :], u, step[:m]) * step[: m + k + 2]
    gap = best_f - best_t
    if not gap <= tol:
        logger.warning(
            "CAGrad: the inner solver stopped at duality gap %.3g > tol %.3g (K=%d); using its "
            "best iterate, whose worst task improvement is never below the mean gradient's",
            gap,
            tol,
            k,
        )
    # coefficients of s u: the least-norm y with unit_coords y = u, rescaled by the norms
    y = unit_coords.T @ np.linalg.solve(unit_coords @ unit_coords.T, best_u)
    return s * y / unit, best_w, gap
