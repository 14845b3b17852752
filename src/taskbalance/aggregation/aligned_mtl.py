"""Aligned-MTL: align the task gradients into an orthogonal system of equal norms.

Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (Algorithm 1; official code SamsungLabs/MTL, ``ProcrustesSolver``).
With the eigendecomposition ``G = V Λ Vᵀ`` of the Gramian, keeping the R eigenvalues above
``tol = λ_max · K · eps_float32`` (the official tolerance),

    B = σ V_R Λ_R^{-1/2} V_Rᵀ,    σ = sqrt(λ_min,R)  (``scale_mode="min"``, default;
                                   "median": sqrt of the lower median, "rmse": sqrt(mean λ)),
    Ĵ = Bᵀ J  (the aligned gradients ĝ_i, rows),    w = B p,    d = wᵀJ = Σ_i p_i ĝ_i.

The aligned system is the closest (orthogonal Procrustes) to J with condition number 1: for
full-rank G, ``Ĵ Ĵᵀ = Bᵀ G B = σ² I`` — the aligned gradients are orthogonal with equal norms
σ, the smallest singular value of J. For rank R < K, ``Ĵ Ĵᵀ = σ² V_R V_Rᵀ``: every non-zero
singular value of Ĵ equals σ. ``p`` is the preference vector: ones (``Σ_i ĝ_i``) in the
official code, the default here; torchjd uses ``1/K``. With ``features=`` this is the paper's
Aligned-MTL-UB. All-zero gradients (R = 0, where LibMTL's version fails on an empty
eigenvalue list) give ``w = p`` (B = I, as torchjd), logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation import _linalg as linalg
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")

ScaleMode = Literal["min", "median", "rmse"]
_EPS32 = float(np.finfo(np.float32).eps)


def balance_transformation(
    gramian: Tensor, scale_mode: str = "min", rank_tol: float | None = None
) -> Tensor:
    """The balance matrix ``B`` ``(K, K)`` (float64) of the module docstring."""
    g = gramian.detach().cpu().double().numpy()
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    lam, vec = linalg.eigh(g)  # through torch's thread pool, not NumPy's (see _linalg)
    tol = lam.max() * k * _EPS32 if rank_tol is None else rank_tol * max(lam.max(), 0.0)
    keep = lam > max(tol, 0.0)
    if not keep.any():
        logger.warning("Aligned-MTL: every task gradient is zero; using B = I")
        return torch.eye(k, dtype=torch.float64, device=gramian.device)
    lam, vec = lam[keep], vec[:, keep]
    if scale_mode == "min":
        sigma2 = lam.min()
    elif scale_mode == "median":
        sigma2 = np.sort(lam)[(lam.size - 1) // 2]
    elif scale_mode == "rmse":
        sigma2 = lam.mean()
    else:
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    b = np.sqrt(sigma2) * (vec / np.sqrt(lam)) @ vec.T
    return torch.as_tensor(b, dtype=torch.float64, device=gramian.device)


def aligned_mtl_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    scale_mode: str = "min",
    rank_tol: float | None = None,
) -> Tensor:
    """Aligned-MTL weights ``w = B p`` ``(K,)`` (float64)."""
    b = balance_transformation(gramian, scale_mode, rank_tol)
    p = torch.ones(b.shape[0], dtype=b.dtype, device=b.device) if pref is None else pref.to(b)
    return b @ p


@register("aligned_mtl", "alignedmtl")
class AlignedMTL(GradientBalancer):
    """Aligned-MTL (see the module docstring).

    Args:
        pref_vector: the K task preferences p (default ones, as the official code).
        scale_mode: ``"min"`` (paper, default), ``"median"`` or ``"rmse"``.
        rank_tol: relative eigenvalue cut-off; default ``K * eps_float32`` (official).
    """

    weights_per_task = True  # w = B p, p = ones: a sum over the tasks (tasks_per_step)

    def __init__(
        self,
        tasks: Tasks,
        pref_vector: Sequence[float] | Tensor | None = None,
        scale_mode: ScaleMode = "min",
        rank_tol: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        if rank_tol is not None and not rank_tol >= 0:
            raise ValueError(f"rank_tol must be >= 0, got {rank_tol}")
        self.pref = self.preference_vector(pref_vector)
        self.scale_mode = scale_mode
        self.rank_tol = rank_tol

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return aligned_mtl_weights(gramian, self.pref, self.scale_mode, self.rank_tol)
