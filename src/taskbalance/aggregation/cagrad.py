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

Solver (NumPy float64): the primal ``max_{||u|| <= 1} min_i (g_i·g0 + s a_i·u)`` in the span
of the gradients (``a_i`` = coordinates of g_i from a pivoted Cholesky factor of the
Jacobi-scaled Gramian, so norms from 1e-6 to 1e6 mix safely; a unit gradient within 1e-6 of
the span of the others adds no dimension), solved by a primal-dual interior-point method
(Mehrotra's centring, kept >= 0.1) whose multipliers are the dual weights w.
Unlike the dual it has no kink where 0 is in the convex hull of the gradients, and its
iterate ``d = g0 + s u`` is always in the ball. It stops when the duality gap
``F(w) - min_i g_i·d`` is at most ``tol`` (relative to the mean ``||g_i||²``), certifying
that d is within tol of the max-min optimum. Otherwise (``max_iter`` iterations, or a
singular system) it logs a warning on the ``taskbalance`` logger and keeps its best iterate,
whose worst task improvement is never below the mean gradient's. Never NaN.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")
Rescale = Literal["none", "1+c^2", "1+c"]
RANK_TOL = 1e-12  #: residual squared norm (of a unit gradient) below which it is dropped
SIGMA_MIN = 0.1  #: lower bound of the centring parameter (the plain Mehrotra one oscillates)


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


def cagrad_solve(
    gramian: np.ndarray, c: float, *, tol: float = 1e-8, max_iter: int = 50
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return ``(boost, w, gap)``: the update is ``d = sum_i (1/K + boost_i) g_i``.

    ``w`` are the dual (simplex) weights and ``gap`` the certified duality gap, in units of
    the mean ``||g_i||²``.
    """
    k = gramian.shape[0]
    scale = float(np.mean(np.diag(gramian)))
    uniform = np.full(k, 1.0 / k)
    if c == 0.0 or not scale > 0.0 or not np.isfinite(gramian).all():
        return np.zeros(k), uniform, 0.0
    norms = np.sqrt(np.maximum(np.diag(gramian), 0.0))
    unit = np.where(norms > 0, norms, 1.0)  # Jacobi scaling: any mix of norms is safe
    unit_coords = _span_coordinates(0.5 * (gramian + gramian.T) / np.outer(unit, unit))
    coords = unit_coords * (norms / np.sqrt(scale))  # M (m, K): a_i·a_j = G_ij / scale
    b = coords.T @ coords.mean(axis=1)  # g_i · g0
    s = c * float(np.sqrt(max(b.mean(), 0.0)))  # c ||g0||
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
        a = _max_step(z, dirs[m + 1 :, 0], u, dirs[:m, 0])
        z_aff = z + a * dirs[m + 1 :, 0]
        sigma = max((float(z_aff[: k + 1] @ z_aff[k + 1 :]) / (k + 1) / mu) ** 3, SIGMA_MIN)
        step = dirs[:, 0] + sigma * mu * dirs[:, 1]
        a = 0.99 * _max_step(z, step[m + 1 :], u, step[:m])
        x = x + a * step[: m + k + 2]
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
    return s * np.sqrt(scale) * y / unit, best_w, gap


def cagrad_weights(
    gramian: np.ndarray, c: float = 0.4, rescale: Rescale = "none", **solver: Any
) -> np.ndarray:
    """Task weights ``(K,)``: ``d = sum_i w_i g_i`` is the CAGrad update."""
    k = gramian.shape[0]
    boost, _, _ = cagrad_solve(gramian, c, **solver)
    divisor = {"none": 1.0, "1+c^2": 1.0 + c * c, "1+c": 1.0 + c}[rescale]
    return (1.0 / k + boost) / divisor


@register("cagrad")
class CAGrad(GradientBalancer):
    """Conflict-averse gradient descent; see the module docstring.

    Args:
        tasks: number of tasks or their names.
        c: radius of the ball around g0, relative to ``||g0||`` (default 0.4; ``c >= 0``).
        rescale: ``"none"`` (paper), ``"1+c^2"`` (official code's default) or ``"1+c"``.
        tol: duality-gap tolerance of the inner solve, relative to mean ``||g_i||²``.
        max_iter: interior-point iterations before the fallback.
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

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights = cagrad_weights(
            gramian.detach().cpu().numpy(),
            self.c,
            self.rescale,
            tol=self.tol,
            max_iter=self.max_iter,
        )
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)
