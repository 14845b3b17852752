"""Step time with many tasks: K = 10, 40, 100 on the MLP of ``benchmarks/speed.py``.

For each K, one interleaved run (paired ratios as in ``speed.py``: every configuration is
timed right after its baseline, and the median of the per-round ratios is reported):

* **fork mode** (``tb.fork(z, K)``, one backward for all K feature gradients) against
  equal weighting: the engine alone (mean of the task gradients) and a few methods
  (``--methods``, default UPGrad, MGDA, PCGrad, Nash-MTL). The issue's goal is fork ≤ 1.5×
  equal weighting at K = 40. The heads are linear, so the engine takes G and ``wᵀJ`` from
  their factors (:mod:`taskbalance.structured`); the rows "J stacked" run the engine alone
  and UPGrad with ``tb.fork(z, K, factored=False)`` (J stacked from the K view gradients,
  the engine before the factors) in the same run.
* **exact mode** (``shared=``: K backward passes, J over the shared parameters) against
  the K-backward loop of ``speed.py`` (LibMTL's approach), the engine alone and UPGrad;
  with ``--tasks-per-step m``, UPGrad with ``tasks_per_step=m`` too.
* the **solver** share: the weight computation alone for the same methods on the J of
  the last exact step (``balancer.aggregate``), in ms.

Usage::

    python benchmarks/many_tasks.py [--tasks 10,40,100] [--rounds 5] [--steps 3]
        [--methods upgrad,mgda,pcgrad,nash_mtl] [--threads 0] [--no-exact]
        [--threads 1 --cpu-time]

``--cpu-time`` times each step by the calling thread's CPU time (as ``speed.py``'s), for
use with ``--threads 1`` on a machine that other jobs are loading.
"""

from __future__ import annotations

import argparse
import statistics
import time

import speed
import torch
from speed import (
    Setup,
    UniformGradient,
    _losses_and_shared,
    print_table,
    step_balancer,
    step_loop_baseline,
    timed,
)

import taskbalance as tb


def fork_configs(s: Setup, methods: list[str]) -> dict:
    engine = UniformGradient(s.k)
    configs = {
        "equal": step_balancer(s, "equal", "loss"),
        "fork, engine only (mean)": lambda: (
            s.opt.zero_grad(),
            engine.backward(*_losses_and_shared(s, features=True, forked=True)),
            s.opt.step(),
        ),
    }
    configs["fork, engine only (mean), J stacked"] = lambda: (
        s.opt.zero_grad(),
        engine.backward(*_losses_and_shared(s, features=True, forked=True, factored=False)),
        s.opt.step(),
    )
    for name in methods:
        configs[f"fork, {name}"] = step_balancer(s, name, "forked")
    configs["fork, upgrad, J stacked"] = step_balancer(s, "upgrad", "forked J")
    return configs


def exact_configs(s: Setup, per_step: int | None) -> dict:
    engine = UniformGradient(s.k)
    configs = {
        "loop (LibMTL)": step_loop_baseline(s),
        "exact, engine only (mean)": lambda: (
            s.opt.zero_grad(),
            engine.backward(*_losses_and_shared(s, features=False)),
            s.opt.step(),
        ),
        "exact, upgrad": step_balancer(s, "upgrad", "exact"),
    }
    if per_step is not None:
        bal = tb.make("upgrad", s.k, tasks_per_step=per_step)

        def sampled() -> None:
            s.opt.zero_grad()
            losses, _ = s.forward()
            bal.backward(losses, shared=s.body)
            s.opt.step()

        configs[f"exact, upgrad, tasks_per_step={per_step}"] = sampled
    return configs


def solver_ms(k: int, methods: list[str], rounds: int) -> dict[str, float]:
    """Median ms of ``aggregate`` on the J of one exact step of the MLP."""
    s = Setup(k)
    losses, _ = s.forward()
    rows = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(s.body.parameters()), retain_graph=i < k - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows)
    stacked = torch.stack([loss.detach() for loss in losses])
    out = {}
    for name in methods:
        bal = tb.make(name, k)
        samples = []
        for _ in range(max(rounds, 3)):
            t0 = time.perf_counter()
            bal.aggregate(jac, stacked)
            samples.append(time.perf_counter() - t0)
        out[name] = statistics.median(samples) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="10,40,100")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="upgrad,mgda,pcgrad,nash_mtl")
    parser.add_argument("--tasks-per-step", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-exact", action="store_true", help="fork mode only")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time steps by CPU time (use with --threads 1)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        speed.CLOCK = time.thread_time
    methods = [m for m in args.methods.split(",") if m]
    clock = "thread CPU time" if args.cpu_time else "wall"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock: {clock}")
    for k in [int(v) for v in args.tasks.split(",") if v]:
        s = Setup(k)
        print_table(
            f"fork mode, K={k}",
            timed(fork_configs(s, methods), args.rounds, args.steps, "equal"),
            "equal",
        )
        if not args.no_exact:
            per_step = args.tasks_per_step if args.tasks_per_step else None
            if per_step is not None and per_step >= k:
                per_step = None
            timing = timed(
                exact_configs(Setup(k), per_step), args.rounds, args.steps, "loop (LibMTL)"
            )
            print_table(f"exact mode, K={k}", timing, "loop (LibMTL)")
        solver = solver_ms(k, methods, args.rounds)
        cells = ", ".join(f"{name} {ms:.2f}" for name, ms in solver.items())
        params = sum(p.numel() for p in Setup(k).body.parameters())
        print(f"\nsolver alone on the MLP's J (K={k}, P={params}), ms: {cells}")


if __name__ == "__main__":
    main()
