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
    keys.reshape(-1)[:: k + 1] = np.inf  # task i itself sorts last and is cut off
    return np.argsort(keys, axis=1, kind="stable")[:, : k - 1]


def pair_index(orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step-major pairs: ``[s, i]`` is ``(i, orders[i, s])``. Returns the visited tasks
    ``(K-1, K)`` and the pairs' flat indices into a K×K array ``(K-1, K, 1)``."""
    k, cols = len(orders), orders.T.astype(np.intp, copy=False)
    return cols, (cols + np.arange(0, k * k, k))[:, :, None]


def pcgrad_coefficients(gramian: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Coefficients C ``(K, K)`` with ``g_i^PC = sum_k C_ik g_k`` (rows run in parallel).

    Pair (i, j) is visited once, at step s: its step is computed into ``steps[s, i]`` and
    scattered into C after the loop. The loop keeps C G (``g_i^PC · g_k`` for every k).
    """
    g = 0.5 * (gramian + gramian.T)
    k = g.shape[0]
    cols, at = pair_index(orders)
    sq_j = g.diagonal()[cols][:, :, None]
    minus_sq_j = np.where(sq_j > 0.0, -sq_j, -np.inf)  # a zero g_j gives a zero step
    coef_g = g.copy()
    flat, zero, steps = coef_g.reshape(-1), np.zeros((k, 1)), np.empty(at.shape)
    for at_s, step, minus_sq, g_j in zip(at, steps, minus_sq_j, np.take(g, cols, axis=0)):
        # -min(g_i^PC · g_j, 0) / ||g_j||²: nonzero for a conflict only
        np.divide(np.minimum(flat.take(at_s), zero), minus_sq, out=step)
        coef_g += step * g_j
    coef = np.eye(k)
    coef.reshape(-1)[at] += steps
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

    @property
    def weights_per_task(self) -> bool:  # type: ignore[override]
        """``reduction="sum"``: each weight is about one (tasks_per_step's K/m applies)."""
        return self.reduction == "sum"

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
