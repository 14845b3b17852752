"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023 (official code OptMN-Lab/sdmgrad). The update stays near the
mean gradient ``g0 = (1/K) Σ_i g_i`` while avoiding conflicts, through weights ``w`` on the
simplex Δ that solve the inner problem

    min_{w ∈ Δ}  ½ || g_w + λ g0 ||²,    g_w = Σ_i w_i g_i,     d = (g_w + λ g0) / (1 + λ),

approximately, by ``niter`` projected gradient steps ``w ← Π_Δ(w − lr (G w + λ G 1/K))``
started from the previous step's w (uniform at the start; w is state). λ = 0 is MGDA (the
min-norm point, when the inner steps converge), λ → ∞ the mean gradient. Only the Gramian
is needed: ``d = Σ_i ((w_i + λ/K) / (1 + λ)) g_i``.

Defaults from the authors' code: λ = 0.3 (their NYUv2 and Cityscapes runs; 0.6 on
Meta-World), ``niter = 20`` steps of SGD with ``lr = 10`` and ``momentum = 0.5`` (the
momentum buffer starts afresh every step; ``momentum = 0`` is the paper's plain projected
step), on the Gramian divided by ``(mean_i ||g_i||)²`` so that the step size does not depend
on the gradients' scale (the code adds 1e-4 to every ``||g_i||²`` first, which for small
gradients makes the steps vanish; left out here). ``reduction="sum"`` multiplies d by K as
their supervised code does ("to match the sum loss"); the default ``"mean"`` is the
paper's d.

The paper's double sampling (the inner steps use gradients from two more independent
mini-batches) needs three batches per step; ``backward`` sees one, so the inner problem uses
this batch's Gramian, as the authors' Meta-World code does. With all gradients zero, d = 0
and w is kept.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation._simplex import project_simplex
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

Reduction = Literal["mean", "sum"]


def sdmgrad_inner(
    gramian: np.ndarray, w: np.ndarray, lam: float, niter: int, lr: float, momentum: float
) -> np.ndarray:
    """``niter`` projected SGD steps on ``½||g_w + λ g0||²`` over the simplex from ``w``.

    The objective's gradient is ``Ĝ w + λ Ĝ 1/K`` with ``Ĝ = G / (mean_i ||g_i||)²``. Returns
    ``w`` unchanged when every gradient is zero.
    """
    g = 0.5 * (gramian + gramian.T)
    scale = float(np.sqrt(np.clip(np.diag(g), 0.0, None)).mean())
    if not scale > 0:
        return w.copy()
    g = g / (scale * scale)
    target = lam * g.mean(axis=1)
    buf = None
    for _ in range(niter):
        step = g @ w + target
        buf = step if buf is None else momentum * buf + step
        w = project_simplex(w - lr * buf)
    return w


def sdmgrad_weights(w: np.ndarray, lam: float) -> np.ndarray:
    """The weights of ``d = (g_w + λ g0) / (1 + λ)`` on the task gradients."""
    return (w + lam / w.shape[0]) / (1.0 + lam)


@register("sdmgrad")
class SDMGrad(GradientBalancer):
    """SDMGrad (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        lam: the regularisation λ >= 0 (default 0.3; ``float("inf")``: the mean gradient).
        niter: inner projected-gradient steps per training step (default 20).
        lr: inner step size on the normalised Gramian (default 10).
        momentum: inner SGD momentum in [0, 1) (default 0.5; 0 is the paper's plain step).
        reduction: ``"mean"`` (paper's d) or ``"sum"`` (d times K, the authors' code).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    tasks_per_step_refusal = (
        "its weights w are an iterate carried across steps (with momentum) over all K tasks; "
        "for sampling use SDMGrad-OS (tb.make('sdmgrad_os', tasks, n=m))"
    )

    def __init__(
        self,
        tasks: Tasks,
        *,
        lam: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        reduction: Reduction = "mean",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0 (or float('inf') for the mean gradient), got {lam}")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"niter must be a non-negative int, got {niter!r}")
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.lam, self.niter, self.lr = float(lam), niter, float(lr)
        self.momentum, self.reduction = float(momentum), reduction
        self.w = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)

    def solve(self, gramian: Tensor) -> np.ndarray:
        """Advance w on ``gramian`` (K×K, float64); return the task weights (NumPy)."""
        g = gramian.detach().cpu().double().numpy()
        k = g.shape[0]
        if np.isinf(self.lam):
            return np.full(k, 1.0 / k) * (k if self.reduction == "sum" else 1.0)
        w = sdmgrad_inner(g, self.w.numpy(), self.lam, self.niter, self.lr, self.momentum)
        self.w = torch.from_numpy(w)
        weights = sdmgrad_weights(w, self.lam)
        return weights * k if self.reduction == "sum" else weights

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return torch.from_numpy(self.solve(gramian)).to(gramian.device, gramian.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"w": self.w.clone()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.w = state["w"].detach().to(torch.float64).clone()
