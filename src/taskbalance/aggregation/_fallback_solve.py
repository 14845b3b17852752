"""The fallback chain shared by the methods that solve a nonlinear system on the Gramian
(Nash-MTL's ``G α = 1/α``, FairGrad's ``G w = w^(−1/α)``).

The system is solved on the normalised Gramian ``G / ‖G‖`` (warm-started from the previous
solution) and the solution is rescaled; when that fails the chain tries, in order and never
silently (each step that falls back is logged and counted on the balancer):

1. the regularised system on ``G / ‖G‖ + ridge · I`` (cold start);
2. the previous step's weights;
3. equal weights (no previous step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger("taskbalance")


def solve_with_fallbacks(
    balancer: Any,
    G: np.ndarray,
    prev: np.ndarray | None,
    scale_of: Callable[[float], float],
    label: str,
    equation: str,
) -> Tensor:
    """Weights (float64) solving the balancer's system on ``G``, by the chain above.

    ``balancer`` provides ``_try(G, warm) -> ndarray | None`` (the solve on a normalised
    Gramian), ``ridge``, ``tol``, ``max_iter``, ``steps``, ``num_tasks`` and the counters
    ``fallbacks`` / ``last_fallback`` (updated here). A solution ``x`` of the normalised
    system is rescaled to ``x · scale_of(‖G‖)``; the warm start is ``prev / scale_of(‖G‖)``.
    """
    n = float(np.linalg.norm(G))
    ok = bool(np.isfinite(n) and n > 0)
    scale = scale_of(n) if ok else 1.0
    used = None
    with np.errstate(all="ignore"):
        x = balancer._try(G / n, None if prev is None else prev / scale) if ok else None
        if x is None and ok:
            used = "the regularised solve (G/||G|| + ridge*I)"
            x = balancer._try(G / n + balancer.ridge * np.eye(G.shape[0]), None)
    if x is not None:
        weights = torch.from_numpy(x * scale)
    elif prev is not None:
        used, weights = "the previous weights", torch.from_numpy(prev.copy())
    else:
        used, weights = "equal weights", torch.ones(balancer.num_tasks, dtype=torch.float64)
    balancer.last_fallback = used
    if used is not None:
        balancer.fallbacks += 1
        why = (
            "the Gramian is zero or not finite"
            if not ok
            else f"residual above tol={balancer.tol} within max_iter={balancer.max_iter}; "
            "there is no solution when a convex combination of the task gradients is zero"
        )
        logger.warning(
            "%s: step %d: %s not solved (%s); using %s (fallback %d)",
            label,
            balancer.steps,
            equation,
            why,
            used,
            balancer.fallbacks,
        )
    return weights
