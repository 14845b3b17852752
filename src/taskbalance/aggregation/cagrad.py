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

Solver: a primal-dual interior-point method (Mehrotra predictor-corrector) in NumPy
float64 on G normalised by its mean diagonal, with ``||g_w||`` smoothed to
``sqrt(||g_w||² + ε²)``, ε = 1e-4 · rms ||g_i|| (the official code adds 1e-8; the
smoothing bounds λ when 0 is (nearly) in the convex hull of the gradients and changes
nothing measurable otherwise). It stops on the Frank-Wolfe duality gap
``wᵀ∇F - min_i ∇F_i <= tol`` (a certificate: F(w) - F* <= gap). If that is not reached in
``max_iter`` iterations (in practice only for exactly Pareto-stationary gradients), a
warning is logged on the ``taskbalance`` logger and the best iterate is used if its gap is
below 1e-4, else the mean gradient (the ``c = 0`` update). The result is never NaN.
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
SMOOTHING = 1e-8  # ε² relative to the mean squared gradient norm
FALLBACK_GAP = 1e-4


def _newton(system: tuple, comp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Newton step of the KKT system with complementarity right-hand side ``comp``."""
    inv, inv_one, w, z, dual_res, primal_res = system
    a = inv @ (comp / w - dual_res)
    d_lam = (-primal_res - a.sum()) / inv_one.sum()
    d_w = a + d_lam * inv_one
    return d_w, (comp - z * d_w) / w, d_lam


def _max_step(v: np.ndarray, dv: np.ndarray) -> float:
    neg = dv < 0
    return min(1.0, float(np.min(-v[neg] / dv[neg]))) if neg.any() else 1.0


def cagrad_dual(
    gramian: np.ndarray, c: float, *, tol: float = 1e-8, max_iter: int = 50
) -> tuple[np.ndarray, float, float]:
    """Solve the dual on the normalised Gramian; return ``(w, λ, gap)`` (gap in those units)."""
    k = gramian.shape[0]
    scale = float(np.mean(np.diag(gramian)))
    w = np.full(k, 1.0 / k)
    if c == 0.0 or not scale > 0.0 or not np.isfinite(gramian).all():
        return w, 0.0, 0.0
    gn = 0.5 * (gramian + gramian.T) / scale
    b = gn.mean(axis=1)  # ∇ of g_wᵀ g0
    s = c * float(np.sqrt(max(b.mean(), 0.0)))
    z, lam, diag = np.ones(k), 0.0, np.diag_indices(k)
    best_w, best_gap = w, np.inf
    for it in range(max_iter + 1):
        gw = gn @ w
        r = float(np.sqrt(max(w @ gw, 0.0) + SMOOTHING))
        grad = b + (s / r) * gw
        gap = float(grad @ w - grad.min())
        if gap < best_gap:
            best_w, best_gap = w, gap
        if gap <= tol or it == max_iter:
            break
        if it == 0:
            lam = float(grad.min()) - 1.0
        hess = (s / r) * (gn - np.outer(gw, gw) / (r * r))
        hess[diag] += z / w
        try:
            inv = np.linalg.inv(hess)
        except np.linalg.LinAlgError:
            break
        system = (inv, inv.sum(axis=1), w, z, grad - z - lam, w.sum() - 1.0)
        mu = float(w @ z) / k
        d_w, d_z, _ = _newton(system, -w * z)
        a_w, a_z = _max_step(w, d_w), _max_step(z, d_z)
        sigma = (float((w + a_w * d_w) @ (z + a_z * d_z)) / k / mu) ** 3
        d_w, d_z, d_lam = _newton(system, sigma * mu - w * z - d_w * d_z)
        a_w, a_z = 0.99 * _max_step(w, d_w), 0.99 * _max_step(z, d_z)
        w, z, lam = w + a_w * d_w, z + a_z * d_z, lam + a_z * d_lam
    if best_gap > tol:
        use_best = best_gap <= FALLBACK_GAP
        logger.warning(
            "CAGrad: the inner solver stopped at duality gap %.3g > tol %.3g; using %s",
            best_gap,
            tol,
            "its best iterate" if use_best else "the mean gradient",
        )
        if not use_best:
            return np.full(k, 1.0 / k), 0.0, best_gap
    w = np.maximum(best_w, 0.0)
    w = w / w.sum()
    return w, s / float(np.sqrt(max(w @ gn @ w, 0.0) + SMOOTHING)), best_gap


def cagrad_weights(
    gramian: np.ndarray, c: float = 0.4, rescale: Rescale = "none", **solver: Any
) -> np.ndarray:
    """Task weights ``(K,)``: ``d = sum_i w_i g_i`` is the CAGrad update."""
    k = gramian.shape[0]
    w, lam, _ = cagrad_dual(gramian, c, **solver)
    weights = np.full(k, 1.0 / k) + lam * w
    divisor = {"none": 1.0, "1+c^2": 1.0 + c * c, "1+c": 1.0 + c}[rescale]
    return weights / divisor


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
