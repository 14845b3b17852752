"""SoftAdapt: weights from a softmax of the losses' recent rates of change.

Heydari, Thompson, Mehmood, "SoftAdapt: Techniques for Adaptive Loss Weighting of Neural
Networks with Multi-Part Loss Functions", arXiv:1912.12355, 2019. With the slope of every
loss over the last step, ``s_i = L_i(t) - L_i(t-1)``, the paper's three variants are
(``variant=``):

    "plain"          w_i = K exp(β s_i) / Σ_j exp(β s_j)
    "loss_weighted"  w_i = K f_i exp(β s_i) / Σ_j f_j exp(β s_j),   f_i = (L_i(t) + L_i(t-1)) / 2
    "normalized"     "plain" with ŝ_i = s_i / Σ_j |s_j| in place of s_i (scale-free slopes)

β > 0 gives the larger weight to the loss that rose (or fell least), β < 0 to the one that
falls fastest, β = 0 is equal weighting. Defaults: ``variant="plain"``, ``beta=0.1`` (the
authors' package). The weights of step t use L(t) itself (detached; it is known before the
backward pass); the first step has no slope and gives ``w_i = 1``.

Against the paper and the authors' package (``softadapt``):

* the paper's weights sum to 1; here they sum to K (multiply by 1/K for the paper's), so
  that no change in the losses gives ``w_i = 1``, equal weighting, as for DWA and ReLoBRaLo:
  a learning rate tuned for ``Σ L_i`` keeps its scale;
* the slope is the first-order difference between consecutive steps; the paper also
  allows higher-order finite differences over the last n values, and the package updates
  the weights every few epochs from epoch losses — not offered here;
* f_i is the mean of the loss values the slope is taken over, as in the package;
* "normalized" divides by Σ |s_j| (the package divides by the signed Σ s_j, which changes
  sign and diverges when the slopes cancel); when every slope is 0, ŝ = 0: equal weights.

The loss-weighted variant needs strictly positive losses (else
:class:`~taskbalance.errors.NonPositiveLossError` naming the task, and the step leaves no
trace); the others take any finite losses. Under DDP the losses are averaged over the ranks
before the weights are computed, so every rank has the same weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import NonPositiveLossError
from taskbalance.registry import register

Variant = Literal["plain", "loss_weighted", "normalized"]
VARIANTS: tuple[str, ...] = ("plain", "loss_weighted", "normalized")


def normalized_slopes(slopes: Tensor) -> Tensor:
    """``s / Σ |s|``, and 0 where every slope is 0."""
    total = slopes.abs().sum()
    return slopes / total if bool(total > 0) else torch.zeros_like(slopes)


def softadapt_weights(
    losses: Tensor, previous: Tensor, beta: float = 0.1, variant: Variant = "plain"
) -> Tensor:
    """SoftAdapt's weights ``(K,)``, summing to K, from this step's and the last step's losses."""
    slopes = losses - previous
    if variant == "normalized":
        slopes = normalized_slopes(slopes)
    logits = beta * slopes
    if variant == "loss_weighted":
        logits = logits + torch.log((losses + previous) / 2)  # f_i exp(β s_i), in log space
    return losses.numel() * torch.softmax(logits, dim=0)


@register("softadapt")
class SoftAdapt(Balancer):
    """SoftAdapt (Heydari et al. 2019): w = K softmax(β (L(t) - L(t-1))), and two variants.

    See the module docstring for the variants, the defaults and the conventions.
    """

    def __init__(
        self, tasks: Tasks, beta: float = 0.1, variant: Variant = "plain", **kw: Any
    ) -> None:
        super().__init__(tasks, **kw)
        if variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of 'plain', 'loss_weighted', 'normalized', got {variant!r}"
            )
        if not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta}")
        self.beta = float(beta)
        self.variant: Variant = variant
        self._previous: Tensor | None = None  # the last step's losses (float64)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        current = losses.detach().double()
        if self.variant == "loss_weighted":
            for task, value in zip(self.tasks, current.tolist()):
                if not value > 0:
                    raise NonPositiveLossError(task, value, "SoftAdapt (loss_weighted variant)")
        if self._previous is None:
            weights = torch.ones_like(current)
        else:
            weights = softadapt_weights(current, self._previous, self.beta, self.variant)
        self._previous = current
        return weights.to(losses.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"previous": self._previous}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._previous = state["previous"]
