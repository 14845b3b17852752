"""Step time of a Gramian method with ``tasks_per_step=m`` against all K tasks.

A small MLP (a shared body of two hidden layers, K linear heads), exact mode (``shared=``
the body), CPU. Each round times ``--steps`` full training steps (zero_grad, forward,
``backward``, SGD step) of the two settings one after the other, in alternating order, and
the paired ratio of the round is ``time(all K) / time(m)``; the median ratio over the
rounds is reported with its range.

    python benchmarks/tasks_per_step_speed.py --method upgrad --tasks 40 --per-step 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import taskbalance as tb


def build(k: int, width: int) -> tuple[nn.Module, nn.ModuleList]:
    body = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))
    return body, heads


def run(bal: tb.Balancer, body: nn.Module, heads: nn.ModuleList, steps: int) -> float:
    opt = torch.optim.SGD([*body.parameters(), *heads.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, len(heads), generator=g)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        z = body(x)
        losses = [(h(z).squeeze(1) - y[:, i]).pow(2).mean() for i, h in enumerate(heads)]
        bal.backward(losses, shared=body)
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="upgrad")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--per-step", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    body, heads = build(args.tasks, args.width)
    full = tb.make(args.method, tasks=args.tasks)
    sampled = tb.make(args.method, tasks=args.tasks, tasks_per_step=args.per_step)
    run(full, body, heads, 2)  # warm-up
    run(sampled, body, heads, 2)
    ratios, times = [], []
    for r in range(args.rounds):
        pair = [(full, 0), (sampled, 1)] if r % 2 == 0 else [(sampled, 1), (full, 0)]
        took = [0.0, 0.0]
        for bal, slot in pair:
            took[slot] = run(bal, body, heads, args.steps)
        times.append(took)
        ratios.append(took[0] / took[1])
    per_step = [1e3 * statistics.median(t[i] for t in times) / args.steps for i in (0, 1)]
    print(
        f"{args.method}, K={args.tasks}, exact mode, width {args.width}: "
        f"all {args.tasks} tasks {per_step[0]:.1f} ms/step, tasks_per_step={args.per_step} "
        f"{per_step[1]:.1f} ms/step; paired ratio median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}, {args.rounds} rounds of {args.steps} steps)"
    )


if __name__ == "__main__":
    main()
