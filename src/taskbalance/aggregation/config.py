"""ConFIG: conflict-free inverse gradients.

Liu, Chen, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025 (Eq. 2; official code tum-pbs/ConFIG, ``conflictfree``). With the unit
gradients ``u_i = g_i / ||g_i||`` as the rows of U and positive direction weights ŵ (the
paper's ``1_m``, default ones; ``pref_vector=`` sets others):

    x = U⁺ ŵ,    g_u = x / ||x||,    d = (Σ_i g_i·g_u) g_u.

If U has full row rank, ``U x = ŵ``: ``cos(g_i, d) ∝ ŵ_i`` (equal cosines by default), every
task has a positive projection ``g_i·d`` (no conflict), and ``||d||`` is the sum of the
projections of the g_i on ``g_u`` (the paper's adaptive length).

From the Gramian (no pass over J). ``U = N⁻¹J`` with ``N = diag ||g_i||``, so
``U⁺ŵ = Uᵀ(UUᵀ)⁺ŵ = Jᵀv`` with ``v = N⁻¹ Ĝ⁺ ŵ`` and ``Ĝ = N⁻¹GN⁻¹`` (the cosines). Then
``||x||² = vᵀGv`` and ``Σ_i g_i·x = 1ᵀGv``, so ``d = wᵀJ`` with ``w = (1ᵀGv / vᵀGv) v``.

Conventions (each degenerate case is logged as a warning on the ``taskbalance`` logger and
counted in :attr:`ConFIG.degenerate_steps`, the reason in ``last_degenerate``):

* ``Ĝ⁺`` drops eigenvalues at or below ``rank_tol · λ_max`` (default ``K · eps_float32``, as
  IMTL-G and Aligned-MTL here: G is rarely known better than float32). Ĝ's eigenvalues are
  the squared singular values of U (the route through G squares U's condition number), so
  unit rows with ``σ_min/σ_max`` below about ``sqrt(K · eps_float32)`` (3e-4·√K; two
  gradients within ~0.06°) count as dependent; float64 gradients can take
  ``rank_tol=1e-15``. torchjd 0.18 calls ``torch.linalg.pinv(U)``, whose cut-off is on U's
  singular values (``P · eps`` of U's dtype: for P = 1e6 in float32 that is 0.12 σ_max, two
  gradients within ~14°); the official code uses ``torch.linalg.lstsq``. All agree when U
  has full row rank, and on dependent gradients with ŵ in U's range (duplicates: exact).
  Otherwise (ŵ outside the range: opposite gradients, K > rank) ``U x`` is only the least
  squares fit of ŵ: the cosines are no longer equal — logged.
* A zero gradient is a zero row of U (the official ``nan_to_num``): the task gets weight 0
  and the direction is that of the other tasks — logged.
* ŵ with no part in the range of Ĝ (the fitted cosines are all below 1e-6 of ŵ: exactly
  opposite gradients, all gradients zero; no direction helps every task) means ``x = 0`` and
  gives ``d = 0`` (weights 0; torchjd normalises the zero vector to zero) — logged.
* The misfit of the cosines counts as exact up to 1e-6 of ``max ŵ``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation import _linalg as linalg
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")

_EPS32 = float(np.finfo(np.float32).eps)
_COSINE_TOL = 1e-6  #: largest |cos-fit − ŵ| (relative to max ŵ) that counts as exact


def config_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    rank_tol: float | None = None,
    names: Sequence[str] | None = None,
) -> tuple[Tensor, list[str]]:
    """ConFIG weights ``w`` ``(K,)`` (float64) with ``d = wᵀJ``, and the degenerate cases met
    (empty if the cosine property holds), as in the module docstring; ``names`` name the
    tasks in the messages."""
    g = gramian.detach().cpu().double().numpy()
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    p = np.ones(k) if pref is None else pref.detach().cpu().double().numpy()
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    live = norms > 0
    issues = []
    if not live.all():
        dead = [names[i] if names else str(i) for i in np.flatnonzero(~live)]
        issues.append(f"zero gradient of task(s) {dead}: weight 0, direction from the others")
    safe = np.where(live, norms, 1.0)
    hat = g / np.outer(safe, safe) * np.outer(live, live)
    hat[np.diag_indices(k)] = live.astype(float)  # unit rows: cosine 1 with themselves
    target = p * live
    # Ĝ is symmetric: its pseudo-inverse from its eigenpairs (|λ| are its singular values)
    lam, vec = linalg.eigh(hat)
    size = np.abs(lam)
    tol = (k * _EPS32 if rank_tol is None else rank_tol) * (size.max() if size.size else 0.0)
    keep = size > tol
    y = vec[:, keep] @ ((vec[:, keep].T @ target) / lam[keep])  # Ĝ⁺ ŵ
    fit = (hat @ y)[live]  # the cosines U x, a least-squares fit of ŵ
    v = y / safe * live
    gv = g @ v
    sq_norm = float(v @ gv)
    if not live.any() or not np.abs(fit).max() > _COSINE_TOL * p.max() or not sq_norm > 0:
        if live.any():
            issues.append(
                "ŵ is orthogonal to every cosine pattern U x (e.g. opposite gradients): d = 0"
            )
        return torch.zeros(k, dtype=torch.float64, device=gramian.device), issues
    misfit = float(np.abs(fit - target[live]).max())
    if misfit > _COSINE_TOL * p.max():
        issues.append(f"rank-deficient: the cosines miss their targets by {misfit:.2e}")
    w = v * (float(gv.sum()) / sq_norm)
    return torch.as_tensor(w, dtype=torch.float64, device=gramian.device), issues


@register("config")
class ConFIG(GradientBalancer):
    """ConFIG (see the module docstring).

    Args:
        pref_vector: the K positive direction weights ŵ (default ones: equal cosines).
        rank_tol: relative eigenvalue cut-off of ``Ĝ⁺``; default ``K * eps_float32``.
    """

    weights_per_task = True  # d = (Σ_i g_i·x̂) x̂ grows with K (tasks_per_step)

    def __init__(
        self,
        tasks: Tasks,
        pref_vector: Sequence[float] | Tensor | None = None,
        rank_tol: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        self.pref = self.preference_vector(pref_vector)
        if self.pref is not None and not bool((self.pref > 0).all()):
            raise ValueError(
                "ConFIG's pref_vector must be positive (it sets the ratios of the cosines "
                f"between d and the task gradients), got {self.pref.tolist()}; leave it out "
                "for equal cosines"
            )
        if rank_tol is not None and not rank_tol >= 0:
            raise ValueError(f"rank_tol must be >= 0 (or None for K * eps_float32), got {rank_tol}")
        self.rank_tol = rank_tol
        self.degenerate_steps = 0
        self.last_degenerate: str | None = None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights, issues = config_weights(gramian, self.pref, self.rank_tol, self.tasks)
        issue = "; ".join(issues) if issues else None
        self.last_degenerate = issue
        if issue is not None:
            self.degenerate_steps += 1
            logger.warning(
                "ConFIG: step %d: %s (degenerate step %d)", self.steps, issue, self.degenerate_steps
            )
        return weights

    def method_state(self) -> dict[str, Any]:
        return {"degenerate_steps": self.degenerate_steps}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.degenerate_steps = int(state["degenerate_steps"])
