"""Where a fork-mode step's time goes, phase by phase, with J stacked and with the factors.

On the MLP of ``benchmarks/speed.py`` (K linear heads), three steps alternate in one process,
each timed phase by phase (no optimizer step):

* **J stacked** (``tb.fork(z, K, factored=False)``): forward; the checks' graph walks and the
  heads' backward with the K views, then J stacked from the K view gradients; the Gramian
  ``J Jᵀ``; ``wᵀJ``; the body's backward of ``wᵀJ``.
* **factored** (``tb.fork(z, K)``): the same phases, the heads' backward stopped at the linear
  layers' outputs, G and ``wᵀJ`` from the factors (:mod:`taskbalance.structured`).
* **equal weighting**: forward, and one backward of the summed losses.

The weights are the mean (no solver). Prints the median ms of each phase over ``--steps``
steps. ``--threads 1 --cpu-time`` (the default) times by the thread's CPU time, which a
machine loaded by other jobs disturbs least.

Usage: ``python benchmarks/fork_phases.py [--tasks 10,40,100] [--steps 40] [--threads 1]
[--wall]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from speed import Setup
from torch import nn

import taskbalance as tb
from taskbalance.gradients import forked_task_jacobian, gramian
from taskbalance.structured import FactoredTaskGradients

Phases = dict[str, float]


def fork_step(s: Setup, factored: bool, clock: Callable[[], float]) -> Phases:
    names = [str(i) for i in range(s.k)]
    t0 = clock()
    z = s.body(s.x)
    zs = tb.fork(z, s.k, factored=factored)
    losses = [
        nn.functional.mse_loss(h(zi).squeeze(-1), s.y[:, i])
        for i, (h, zi) in enumerate(zip(s.heads, zs))
    ]
    t1 = clock()
    grads = forked_task_jacobian(losses, zs, names)
    assert isinstance(grads, FactoredTaskGradients) == factored
    t2 = clock()
    gram = grads.gramian() if factored else gramian(grads.jacobian)
    t3 = clock()
    weights = torch.full((s.k,), 1.0 / s.k, dtype=gram.dtype)
    direction = grads.combine(weights) if factored else weights @ grads.jacobian
    t4 = clock()
    torch.autograd.backward([z], [direction.view_as(z)])
    t5 = clock()
    return {
        "forward": t1 - t0,
        "walks + heads backward (+ stacking J)": t2 - t1,
        "Gramian": t3 - t2,
        "wᵀJ": t4 - t3,
        "body backward": t5 - t4,
    }


def equal_step(s: Setup, clock: Callable[[], float]) -> Phases:
    t0 = clock()
    z = s.body(s.x)
    losses = [nn.functional.mse_loss(h(z).squeeze(-1), s.y[:, i]) for i, h in enumerate(s.heads)]
    t1 = clock()
    torch.stack(losses).sum().backward()
    return {"forward": t1 - t0, "backward (heads and body)": clock() - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="10,40,100")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall clock instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.thread_time
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"clock: {'wall' if args.wall else 'thread CPU time'}, median of {args.steps} steps"
    )
    for k in [int(v) for v in args.tasks.split(",") if v]:
        s = Setup(k)
        runs: dict[str, Callable[[], Phases]] = {
            "J stacked": lambda s=s: fork_step(s, False, clock),
            "factored": lambda s=s: fork_step(s, True, clock),
            "equal weighting": lambda s=s: equal_step(s, clock),
        }
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
        for _ in range(5):  # warm-up
            for run in runs.values():
                run()
                s.opt.zero_grad()
        for _ in range(args.steps):
            for name, run in runs.items():
                for phase, seconds in run().items():
                    samples[name].setdefault(phase, []).append(seconds)
                s.opt.zero_grad()
        print(f"\n## K={k}\n\n| step | phase | ms |\n|---|---|---:|")
        for name, phases in samples.items():
            total = 0.0
            for phase, values in phases.items():
                ms = statistics.median(values) * 1e3
                total += ms
                print(f"| {name} | {phase} | {ms:.2f} |")
            print(f"| {name} | **sum of the medians** | **{total:.2f}** |")


if __name__ == "__main__":
    main()
