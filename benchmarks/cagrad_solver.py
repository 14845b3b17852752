"""Time of CAGrad's weight computation alone, ``CAGrad.weights_from_gramian(G, losses)``.

Gramians (float64, K = 2, 10, 40):

* ``random``: ``G = J Jᵀ`` with ``J`` (K, 1000) standard normal, seeded with K, as in the
  ``solver`` section of ``benchmarks/speed.py`` (nearly orthogonal gradients of equal norm).
* ``structured``: a shared component plus task-specific noise, norms over a decade and about
  a fifth of the tasks conflicting with the rest (their gradients are flipped), P = 1000; the
  optimum then has a proper subset of the tasks as its support.

``cold``: the balancer has no state (first step, or the support forgotten before each call).
``warm``: two nearby Gramians (``J`` and ``J + 3% noise``) alternate, so every call starts
from the support found for the other one, as consecutive training steps would. ``old``: the
interior-point solver alone (the solver before the active-set pass, still the fallback),
with the same conversions around it. Every configuration is timed call by call, interleaved
over rounds; the median is printed (ms).

Usage: ``python benchmarks/cagrad_solver.py [--calls 400] [--rounds 5]``
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # small LAPACK calls: threads only add contention

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from taskbalance.aggregation._cagrad_solver import interior_point  # noqa: E402
from taskbalance.aggregation.cagrad import CAGrad, cagrad_solve  # noqa: E402

SIZES = (2, 10, 40)
P = 1000


def jacobians(kind: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two nearby Jacobians (K, P) of the given kind."""
    gen = torch.Generator().manual_seed(k)
    if kind == "random":
        jac = torch.randn(k, P, generator=gen, dtype=torch.float64)
    else:
        shared = torch.randn(1, P, generator=gen, dtype=torch.float64)
        mix = torch.rand(k, 1, generator=gen, dtype=torch.float64) * 1.5
        jac = mix * shared + torch.randn(k, P, generator=gen, dtype=torch.float64)
        flip = torch.rand(k, generator=gen) < 0.2
        flip[0] = k > 2  # at least one conflicting task (K = 2: none, the other case)
        jac[flip] *= -0.5
        jac *= 10.0 ** (torch.rand(k, 1, generator=gen, dtype=torch.float64) * 2 - 1)
    noise = torch.randn(k, P, generator=gen, dtype=torch.float64) * 0.03
    return jac, jac + noise * jac.norm(dim=1, keepdim=True) / P**0.5


def old_weights(gramian: torch.Tensor, c: float = 0.4) -> torch.Tensor:
    """The interior-point solver alone, wrapped as ``weights_from_gramian`` wraps it."""
    g = gramian.detach().cpu().numpy()
    k = g.shape[0]
    scale = float(np.mean(np.diag(g)))
    a = (g + g.T) * (0.5 / scale)
    boost, _, _ = interior_point(a, c * c * float(a.mean()), 1e-8, 50)
    return torch.from_numpy(1.0 / k + boost).to(gramian.dtype)


def timers(kind: str, k: int) -> dict[str, Callable[[], object]]:
    j1, j2 = jacobians(kind, k)
    g1, g2 = j1 @ j1.T, j2 @ j2.T
    losses = torch.ones(k, dtype=torch.float64)
    cold, warm = CAGrad(k), CAGrad(k)
    flip = [g1, g2]

    def run_cold() -> object:
        cold.support = None
        return cold.weights_from_gramian(g1, losses)

    def run_warm() -> object:
        flip.reverse()
        return warm.weights_from_gramian(flip[0], losses)

    run_warm()  # its first call is cold
    return {"cold": run_cold, "warm": run_warm, "old": lambda: old_weights(g1)}


def check(kind: str, k: int) -> str:
    """Agreement of the new and old updates, and the certified gaps (new, old)."""
    j1, _ = jacobians(kind, k)
    g = (j1 @ j1.T).numpy()
    boost, w, gap = cagrad_solve(g, 0.4)
    d_new = (1.0 / k + boost) @ j1.numpy()
    d_old = old_weights(j1 @ j1.T).numpy() @ j1.numpy()
    a = g / np.mean(np.diag(g))
    _, _, gap_old = interior_point(a, 0.16 * float(a.mean()), 1e-8, 50)
    diff = np.linalg.norm(d_new - d_old) / np.linalg.norm(j1.numpy().mean(axis=0))
    return (
        f"support {int((w > 0).sum())}/{k}, gap {gap:.1e} (old {gap_old:.1e}), "
        f"||d_new - d_old|| / ||g0|| = {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per configuration")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_round = max(args.calls // args.rounds, 1)
    for kind in ("random", "structured"):
        print(f"\n## {kind} Gramian: CAGrad weights_from_gramian, ms per call (median)\n")
        print("| K | cold | warm | old (interior point) | old / warm |")
        print("|---:|---:|---:|---:|---:|")
        notes = []
        for k in SIZES:
            fns = timers(kind, k)
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        fn()
                        samples[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
            print(
                f"| {k} | {med['cold']:.3f} | {med['warm']:.3f} | {med['old']:.3f} | "
                f"{med['old'] / med['warm']:.1f}x |"
            )
            notes.append(f"K={k}: {check(kind, k)}")
        print()
        for note in notes:
            print(note)


if __name__ == "__main__":
    main()
