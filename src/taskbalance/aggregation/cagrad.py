"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021. The update maximises the worst task improvement in a ball around the mean
gradient ``g0 = (1/K) sum_i g_i``:

    max_d min_i g_i · d   s.t.  ||d - g0|| <= c ||g0||,

solved through its dual over the simplex (``g_w = sum_i w_i g_i``, ``s = c ||g0||``):

    w* = argmin_{w in simplex}  g_wᵀ g0 + s ||g_w||,       d = g0 + (s / ||g_w*||) g_w*.

So ``d = sum_i (1/K + λ w*_i) g_i`` with ``λ = s / ||g_w*||``: only the Gramian is needed
(``g_wᵀ g0 = wᵀ G 1 / K``, ``||g_w||² = wᵀ G w``). ``c = 0`` is the mean gradient exactly.
``c`` defaults to 0.4, the paper's value for its image benchmarks (it uses 0.5 on the
two-objective toy). The official code divides d by ``1 + c²`` (its ``rescale=1`` default);
``rescale="1+c^2"`` does that, ``"1+c"`` its other option; the default ``"none"`` keeps the
paper's d, for which the conflict-averse property ``min_i g_i·d >= min_i g_i·g0`` holds.

Solver: the primal problem is a small second-order-cone program in the span of the
gradients. With ``G/mean(diag G) = MᵀM`` (eigendecomposition; directions with eigenvalue
below 1e-8 λ_max, the rounding level of a float32 Gramian, are dropped) it reads
``max_{||u|| <= 1} min_i (b_i + s a_i·u)`` (``a_i`` = columns of M, ``b = G 1/K``) and is
solved by a primal-dual interior-point method in NumPy float64; its multipliers of the K
linear constraints are the dual weights w. The iterate is always feasible, so the returned
``d = g0 + s u`` is always in the ball; the solve stops when the duality gap
``F(w) - min_i g_i·d`` (F the dual objective) is below ``tol`` (relative to the mean
``||g_i||²``), which certifies ``min_i g_i·d >= max-min optimum - tol``. Unlike the dual
form it has no kink at ``g_w = 0`` (gradients whose convex hull contains 0). If the gap is
not reached in ``max_iter`` iterations, or a linear solve fails, the best iterate is used
(its worst task improvement is never below the mean gradient's) and a warning is logged on
the ``taskbalance`` logger. The result is never NaN.
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
RANK_TOL = 1e-8  #: eigenvalues below RANK_TOL * λ_max of the normalised Gramian are dropped
SIGMA_MIN = 0.1  #: lower bound of the centring parameter (the plain Mehrotra one oscillates)


def _newton(state: tuple, comp: np.ndarray, comp0: float) -> tuple:
    """Newton step of the perturbed KKT system for complementarity targets ``comp, comp0``."""
    inv, coords, s, u, y, eta, slack, ball, res_u, res_t = state
    rhs = np.append(s * (coords @ (comp / slack)) - res_u - 2.0 * u * (comp0 / ball), 0.0)
    rhs[-1] = -res_t - (comp / slack).sum()
    dx = inv @ rhs
    du, dt = dx[:-1], dx[-1]
    d_slack, d_ball = s * (du @ coords) - dt, -2.0 * float(u @ du)
    return du, dt, (comp - y * d_slack) / slack, (comp0 - eta * d_ball) / ball, d_slack, d_ball


def _max_step(state: tuple, du: np.ndarray, dy: np.ndarray, deta: float, d_slack) -> float:
    """Largest step in [0, 1] keeping slacks, multipliers and ``1 - ||u||²`` non-negative."""
    _, _, _, u, y, eta, slack, ball, _, _ = state
    ratio = 1.0
    for v, dv in ((slack, d_slack), (y, dy)):
        neg = dv < 0
        if neg.any():
            ratio = min(ratio, float(np.min(-v[neg] / dv[neg])))
    if deta < 0:
        ratio = min(ratio, -eta / deta)
    quad, lin = float(du @ du), float(u @ du)
    if quad > 0:
        ratio = min(ratio, (-lin + np.sqrt(lin * lin + quad * ball)) / quad)
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
    eigval, eigvec = np.linalg.eigh(0.5 * (gramian + gramian.T) / scale)
    keep = eigval > RANK_TOL * eigval[-1]
    root = np.sqrt(eigval[keep])
    coords, back = (eigvec[:, keep] * root).T, eigvec[:, keep] / root  # M (m, K), M⁺ (K, m)
    b = coords.T @ coords.mean(axis=1)
    s = c * float(np.sqrt(max(b.mean(), 0.0)))
    m = coords.shape[0]
    u, t, y, eta = np.zeros(m), float(b.min()) - 1.0, uniform.copy(), 1.0
    best_u, best_t, best_w, best_f = u, -np.inf, uniform, np.inf
    for it in range(max_iter + 1):
        margins = b + s * (u @ coords)
        slack, ball = margins - t, 1.0 - float(u @ u)
        w = y / y.sum()
        dual = float(b @ w) + s * float(np.linalg.norm(coords @ w))
        if dual < best_f:
            best_w, best_f = w, dual
        if margins.min() > best_t:
            best_u, best_t = u, float(margins.min())
        if best_f - best_t <= tol or it == max_iter:
            break
        ratio = y / slack
        weighted = coords * ratio
        system = np.empty((m + 1, m + 1))
        system[:m, :m] = (s * s) * weighted @ coords.T + (4.0 * eta / ball) * np.outer(u, u)
        system[np.arange(m), np.arange(m)] += 2.0 * eta
        system[:m, m] = system[m, :m] = -s * weighted.sum(axis=1)
        system[m, m] = ratio.sum()
        try:
            inv = np.linalg.inv(system)
        except np.linalg.LinAlgError:
            break
        res_u, res_t = 2.0 * eta * u - s * (coords @ y), float(y.sum()) - 1.0
        state = (inv, coords, s, u, y, eta, slack, ball, res_u, res_t)
        mu = (float(y @ slack) + eta * ball) / (k + 1)
        du, _, dy, deta, d_slack, d_ball = _newton(state, -y * slack, -eta * ball)
        a = _max_step(state, du, dy, deta, d_slack)
        mu_aff = float((y + a * dy) @ (slack + a * d_slack)) + (eta + a * deta) * (
            ball + a * d_ball
        )
        sigma = max((mu_aff / (k + 1) / mu) ** 3, SIGMA_MIN)
        du, dt, dy, deta, d_slack, _ = _newton(
            state, sigma * mu - y * slack, sigma * mu - eta * ball
        )
        a = 0.99 * _max_step(state, du, dy, deta, d_slack)
        u, t, y, eta = u + a * du, t + a * dt, y + a * dy, eta + a * deta
    gap = best_f - best_t
    if not gap <= tol:
        logger.warning(
            "CAGrad: the inner solver stopped at duality gap %.3g > tol %.3g (K=%d); using its "
            "best iterate, whose worst task improvement is never below the mean gradient's",
            gap,
            tol,
            k,
        )
    return s * (back @ best_u), best_w, gap


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
        if not c >= 0.0:
            raise ValueError(f"c must be non-negative, got {c}")
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
