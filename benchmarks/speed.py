"""Step time of every balancing method, as ratios against baselines measured in the same run.

Model: MLP body 256 -> 512 -> 512 -> 512 (ReLU), K linear heads 512 -> 1, batch 256, MSE
losses, SGD; CPU. Every configuration runs interleaved with the others (round robin over
several rounds), and in every round the baseline is timed again right before each
configuration: the ratio reported is the median over the rounds of these paired ratios, so
the machine's drift (slow, or over a round) cancels out.

Sections (``--section``):

* ``loss``: each loss-weighting method / equal weighting (target <= 1.03x).
* ``features``: gradient methods in representation mode / equal weighting (target <= 1.3x).
* ``exact``: gradient methods in exact mode / a K-backward loop that flattens the per-task
  gradients into one vector (the LibMTL approach; target <= 1.05x), and torchjd's autojac
  and autogram engines on the same model when torchjd is installed (``pip install torchjd``).
* ``memory``: peak resident memory of a fresh process running exact mode vs the loop.
* ``solver``: time of the weight computation alone at K = 2, 10, 40, 100.

Usage: ``python benchmarks/speed.py [--section all] [--rounds 7] [--steps 10] [--tasks 10]``

``--threads 1 --cpu-time`` times each step by the CPU time of the calling thread instead of
the wall clock: with one torch thread every kernel runs on it, so time lost while other
processes hold the cores is not counted (a shared machine's load still slows memory-bound
work, but far less than it stretches the wall clock).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.aggregation import GradientBalancer

BATCH, IN_DIM, HIDDEN = 256, 256, 512
#: the clock of :func:`timed` (``--cpu-time``: the calling thread's CPU time).
CLOCK: Callable[[], float] = time.perf_counter

#: constructor arguments a method needs beyond ``tasks``.
EXTRA_ARGS: dict[str, Callable[[int], dict]] = {
    "static": lambda k: {"weights": [1.0] * k},
}
#: per-step context a method needs.
STEP_CONTEXT: dict[str, Callable[[int], dict]] = {
    "dtp": lambda k: {"kpi": [0.5] * k},
}


class Setup:
    """Model, data and optimizer for one configuration (same seed for all)."""

    def __init__(self, k: int) -> None:
        torch.manual_seed(0)
        self.k = k
        self.body = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(k))
        self.x = torch.randn(BATCH, IN_DIM)
        self.y = torch.randn(BATCH, k)
        params = list(self.body.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.SGD(params, lr=1e-4)

    def forward(
        self, forked: bool = False, factored: bool = True
    ) -> tuple[list[Tensor], Tensor | list[Tensor]]:
        """Losses and features; ``forked`` feeds head i its own view ``tb.fork(z, K)[i]``
        (``factored=False``: the engine stacks J instead of using the linear heads' factors)."""
        z = self.body(self.x)
        inputs = tb.fork(z, self.k, factored=factored) if forked else [z] * self.k
        losses = [
            nn.functional.mse_loss(h(zi).squeeze(-1), self.y[:, i])
            for i, (h, zi) in enumerate(zip(self.heads, inputs))
        ]
        return losses, (inputs if forked else z)


def make_balancer(name: str, k: int) -> tb.Balancer:
    return tb.make(name, k, **EXTRA_ARGS.get(name, lambda _: {})(k))


def step_plain_sum(s: Setup) -> Callable[[], None]:
    def step() -> None:
        s.opt.zero_grad()
        losses, _ = s.forward()
        torch.stack(losses).sum().backward()
        s.opt.step()

    return step


def step_balancer(s: Setup, name: str, mode: str) -> Callable[[], None]:
    """One training step of method ``name``; ``mode``: ``"loss"``, ``"exact"``,
    ``"features"``, ``"forked"`` or ``"forked J"`` (forked with J stacked, no factors)."""
    bal = make_balancer(name, s.k)
    ctx = STEP_CONTEXT.get(name, lambda _: {})(s.k)

    def step() -> None:
        s.opt.zero_grad()
        losses, z = s.forward(forked=mode.startswith("forked"), factored=mode != "forked J")
        if mode in ("features", "forked", "forked J"):
            bal.backward(losses, shared=s.body, features=z, **ctx)
        elif mode == "exact":
            bal.backward(losses, shared=s.body, **ctx)
        else:
            bal.backward(losses, **ctx)
        s.opt.step()

    return step


def step_loop_baseline(s: Setup, with_gramian: bool = False) -> Callable[[], None]:
    """K backward passes, shared gradients flattened into one (K, P) matrix, mean direction.

    ``with_gramian`` also forms ``J @ J.T`` as LibMTL's Gramian methods (MGDA) do, so the
    engine's Gramian methods can be compared with the same arithmetic.
    """
    shared = list(s.body.parameters())

    def step() -> None:
        s.opt.zero_grad()
        losses, _ = s.forward()
        rows = []
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < len(losses) - 1)
            rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
            for p in shared:
                p.grad = None
        jac = torch.stack(rows)
        if with_gramian:
            jac @ jac.T
        direction = jac.mean(0)
        offset = 0
        for p in shared:
            p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        s.opt.step()

    return step


def step_torchjd(s: Setup, engine: str, aggregator: str) -> Callable[[], None] | None:
    try:
        from torchjd import aggregation, autogram, autojac
    except ImportError:
        return None
    if engine == "autojac":
        agg = aggregation.UPGrad() if aggregator == "upgrad" else aggregation.Mean()

        def step() -> None:
            s.opt.zero_grad()
            losses, z = s.forward()
            autojac.mtl_backward(losses, features=z)
            autojac.jac_to_grad(list(s.body.parameters()), agg)
            s.opt.step()

        return step
    weighting = (
        aggregation.UPGradWeighting() if aggregator == "upgrad" else (aggregation.MeanWeighting())
    )
    gram_engine = autogram.Engine(s.body, batch_dim=None)

    def step_gram() -> None:
        s.opt.zero_grad()
        losses, _ = s.forward()
        stacked = torch.stack(losses)
        weights = weighting(gram_engine.compute_gramian(stacked))
        stacked.backward(weights)
        s.opt.step()

    return step_gram


class UniformGradient(GradientBalancer):
    """Mean of the task gradients through the engine: the engine's cost with no solver."""

    method_name = "engine_only"

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype)


def timed(
    configs: dict[str, Callable[[], None]], rounds: int, steps: int, base: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per step of each config, one sample per round, interleaved over ``rounds``.

    Returns ``(samples, paired)``: ``paired[name][r]`` is the baseline ``base`` timed right
    before ``name`` in round r (the baseline is timed again before every configuration), so
    that each configuration's ratio compares two measurements taken seconds apart; the
    machine's drift over a round (a round times every configuration) then cancels out.
    """
    samples: dict[str, list[float]] = {name: [] for name in configs}
    paired: dict[str, list[float]] = {name: [] for name in configs}
    for fn in configs.values():  # warm-up
        for _ in range(3):
            fn()

    def sample(fn: Callable[[], None]) -> float:
        t0 = CLOCK()
        for _ in range(steps):
            fn()
        return (CLOCK() - t0) / steps

    for _ in range(rounds):
        for name, fn in configs.items():
            paired[name].append(sample(configs[base]))
            samples[name].append(sample(fn))
    return samples, paired


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def print_table(
    title: str, timing: tuple[dict[str, list[float]], dict[str, list[float]]], base: str
) -> None:
    """Median ms per step, and the median and quartiles of the paired per-round ratios
    (each sample over the baseline timed just before it: see :func:`timed`)."""
    samples, paired = timing
    print(f"\n## {title} (baseline: {base})\n")
    print("| configuration | ms / step | ratio (median of paired) | paired ratio, quartiles |")
    print("|---|---:|---:|---:|")
    for name, values in samples.items():
        per_round = sorted(v / b for v, b in zip(values, paired[name]))
        low, high = per_round[len(per_round) // 4], per_round[(3 * len(per_round)) // 4]
        print(
            f"| {name} | {median(values) * 1e3:.2f} | {median(per_round):.3f} "
            f"| {low:.3f}–{high:.3f} |"
        )


def methods_of(kind: str) -> list[str]:
    return [m for m in tb.list_methods() if tb.get(m).kind == kind]


def section_loss(k: int, rounds: int, steps: int) -> None:
    s = Setup(k)
    configs = {"plain sum": step_plain_sum(s)}
    for name in methods_of("loss"):
        configs[name] = step_balancer(s, name, "loss")
    print_table(f"loss-weighting methods, K={k}", timed(configs, rounds, steps, "equal"), "equal")


def gradient_methods() -> list[str]:
    return [m for m in methods_of("gradient") if m != "gradnorm"] + (
        ["gradnorm"] if "gradnorm" in tb.list_methods() else []
    )


def section_features(k: int, rounds: int, steps: int) -> None:
    s = Setup(k)
    configs = {"equal": step_balancer(s, "equal", "loss")}
    engine = UniformGradient(k)
    configs["engine only (mean)"] = lambda: (
        s.opt.zero_grad(),
        engine.backward(*_losses_and_shared(s, features=True)),
        s.opt.step(),
    )
    configs["engine only (mean), forked"] = lambda: (
        s.opt.zero_grad(),
        engine.backward(*_losses_and_shared(s, features=True, forked=True)),
        s.opt.step(),
    )
    configs["engine only (mean), forked, J stacked"] = lambda: (
        s.opt.zero_grad(),
        engine.backward(*_losses_and_shared(s, features=True, forked=True, factored=False)),
        s.opt.step(),
    )
    for name in gradient_methods():
        if "features" in getattr(tb.get(name), "modes", ("features",)):
            configs[name] = step_balancer(s, name, "features")
            if name != "gradnorm":
                configs[f"{name}, forked"] = step_balancer(s, name, "forked")
    times = timed(configs, rounds, steps, "equal")
    print_table(f"representation (features) mode, K={k}", times, "equal")


def _losses_and_shared(
    s: Setup, features: bool, forked: bool = False, factored: bool = True
) -> tuple:
    losses, z = s.forward(forked=forked, factored=factored)
    return (losses, s.body, z) if features else (losses, s.body)


def section_exact(k: int, rounds: int, steps: int) -> None:
    s = Setup(k)
    configs = {
        "equal": step_balancer(s, "equal", "loss"),
        "loop (LibMTL)": step_loop_baseline(s),
        "loop + Gramian": step_loop_baseline(s, with_gramian=True),
    }
    engine = UniformGradient(k)
    configs["engine only (mean)"] = lambda: (
        s.opt.zero_grad(),
        engine.backward(*_losses_and_shared(s, features=False)),
        s.opt.step(),
    )
    for eng in ("autojac", "autogram"):
        for agg in ("mean", "upgrad"):
            fn = step_torchjd(Setup(k), eng, agg)  # own model: autogram hooks its modules
            if fn is not None:
                configs[f"torchjd {eng} {agg}"] = fn
    for name in gradient_methods():
        if "exact" in getattr(tb.get(name), "modes", ("exact",)):
            configs[name] = step_balancer(s, name, "exact")
    times = timed(configs, rounds, steps, "loop (LibMTL)")
    print_table(f"exact mode, K={k}", times, "loop (LibMTL)")
    samples = times[0]  # timed() returns (samples, paired)
    equal, loop = median(samples["equal"]), median(samples["loop (LibMTL)"])
    print(f"\nequal weighting: {equal * 1e3:.2f} ms/step; loop / equal = {loop / equal:.2f}x")


def section_memory(k: int) -> None:
    print(f"\n## peak memory of a training step above the steady state, exact mode, K={k}\n")
    print("Peak RSS (VmHWM, reset after one warm-up step) minus the RSS before the steps; Linux.\n")
    print("| configuration | extra peak (MiB) | ratio to loop |")
    print("|---|---:|---:|")
    results = {}
    for config in ("none", "loop", "engine", "mgda", "upgrad"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", config, "--tasks", str(k)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[config] = float(out.stdout.strip().splitlines()[-1])
    for config, label in (
        ("none", "model + data only"),
        ("loop", "loop (LibMTL)"),
        ("engine", "engine only (mean)"),
        ("mgda", "mgda"),
        ("upgrad", "upgrad"),
    ):
        print(f"| {label} | {results[config]:.1f} | {results[config] / results['loop']:.3f} |")


def memory_child(config: str, k: int) -> None:
    s = Setup(k)
    if config == "loop":
        fn = step_loop_baseline(s)
    elif config == "engine":
        engine = UniformGradient(k, record=False)

        def fn() -> None:
            s.opt.zero_grad()
            engine.backward(*_losses_and_shared(s, features=False))
            s.opt.step()
    elif config == "none":

        def fn() -> None:
            s.forward()
    else:
        fn = step_balancer(s, config, "exact")
    fn()  # warm-up: allocator pools, optimizer state
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    for _ in range(5):
        fn()
    print((_status_kib("VmHWM") - base) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def section_solver(rounds: int) -> None:
    # K x K work: one torch thread (a second one only waits for a core on a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _solver_table(rounds)
    finally:
        torch.set_num_threads(threads)


def _solver_table(rounds: int) -> None:
    print("\n## weight computation alone (ms per call, 1 torch thread), random J with P = 1000\n")
    sizes = (2, 10, 40, 100)
    print("| method | " + " | ".join(f"K={k}" for k in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in gradient_methods():
        cls = tb.get(name)
        if not hasattr(cls, "aggregate") or name == "gradnorm":
            continue
        cells = []
        for k in sizes:
            gen = torch.Generator().manual_seed(k)
            jac = torch.randn(k, 1000, generator=gen, dtype=torch.float64)
            losses = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
            bal = make_balancer(name, k)
            samples = []
            for _ in range(max(rounds, 5)):
                t0 = time.perf_counter()
                for _ in range(20):
                    bal.aggregate(jac, losses)
                samples.append((time.perf_counter() - t0) / 20)
            cells.append(f"{statistics.median(samples) * 1e3:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section", default="all", choices=["all", "loss", "features", "exact", "memory", "solver"]
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time steps by CPU time (use with --threads 1)"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    if args.memory_child:
        memory_child(args.memory_child, args.tasks)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {BATCH}, MLP {IN_DIM}->{HIDDEN}x3, K={args.tasks}, "
        f"clock: {'thread CPU time' if args.cpu_time else 'wall'}"
    )
    sections = ["loss", "features", "exact", "memory", "solver"]
    run = sections if args.section == "all" else [args.section]
    if "loss" in run:
        section_loss(args.tasks, args.rounds, args.steps)
    if "features" in run:
        section_features(args.tasks, args.rounds, args.steps)
    if "exact" in run:
        section_exact(args.tasks, args.rounds, args.steps)
    if "memory" in run:
        section_memory(args.tasks)
    if "solver" in run:
        section_solver(args.rounds)


if __name__ == "__main__":
    main()
