"""MoCo: stochastic multi-objective gradient correction.

Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023. MGDA's weights computed
from a noisy batch give a biased direction; MoCo tracks each task gradient with a moving
average and moves the weights by one projected-gradient step per update instead of solving
the min-norm problem from scratch. At step t = 1, 2, ...

    u_i = L_i g_i / ||g_i||                  (normalize=True, default; u_i = g_i with False)
    y_i <- y_i - β_t (y_i - u_i),            y_i = 0 at the start,   β_t = β / t^σ_β
    λ   <- Π_Δ(λ - γ_t (Y Yᵀ + ρ I) λ),       λ = 1/K at the start,   γ_t = γ / t^σ_γ
    d   = Yᵀ λ = Σ_i λ_i y_i,

Y the K×P matrix of the y_i and Π_Δ the Euclidean projection onto the simplex (sort-based,
:func:`~taskbalance.aggregation._simplex.project_simplex`). With β = 1 (no tracking) and
many steps λ is projected gradient descent on ``λᵀ(G + ρI)λ``: MGDA's min-norm weights.

Three reference codes differ; the defaults β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5, ρ = 0 are
LibMTL's (``MoCo_*``, "based on the authors' code"). The others: the authors' LibMTL fork
(``Tracking``, their Office-31/Home runs) projects λ onto the simplex, steps with the exact
gradient ``2 YYᵀλ`` (its γ is half of this γ), tracks raw gradients, β = 0.1, γ = 0.1,
σ = 0.5; their NYU-v2/Cityscapes code (CAGrad-based) uses a softmax for λ, tracks
``L_i g_i/||g_i||`` (NYU script: β = 0.99, γ = 0.1, σ = 0) and decays per epoch. Here:

* the targets ``u_i = L_i g_i/||g_i||`` of LibMTL and the NYU script (``normalize=False``:
  the raw ``g_i`` of the Office code and of the formula above). A zero gradient gives
  ``u_i = 0`` exactly (the codes divide by ``||g_i|| + 1e-8``), so the update does not
  depend on the gradients' scale at all (refused under a GradScaler, like Nash-MTL). A
  negative loss would reverse the gradient and raises
  :class:`~taskbalance.errors.NonPositiveLossError` naming the task; 0 is allowed.
* λ projected onto the simplex (Π_Δ, as the paper and the Office code). LibMTL and the NYU
  code apply a softmax to ``λ - γ_t(...)`` instead: not a step on the simplex (λ, in
  [0, 1], carries at most a factor e from one step to the next), whose fixed points are not
  MGDA's weights (the convergence test fails with it).
* t counts steps from 1 (LibMTL and the Office code); y is not projected onto a bounded
  set (no code does).

``needs = "jacobian"``, exact mode only, for DB-MTL's reasons: Y is K×P state (in J's dtype
and device), updated into a spare buffer and committed only once the result is finite; in
the features mode the rows of J belong to one batch's examples and cannot be averaged
across batches. Under DDP the engine averages J first, so Y is the same on every rank.

Recorded weights ``w_i = λ_i L_i / ||g_i||`` (0 for a zero gradient; ``λ_i`` with
``normalize=False``): with β = 1 the update is exactly ``Σ_i w_i g_i``; with β < 1 it also
carries the tracked history, so ``d != wᵀJ``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._simplex import project_simplex
from taskbalance.aggregation.base import GradientBalancer, spare_buffer
from taskbalance.balancer import Tasks
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, NonPositiveLossError
from taskbalance.gradients import gramian
from taskbalance.registry import register


def gradient_scales(norms: Tensor, losses: Tensor) -> Tensor:
    """``L_i / ||g_i||`` (0 where the gradient is zero): the factor giving ``u_i``."""
    return torch.where(norms > 0, losses / torch.where(norms > 0, norms, 1.0), 0.0)


def lambda_step(lam: Tensor, gram: Tensor, gamma: float, rho: float) -> Tensor:
    """``Π_Δ(λ - γ (G + ρ I) λ)`` (float64, on λ's device) for a finite ``(K, K)`` G."""
    g = gram.detach().double().cpu().numpy()
    v = lam.detach().double().cpu().numpy()
    step = v - gamma * (g @ v + rho * v)
    return torch.as_tensor(project_simplex(step), dtype=torch.float64, device=lam.device)


@register("moco")
class MoCo(GradientBalancer):
    """MoCo (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        beta: tracking rate β in (0, 1] (1: no tracking; default 0.5).
        beta_sigma: decay σ_β >= 0 of ``β_t = β / t^σ_β`` (default 0.5).
        gamma: step γ > 0 of λ (default 0.1).
        gamma_sigma: decay σ_γ >= 0 of ``γ_t = γ / t^σ_γ`` (default 0.5).
        rho: ridge ρ >= 0 of λ's objective (default 0).
        normalize: track ``L_i g_i / ||g_i||`` (default, as both codes) or ``g_i``.
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    needs = "jacobian"
    modes = ("exact",)
    guards_state = False  # the K×P state is committed only once the result is finite

    def __init__(
        self,
        tasks: Tasks,
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not gamma > 0.0 or not np.isfinite(gamma):
            raise ValueError(f"gamma must be positive and finite, got {gamma}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not 0.0 <= value < float("inf"):
                raise ValueError(f"{name} must be non-negative and finite, got {value}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.normalize = bool(normalize)
        self.t = 0
        self.y: Tensor | None = None
        self.lam = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        self._spare: Tensor | None = None  # storage reused for the next Y (not state)

    def _scales(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """Per-task factors of this step's targets ``u_i = s_i g_i`` (checks J and L)."""
        norms = jacobian.norm(dim=1)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteGradientError(
                f"the gradient of task {self.tasks[bad]!r} is not finite (norm "
                f"{float(norms[bad])}); MoCo cannot track it",
                task=self.tasks[bad],
            )
        if not self.normalize:
            return torch.ones_like(norms)
        negative = losses < 0
        if bool(negative.any()):
            bad = int(negative.nonzero()[0])
            raise NonPositiveLossError(
                self.tasks[bad],
                float(losses[bad]),
                "MoCo with normalize=True (it scales g_i to norm L_i, so a loss below 0 would "
                "reverse it; 0 is allowed; pass normalize=False for such losses)",
            )
        return gradient_scales(norms, losses.to(norms.dtype))

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        y = self.y
        if y is not None and y.shape != jacobian.shape:
            raise BalancerUsageError(
                f"MoCo tracks gradients of shape {tuple(y.shape)}, but this step's are "
                f"{tuple(jacobian.shape)}: the shared parameters changed"
            )
        scales = self._scales(jacobian, losses)
        t = self.t + 1
        beta_t = self.beta / float(t) ** self.beta_sigma
        gamma_t = self.gamma / float(t) ** self.gamma_sigma
        # Y_new = (1 - β_t) Y + β_t u, written into the spare buffer; Y stays intact
        new = spare_buffer(self._spare, jacobian)
        torch.mul(jacobian, (beta_t * scales).unsqueeze(1), out=new)
        if y is not None and beta_t < 1.0:
            new.add_(y.to(new), alpha=1.0 - beta_t)
        gram = gramian(new).double()
        if not bool(torch.isfinite(gram).all()):
            self._spare = new
            raise NonFiniteGradientError(
                "MoCo: the Gramian of the tracked gradients overflows (gradients too large "
                "for J's dtype); nothing was changed"
            )
        lam = lambda_step(self.lam, gram, gamma_t, self.rho)
        direction = lam.to(new) @ new
        weights = lam.to(scales) * scales
        if bool(torch.isfinite(direction).all()):
            self._spare, self.y, self.lam, self.t = y, new, lam, t
        else:
            self._spare = new
        return direction, weights

    def method_state(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "y": None if self.y is None else self.y.clone(),
            "lam": self.lam.clone(),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        y = state["y"]
        self.y = None if y is None else y.clone()
        self.lam = state["lam"].to(torch.float64).clone()
        self._spare = None
