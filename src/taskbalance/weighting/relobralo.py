"""ReLoBRaLo: Relative Loss Balancing with Random Lookback.

Bischof & Kraus, "Multi-Objective Loss Balancing for Physics-Informed Deep Learning",
arXiv:2110.09813, 2021. With the relative balance of the losses between two steps

    λ̂_i(t' → t) = K exp(L_i(t) / (T L_i(t'))) / Σ_j exp(L_j(t) / (T L_j(t'))),

the weights are

    λ_i(t) = α (ρ λ_i(t-1) + (1 - ρ) λ̂_i(0 → t)) + (1 - α) λ̂_i(t-1 → t),

ρ ~ Bernoulli(E[ρ]) drawn afresh every step: with probability 1 - E[ρ] the history is
replaced by the balance against the first step's losses (the "random lookback"). A loss
that falls slower than the others, relative to its own past, gets the larger weight, and
the weights do not depend on the losses' scales. Every λ̂ sums to K, so λ(t) does too.

Defaults: α = 0.999, E[ρ] = 0.99, T = 0.1, those of the first author's published
reference implementation. The first step has no history: ``λ(0) = 1`` (equal weights), and
its losses become L(0). ``start="paper"`` (default) applies the formula from the second
step on; ``start="code"`` follows that reference implementation, whose second step takes
α = 0 and ρ = 1 (``λ(1) = λ̂(0 → 1)``, no draw) before the formula applies.

ρ comes from the balancer's own seeded generator (``seed=``, independent of torch's global
one), whose state is part of ``state_dict()``: a resumed run draws what an uninterrupted
one would; under DDP every rank takes rank 0's generator at the first synchronised step
and the losses are averaged over the ranks, so all ranks have the same weights.
``lookbacks`` counts the steps with ρ = 0. The ratios need strictly positive losses: a zero
or negative loss raises :class:`~taskbalance.errors.NonPositiveLossError` naming the task,
and the refused step leaves no trace (nothing stored, no draw).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import NonPositiveLossError
from taskbalance.registry import register


def relative_balance(losses: Tensor, reference: Tensor, temperature: float) -> Tensor:
    """``λ̂ = K softmax(L / (T L_ref))`` for positive ``(K,)`` losses and reference losses."""
    return losses.numel() * torch.softmax(losses / (temperature * reference), dim=0)


def relobralo_weights(
    losses: Tensor,
    previous: Tensor,
    initial: Tensor,
    last_weights: Tensor,
    alpha: float,
    rho: float,
    temperature: float,
) -> Tensor:
    """``α (ρ λ(t-1) + (1-ρ) λ̂(0→t)) + (1-α) λ̂(t-1→t)``, all ``(K,)``."""
    history = rho * last_weights + (1 - rho) * relative_balance(losses, initial, temperature)
    return alpha * history + (1 - alpha) * relative_balance(losses, previous, temperature)


def _unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


@register("relobralo")
class ReLoBRaLo(Balancer):
    """ReLoBRaLo (Bischof & Kraus 2021): λ = α (ρ λ(t-1) + (1-ρ) λ̂(0→t)) + (1-α) λ̂(t-1→t).

    See the module docstring for the formula, the defaults, the first steps and the draws.
    """

    def __init__(
        self,
        tasks: Tasks,
        alpha: float = 0.999,
        expected_rho: float = 0.99,
        temperature: float = 0.1,
        seed: int = 0,
        start: Literal["paper", "code"] = "paper",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        self.alpha = _unit_interval("alpha", alpha)
        self.expected_rho = _unit_interval("expected_rho", expected_rho)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        if start not in ("paper", "code"):
            raise ValueError(f"start must be 'paper' or 'code', got {start!r}")
        self.temperature = float(temperature)
        self.start = start
        self.generator = torch.Generator().manual_seed(int(seed))
        self._initial: Tensor | None = None  # L(0), float64
        self._previous: Tensor | None = None  # L(t-1), float64
        self._lambdas: Tensor | None = None  # λ(t-1), float64
        self._calls = 0  # steps taken (the first two are special with start="code")
        self.lookbacks = 0

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        current = losses.detach().double()
        for task, value in zip(self.tasks, current.tolist()):
            if not value > 0:
                raise NonPositiveLossError(task, value, "ReLoBRaLo (loss ratios)")
        if self._initial is None or self._previous is None or self._lambdas is None:
            weights = torch.ones_like(current)
            self._initial = current
        elif self.start == "code" and self._calls == 1:
            weights = relative_balance(current, self._previous, self.temperature)
        else:
            u = torch.rand((), generator=self.generator, dtype=torch.float64)
            rho = 1.0 if float(u) < self.expected_rho else 0.0
            self.lookbacks += int(rho == 0.0)
            weights = relobralo_weights(
                current,
                self._previous,
                self._initial,
                self._lambdas,
                self.alpha,
                rho,
                self.temperature,
            )
        self._previous, self._lambdas = current, weights
        self._calls += 1
        return weights.to(losses.dtype)

    def method_state(self) -> dict[str, Any]:
        return {
            "initial": self._initial,
            "previous": self._previous,
            "lambdas": self._lambdas,
            "calls": self._calls,
            "lookbacks": self.lookbacks,
            "generator": self.generator.get_state(),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._initial = state["initial"]
        self._previous = state["previous"]
        self._lambdas = state["lambdas"]
        self._calls = int(state["calls"])
        self.lookbacks = int(state["lookbacks"])
        self.generator.set_state(state["generator"])
