"""IMTL: Impartial Multi-Task Learning (gradient balance, loss balance, or both).

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021.

* **IMTL-G** (gradient balance): ``d = Σ_i α_i g_i`` with ``Σ α_i = 1`` has equal projections
  on all unit gradients ``u_i = g_i / ||g_i||``. With the rows ``D = [g_1 - g_i]_{i>=2}`` and
  ``U = [u_1 - u_i]_{i>=2}``: ``α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹``, ``α_1 = 1 - Σ_{i>=2} α_i``; every
  product is an entry of G (``g_i·u_j = G_ij / sqrt(G_jj)``). The weights may be negative.
  Fallback (K=1 aside: α = 1), when ``D Uᵀ`` is singular (duplicated, zero or dependent
  gradients) or the result fails the equal-projection check, with a warning: the
  pseudo-inverse generalisation of Quinton & Rey (2024, torchjd), ``α ∝ N⁻¹ Ĝ⁺ 1`` with
  ``Ĝ = N⁻¹GN⁻¹``, ``N = diag ||g_i||`` (eigenvalues below ``K eps_float32 λ_max`` count as
  zero; zero gradients get weight 0) — the least-squares solution of ``Gα ∝ (||g_i||)_i``.
  If its sum vanishes (only ``d = 0`` balances the tasks), α is the null vector ``(I-G⁺G)1``
  of G, rescaled to sum 1; as a last resort ``1/K``.
* **IMTL-L** (loss balance): learnable ``s_i`` (init 0), scaled losses ``e^{s_i} L_i - s_i``;
  stationarity in ``s_i`` gives ``e^{s_i} L_i = 1`` for every task. The balancer steps ``s``
  with its own Adam (weight decay 0; see :mod:`taskbalance.learnable`). ``"imtl_l"``
  (:class:`IMTLL`) is the loss-only method for ``loss = balancer(losses)``.
* **hybrid** (the paper's full IMTL, Alg. 1): IMTL-G on the scaled gradients ``e^{s_i} g_i``;
  the weights of the raw losses are ``w_i = α_i e^{s_i}``, and ``s`` is stepped as in IMTL-L.

Task-specific parameters follow the engine's ``task_specific=`` rule; the paper updates them
with the scaled losses ``e^{s_i} L_i``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Balancer, Losses, Tasks, with_reference
from taskbalance.errors import BalancerUsageError
from taskbalance.gradients import autocast_disabled
from taskbalance.learnable import OptimizerMode, OwnedParameters
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def _balanced(g: np.ndarray, n: np.ndarray, alpha: np.ndarray, tol: float = 1e-8) -> bool:
    """Do the projections ``d·u_i`` agree (non-zero gradients) and does ``Σα`` equal 1?"""
    if not np.isfinite(alpha).all() or abs(alpha.sum() - 1.0) > 1e-9:
        return False
    proj = (g @ alpha)[n > 0] / n[n > 0]
    spread = float(proj.max() - proj.min()) if proj.size else 0.0
    return spread <= tol * float(n @ np.abs(alpha))


def imtl_g_weights(gramian: Tensor) -> Tensor:
    """IMTL-G weights ``α`` ``(K,)`` (float64, summing to 1) from the Gramian (module docs)."""
    g = gramian.detach().cpu().double().numpy()
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    n = np.sqrt(np.clip(np.diag(g), 0.0, None))
    alpha = np.full(k, np.nan)
    if k > 1 and (n > 0).all():
        gu = g / n[None, :]  # gu[i, j] = g_i · u_j
        du = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]  # (D Uᵀ)
        try:
            rest = np.linalg.solve(du.T, gu[0, 0] - gu[0, 1:])
            alpha = np.concatenate([[1.0 - rest.sum()], rest])
        except np.linalg.LinAlgError:
            pass
    if k > 1 and not _balanced(g, n, alpha):
        logger.warning("IMTL-G: D Uᵀ is singular or ill-conditioned; using the pseudo-inverse")
        safe = np.where(n > 0, n, 1.0)
        rcond = k * float(np.finfo(np.float32).eps)  # G is rarely known better than float32
        hat = g / np.outer(safe, safe)
        y = np.linalg.pinv(hat, rcond=rcond) @ (n > 0).astype(float)
        alpha = y / safe
        if not abs(alpha.sum()) > 1e-9 * np.abs(alpha).sum():
            null = np.eye(k) - np.linalg.pinv(g, rcond=rcond) @ g
            alpha = null @ np.ones(k)
            if not abs(alpha.sum()) > 1e-6 * k:
                logger.warning("IMTL-G: no balancing combination; using uniform weights")
                alpha = np.ones(k)
        alpha = alpha / alpha.sum()
    if k == 1:
        alpha = np.ones(1)
    return torch.as_tensor(alpha, dtype=torch.float64, device=gramian.device)


class _Scales:
    """The learnable ``s_i`` of IMTL-L and the rule that steps them."""

    learnable: OwnedParameters | None = None

    def _init_scales(self, k: int, optimizer: OptimizerMode, lr: float) -> None:
        zeros = {"s": torch.zeros(k)}
        self.learnable = OwnedParameters(type(self).__name__, zeros, optimizer=optimizer, lr=lr)

    @property
    def log_scales(self) -> torch.nn.Parameter:
        """The learnable ``s_i``; the loss scales are ``exp(s_i)``."""
        if self.learnable is None:
            raise AttributeError("IMTL(variant='g') has no learnable loss scales")
        return self.learnable["s"]

    def method_state(self) -> dict[str, Any]:
        return {} if self.learnable is None else self.learnable.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        if self.learnable is not None:
            self.learnable.load_state_dict(state)


@register("imtl")
class IMTL(_Scales, GradientBalancer):
    """IMTL with ``variant="g"`` (default), ``"l"`` or ``"hybrid"`` (module docstring)."""

    def __init__(
        self,
        tasks: Tasks,
        variant: Literal["g", "l", "hybrid"] = "g",
        optimizer: OptimizerMode = "own",
        lr: float = 1e-3,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if variant not in ("g", "l", "hybrid"):
            raise ValueError(f"variant must be 'g', 'l' or 'hybrid', got {variant!r}")
        self.variant = variant
        if variant != "g":
            m = self.tasks_per_step
            if m is not None and m < self.num_tasks:
                raise BalancerUsageError(
                    f"IMTL(variant={variant!r}) does not take tasks_per_step={m} < "
                    f"K={self.num_tasks}: its learnable loss scales are stepped on all K "
                    "losses every step. Use variant='g' (IMTL-G takes it) or leave "
                    "tasks_per_step out"
                )
            self._init_scales(self.num_tasks, optimizer, lr)
        self._pending: Tensor | None = None

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.learnable is None:
            return imtl_g_weights(gramian)
        self.learnable.to(gramian.device)
        scale = torch.exp(self.log_scales.detach()).to(gramian)
        self._pending = losses.detach()
        if self.variant == "l":
            return scale
        return imtl_g_weights(gramian * scale[:, None] * scale[None, :]) * scale

    def backward(
        self, losses: Losses, shared: Any = None, features: Any = None, **context: Any
    ) -> Tensor | None:
        """The engine's step, then (variants ``l`` and ``hybrid``) one step of ``s``.

        Both run with autocast disabled for the losses' device type.
        """
        if self.learnable is not None:
            self.learnable.check_ready()
        self._pending = None
        losses, reference = with_reference(losses)
        with autocast_disabled(reference):
            weights = super().backward(losses, shared, features, **context)
            if weights is not None and self._pending is not None:
                s = self.log_scales
                objective = (torch.exp(s) * self._pending.to(s) - s).sum()
                scale = self.micro_scale()  # under accumulation: s steps once, on the mean
                (objective if scale is None else objective * scale).backward()
        self._pending = None
        return weights


@register("imtl_l")
class IMTLL(_Scales, Balancer):
    """IMTL-L alone: ``loss = Σ_i e^{s_i} L_i - s_i`` with learnable ``s`` (module docstring)."""

    def __init__(
        self, tasks: Tasks, optimizer: OptimizerMode = "own", lr: float = 1e-3, **kw: Any
    ) -> None:
        super().__init__(tasks, **kw)
        self._init_scales(self.num_tasks, optimizer, lr)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        assert self.learnable is not None
        self.learnable.check_ready()
        self.learnable.to(losses.device)
        return torch.exp(self.log_scales.detach()).to(losses.dtype)

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        s = self.log_scales.to(losses.dtype)
        return (torch.exp(s) * losses - s).sum()
