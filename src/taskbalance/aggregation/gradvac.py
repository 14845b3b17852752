"""Gradient Vaccine (GradVac).

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1 (whole-model
granularity). Like PCGrad, every ``g_i`` is corrected on its own, visiting the other
tasks j in a random order; with ``φ_ij = cos(g_i^PC, g_j)`` (g_j the ORIGINAL gradient)
and an EMA target ``φ̂_ij`` (initialised to 0), when ``φ_ij < φ̂_ij``

    g_i^PC <- g_i^PC + ||g_i^PC|| (φ̂_ij sqrt(1 - φ_ij²) - φ_ij sqrt(1 - φ̂_ij²))
                                   / (||g_j|| sqrt(1 - φ̂_ij²)) · g_j,

which makes ``cos(g_i^PC, g_j) = φ̂_ij`` exactly; then ``φ̂_ij <- (1 - β) φ̂_ij + β φ_ij``.
The update is ``d = sum_i g_i^PC`` (``reduction="mean"``: divided by K). With targets 0
and β = 0 this is exactly PCGrad.

* β (``beta``): the paper's default is 1e-2 (a slow EMA of the observed cosines); LibMTL
  and torchjd default to 0.5. ``ema="always"`` (default) updates the target for every
  visited pair, as in the paper's algorithm; ``ema="adjusted"`` only when the pair was
  adjusted, as in LibMTL.
* Everything runs in coefficient space from the Gramian (``g_i^PC = sum_k C_ik g_k``),
  weights = column sums of C; rows run in parallel. A step keeps the part of g_i^PC
  orthogonal to g_j, so ``||g_i^PC||`` becomes ``||g_i^PC|| sin φ_ij / sin φ̂_ij``.
* A pair with a zero gradient has no cosine: it is neither adjusted nor averaged. A target
  of exactly 1 cannot be reached by a finite step; it is capped at ``1 - 1e-12``.
* Orders and seeds as in :class:`~taskbalance.aggregation.pcgrad.PCGrad`; the targets
  (K×K float64) and the generator state are part of ``state_dict()``.
* The paper works on parameter gradients (``shared=``). The features mode is allowed too,
  but its targets then average cosines of gradients w.r.t. each batch's features.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.aggregation.pcgrad import Order, Reduction, pair_index, visiting_orders
from taskbalance.balancer import Tasks
from taskbalance.registry import register

Ema = Literal["always", "adjusted"]
MAX_TARGET = 1.0 - 1e-12


def _visit(
    g: np.ndarray, cols: np.ndarray, at: np.ndarray, old: np.ndarray, checked: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(C entries, cos, adjusted, valid)`` of the pairs, laid out like ``at``, or ``None``
    if unchecked and some g_i^PC became exactly zero: then rerun checked, to skip its pairs."""
    k = g.shape[0]
    norms = np.sqrt(np.maximum(g.diagonal()[:, None], 0.0))
    nonzero = norms > 0.0
    valid, scale = nonzero[cols] & nonzero, np.where(nonzero, norms, 1.0)
    tgt = np.minimum(old, MAX_TARGET)  # a target below -1 is never reached: not clipped
    sin_t = np.sqrt(1.0 - tgt * tgt)
    # adjust iff cos < bar: the test clip(cos) < target on the unclipped cosine
    bar = np.where(valid & (old > -1.0), np.where(old > 1.0, np.inf, old), -np.inf)
    coef_g = np.divide(g, scale.T, out=np.empty((k, k)))  # (C G)_ik / ||g_k||
    flat, g_j = coef_g.reshape(-1), np.take(coef_g / scale, cols, axis=0)
    one, zero, norm_i = np.ones((k, 1)), np.zeros((k, 1)), norms.copy()
    cos, steps, adjust = np.empty(old.shape), np.zeros(old.shape), np.empty(old.shape, bool)
    pairs = zip(at, cos, adjust, valid, bar, steps, tgt / sin_t, sin_t, g_j)
    for at_s, c, adj, ok, b, step, cot_t, st, gj in pairs:
        dot = flat.take(at_s)  # g_i^PC · g_j / ||g_j||
        np.less(np.divide(dot, norm_i, out=c), b, out=adj)
        if checked:
            adj &= np.logical_and(ok, norm_i > 0.0, out=ok)
        perp = norm_i * np.sqrt(np.maximum(one - c * c, zero))  # ||g_i^PC|| sin φ_ij
        np.copyto(step, perp * cot_t - dot, where=adj)  # the step times ||g_j||
        coef_g += step * gj
        np.copyto(norm_i, perp / st, where=adj)
    if not checked and np.count_nonzero(norm_i) < np.count_nonzero(norms):
        return None
    return steps / scale[cols], np.minimum(np.maximum(cos, -1.0), 1.0), adjust, valid


def gradvac_coefficients(
    gramian: np.ndarray, targets: np.ndarray, orders: np.ndarray, beta: float, ema: Ema = "always"
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(C, new_targets)``: ``g_i^PC = sum_k C_ik g_k`` and the updated φ̂ (K×K).

    Each pair is visited once: its target is gathered before the loop, its results after."""
    g = 0.5 * (gramian + gramian.T)
    cols, at = pair_index(orders)
    old = targets.reshape(-1)[at]
    with np.errstate(divide="ignore", invalid="ignore"):  # only in pairs that are masked out
        visited = _visit(g, cols, at, old, False) or _visit(g, cols, at, old, True)
        steps, cos, adjust, valid = visited
        update = valid if ema == "always" else adjust
        ema_targets = np.where(update, (1.0 - beta) * old + beta * cos, old)
    coef, new = np.eye(len(g)), targets.copy()
    coef.reshape(-1)[at] = steps
    new.reshape(-1)[at] = ema_targets
    return coef, new


@register("gradvac")
class GradVac(GradientBalancer):
    """Gradient Vaccine; see the module docstring.

    Args:
        tasks: number of tasks or their names.
        beta: EMA rate of the targets (paper: 1e-2; LibMTL/torchjd: 0.5).
        seed: seed of the balancer's own generator (visiting orders).
        order: ``"random"`` (paper), ``"shared"`` or ``"fixed"``; see PCGrad.
        reduction: ``"sum"`` (paper) or ``"mean"`` of the corrected gradients.
        ema: ``"always"`` (paper) or ``"adjusted"`` (LibMTL) target updates.
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    tasks_per_step_refusal = (
        "its cosine targets are EMAs per pair of tasks, which a subset step would update "
        "only for the sampled pairs"
    )

    def __init__(
        self,
        tasks: Tasks,
        *,
        beta: float = 0.01,
        seed: int = 0,
        order: Order = "random",
        reduction: Reduction = "sum",
        ema: Ema = "always",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if order not in ("random", "shared", "fixed"):
            raise ValueError(f"order must be 'random', 'shared' or 'fixed', got {order!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if ema not in ("always", "adjusted"):
            raise ValueError(f"ema must be 'always' or 'adjusted', got {ema!r}")
        self.beta = float(beta)
        self.order: Order = order
        self.reduction: Reduction = reduction
        self.ema: Ema = ema
        self.generator = torch.Generator().manual_seed(int(seed))
        self.targets = torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = self.num_tasks
        orders = visiting_orders(k, self.order, self.generator)
        coef, targets = gradvac_coefficients(
            gramian.detach().cpu().numpy(), self.targets.numpy(), orders, self.beta, self.ema
        )
        self.targets = torch.from_numpy(targets)
        weights = coef.sum(axis=0) / (k if self.reduction == "mean" else 1)
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"targets": self.targets.clone(), "generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.targets = state["targets"].to(torch.float64).clone()
        self.generator.set_state(state["generator"])
