"""Cost of ``diagnostics=True`` relative to the same gradient method without diagnostics.

One full training step (forward, ``balancer.backward``, optimizer step) of a small MLP
(input 64, a shared body of two tanh layers of width 256, K = 4 linear heads, batch 128) with
UPGrad, in the exact mode (``shared=``, J over the body's ~82k parameters) and the features
mode (``features=``, J over the batch × 256 features). For each mode the two balancers
(``diagnostics=False`` and ``diagnostics=True``) train their own copy of the same model
and are timed step by step, alternating (off, on, on, off, ...) in the same process, so
that both see the same machine load; the min, median and mean step time of each and their
ratios (on / off) are printed (on a loaded machine the step times are bimodal, preempted
or not, and the min is the steadiest figure),
then the diagnostics' own work per step timed alone (independent of the model's size).

Usage: ``python benchmarks/diagnostics_overhead.py [--steps 400] [--method upgrad] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

import taskbalance as tb

K = 4
BATCH = 128


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(K))


def step_time(
    net: Net, bal: tb.Balancer, opt: torch.optim.Optimizer, mode: str, x: torch.Tensor, y
) -> float:
    """Seconds of one training step."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    z = net.body(x)
    losses = [((head(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(net.heads)]
    if mode == "exact":
        bal.backward(losses, shared=net.body)
    else:
        bal.backward(losses, features=z)
    opt.step()
    return time.perf_counter() - start


def measure(method: str, mode: str, steps: int) -> dict[bool, list[float]]:
    """Step times (s) without (``False``) and with (``True``) diagnostics."""
    torch.manual_seed(0)
    base = Net()
    runs = {}
    for on in (False, True):
        net = copy.deepcopy(base)
        bal = tb.make(method, tasks=K, diagnostics=on)
        runs[on] = (net, bal, torch.optim.SGD(net.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 64, generator=gen), torch.randn(BATCH, K, generator=gen)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(steps + 10):  # alternate step by step: both see the same load
        for on in (False, True) if r % 2 == 0 else (True, False):
            seconds = step_time(*runs[on], mode, x, y)
            if r >= 10:  # the first ten are warm-up
                times[on].append(seconds)
    return times


def direct_cost(method: str, calls: int = 2000) -> float:
    """Median seconds of the diagnostics' own work on one step: the per-step values from a
    K×K Gramian and the weights (what ``_diagnose`` computes for a Gramian method) plus the
    bookkeeping that turns them into a history row (``_take_diagnostics``)."""
    from taskbalance.diagnostics import step_diagnostics

    bal = tb.make(method, tasks=K, diagnostics=True)
    gen = torch.Generator().manual_seed(2)
    jac = torch.randn(K, 1000, generator=gen, dtype=torch.float64)
    gram, w, losses = jac @ jac.T, torch.rand(K, dtype=torch.float64), torch.rand(K)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        bal._add_diagnostics(step_diagnostics(gram, w))
        bal._take_diagnostics(losses)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="timed steps of each")
    parser.add_argument("--method", default="upgrad")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    if hasattr(os, "getloadavg"):
        print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"{'mode':9s} {'statistic':9s} {'off (ms)':>9s} {'on (ms)':>9s} {'on/off':>7s}")
    for mode in ("exact", "features"):
        times = measure(args.method, mode, args.steps)
        for name, stat in (
            ("min", min),
            ("median", statistics.median),
            ("mean", statistics.fmean),
        ):
            off, on = stat(times[False]) * 1e3, stat(times[True]) * 1e3
            print(f"{mode:9s} {name:9s} {off:9.3f} {on:9.3f} {on / off:7.3f}")
    cost = direct_cost(args.method)
    print(f"the diagnostics' own work per diagnosed step (K={K}): {cost * 1e6:.0f} us")
    if hasattr(os, "getloadavg"):
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
