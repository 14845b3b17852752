"""The synthetic regression problem of GradNorm (Chen et al., ICML 2018, §4).

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018. T regression tasks with squared loss,
``f_i(x) = σ_i tanh((B + ε_i) x)``, x in R^250, f_i in R^100, B and ε_i fixed matrices with
entries ~ N(0, 10²) and N(0, 3.5²); trunk of 4 fully connected ReLU layers of 100 units,
one 100→100 linear head per task; GradNorm with α = 0.12 on the last trunk layer's weight,
weights renormalised to Σ w_i = T. T = 2 uses σ = (1, 100); for T = 10 the paper only says
"a wide normal distribution": we use σ = (48, 3, 54, 16, 9, 30, 52, 26, 47, 81) of a public
PyTorch reimplementation. Metric (paper, Fig. 2): Σ_i L_i(t) / L_i(0).

Choices the paper leaves open (documented, not tuned to the result):

* x ~ U(−1, 1)^250 rescaled to unit L2 norm, as the public Chainer reimplementation (and its
  PyTorch port). Then each entry of (B + ε_i) x is ~ N(0, 10² + 3.5²): tanh is still
  saturated for ~85 % of outputs, so the targets are mostly σ_i · sign(·) with a smooth zone
  near the hyperplanes. Without the rescaling the arguments have std ≈ 97 and the targets are
  pure signs.
* B, ε_i, the data stream, the held-out set and the initialisation all depend on the seed.
* Batch 100 drawn fresh each step; Adam lr 1e-4 for the network (public reimplementations).
* GradNorm's weights: their own Adam with lr 5e-4 (the top of the public 1e-4..5e-4 range,
  since we run fewer steps than their 25k; Adam moves a weight by at most ~lr per step).
* Uncertainty weighting (optional): the library default (``exp(-s) L + s``, own Adam 1e-3).
* The metric is measured on a held-out set of 1000 points (L_i(0): the initial network).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn

from taskbalance.aggregation.gradnorm import GradNorm
from taskbalance.registry import make

SIGMAS_2 = (1.0, 100.0)
SIGMAS_10 = (48.0, 3.0, 54.0, 16.0, 9.0, 30.0, 52.0, 26.0, 47.0, 81.0)
IN_DIM, OUT_DIM, HIDDEN = 250, 100, 100
METHODS = ("equal", "gradnorm", "uncertainty")


@dataclass(frozen=True)
class Problem:
    """``sigmas`` ``(T,)`` and the fixed maps ``B + ε_i`` stacked as ``maps`` ``(T, 100, 250)``."""

    sigmas: Tensor
    maps: Tensor
    unit_norm: bool = True

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``x`` ``(n, 250)`` (unit-norm rows of U(−1, 1)) and targets ``y`` ``(n, T, 100)``."""
        x = torch.rand(n, IN_DIM, generator=generator) * 2 - 1
        if self.unit_norm:
            x = x / x.norm(dim=1, keepdim=True)
        y = self.sigmas[:, None] * torch.tanh(torch.einsum("toi,ni->nto", self.maps, x))
        return x, y


def make_problem(
    sigmas: Sequence[float] = SIGMAS_10, seed: int = 0, unit_norm: bool = True
) -> Problem:
    """B ~ N(0, 10²) and ε_i ~ N(0, 3.5²) of shape ``(100, 250)``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    b = 10.0 * torch.randn(OUT_DIM, IN_DIM, generator=g)
    eps = 3.5 * torch.randn(len(sigmas), OUT_DIM, IN_DIM, generator=g)
    return Problem(torch.tensor(sigmas, dtype=torch.float32), b + eps, unit_norm)


class ToyNet(nn.Module):
    """4 ReLU layers of 100 units (the trunk) and one 100→100 linear head per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        dims = (IN_DIM, HIDDEN, HIDDEN, HIDDEN, HIDDEN)
        layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, OUT_DIM) for _ in range(num_tasks))

    @property
    def last_shared(self) -> Tensor:
        """W of GradNorm: the weight of the last trunk layer."""
        return self.trunk[-2].weight

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def _losses(net: ToyNet, x: Tensor, y: Tensor) -> list[Tensor]:
    return [nn.functional.mse_loss(out, y[:, i]) for i, out in enumerate(net(x))]


def train_one(
    method: str, sigmas: Sequence[float], seed: int, steps: int, eval_every: int,
    alpha: float = 0.12, lr: float = 1e-4, weight_lr: float = 5e-4, batch_size: int = 100,
    n_eval: int = 1000, unit_norm: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Train one method on one seed; return the held-out ``L_i(t)/L_i(0)`` ``(E, T)`` at
    steps ``0, eval_every, ...`` and the weights in use at those steps ``(E, T)``."""
    problem = make_problem(sigmas, seed, unit_norm)
    x_eval, y_eval = problem.sample(n_eval, torch.Generator().manual_seed(10_000 + seed))
    stream = torch.Generator().manual_seed(20_000 + seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyNet(len(sigmas))
    tasks = len(sigmas)
    if method == "gradnorm":
        bal = GradNorm(tasks, alpha=alpha, lr=weight_lr, record=False)
    elif method == "uncertainty":
        bal = make("uncertainty", tasks=tasks, record=False)
    else:
        bal = make(method, tasks=tasks, record=False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    ratios, weights, initial = [], [], None
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                held_out = torch.stack(_losses(net, x_eval, y_eval)).double()
            initial = held_out if initial is None else initial
            ratios.append(held_out / initial)
            w = bal.last_weights
            weights.append(torch.ones(tasks) if w is None else w.double().clone())
        if step == steps:
            break
        x, y = problem.sample(batch_size, stream)
        losses = _losses(net, x, y)
        opt.zero_grad(set_to_none=True)
        if method == "gradnorm":
            bal.backward(losses, last_shared=net.last_shared)
        else:
            bal.backward(losses)
        opt.step()
    return torch.stack(ratios), torch.stack(weights).double()
