"""Small numerical helpers shared by the gradient methods (K×K problems, NumPy float64)."""

from __future__ import annotations

import numpy as np


def project_simplex(v: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Euclidean projection of ``v`` (K,) onto ``{w >= 0, sum(w) = total}``.

    The sort-based algorithm of Held, Wolfe and Crowder (1974), O(K log K).
    """
    k = v.shape[0]
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u) - total
    idx = np.arange(1, k + 1)
    rho = np.nonzero(u - cssv / idx > 0)[0][-1]
    theta = cssv[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)
