"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, Algorithm 1. Every task gradient is corrected on its own, starting from
``g_i^PC = g_i``; the other tasks j are visited in a random order and, whenever
``g_i^PC · g_j < 0``, the conflicting component is removed with the ORIGINAL ``g_j``:

    g_i^PC <- g_i^PC - (g_i^PC · g_j / ||g_j||^2) g_j,        update d = sum_i g_i^PC

(``reduction="mean"`` divides d by K). Each ``g_i^PC`` is a linear combination of the
original gradients, ``g_i^PC = sum_k C_ik g_k``, so the whole surgery runs on the K×K
coefficient matrix C with Gramian inner products (``g_i^PC · g_j = (C G)_ij``), and the
update is ``d = wᵀJ`` with ``w_k = sum_i C_ik`` (column sums): the method never touches J.

Visiting orders (``order=``): ``"random"`` (default; an independent random order of the
other tasks for every i, as in the paper's algorithm), ``"shared"`` (one random
permutation per step for all i, as in the authors' code, which shuffles the task list
once) or ``"fixed"`` (index order; deterministic). The draws come from the balancer's own
seeded generator, saved in ``state_dict()``, so a resumed run is bit-exact.

Guarantees: for K = 2 the projected gradients never conflict with the other task
(``g_1^PC · g_2 >= 0``, ``g_2^PC · g_1 >= 0``); in general ``g_i^PC`` does not conflict
with the last task in its order, and ``||g_i^PC|| <= ||g_i||``. A zero ``g_j`` is skipped.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register

Order = Literal["random", "shared", "fixed"]
Reduction = Literal["sum", "mean"]


def visiting_orders(k: int, order: Order, generator: torch.Generator) -> np.ndarray:
    """``(K, K-1)`` int array: row i lists the tasks j != i in the order task i visits them."""
    if order == "fixed":
        keys = np.tile(np.arange(k, dtype=np.float64), (k, 1))
    elif order == "random":
        keys = torch.rand(k, k, generator=generator, dtype=torch.float64).numpy()
    elif order == "shared":
        keys = np.tile(torch.rand(k, generator=generator, dtype=torch.float64).numpy(), (k, 1))
    else:
        raise ValueError(f"order must be 'random', 'shared' or 'fixed', got {order!r}")
    np.fill_diagonal(keys, np.inf)  # task i itself sorts last and is cut off
    return np.argsort(keys, axis=1, kind="stable")[:, : k - 1]


def pcgrad_coefficients(gramian: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Coefficients C ``(K, K)`` with ``g_i^PC = sum_k C_ik g_k`` (rows run in parallel)."""
    g = 0.5 * (gramian + gramian.T)
    k = g.shape[0]
    coef = np.eye(k)
    rows = np.arange(k)
    sq_norms = np.diag(g)
    for step in range(orders.shape[1]):
        j = orders[:, step]
        dots = np.einsum("ik,ik->i", coef, g[j])  # g_i^PC · g_j  (G symmetric)
        norm_j = sq_norms[j]
        conflict = (dots < 0.0) & (norm_j > 0.0)
        coef[rows, j] -= np.where(conflict, dots / np.where(norm_j > 0.0, norm_j, 1.0), 0.0)
    return coef


@register("pcgrad")
class PCGrad(GradientBalancer):
    """PCGrad (gradient surgery); see the module docstring.

    Args:
        tasks: number of tasks or their names.
        seed: seed of the balancer's own generator (visiting orders).
        order: ``"random"`` (paper), ``"shared"`` (authors' code) or ``"fixed"``.
        reduction: ``"sum"`` of the projected gradients (paper) or their ``"mean"``.
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    def __init__(
        self,
        tasks: Tasks,
        *,
        seed: int = 0,
        order: Order = "random",
        reduction: Reduction = "sum",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if order not in ("random", "shared", "fixed"):
            raise ValueError(f"order must be 'random', 'shared' or 'fixed', got {order!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.order: Order = order
        self.reduction: Reduction = reduction
        self.generator = torch.Generator().manual_seed(int(seed))

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = self.num_tasks
        orders = visiting_orders(k, self.order, self.generator)
        weights = pcgrad_coefficients(gramian.detach().cpu().numpy(), orders).sum(axis=0)
        if self.reduction == "mean":
            weights = weights / k
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)

    def method_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
