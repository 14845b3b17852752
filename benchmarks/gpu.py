"""Step time and peak memory of the engine's modes on a GPU (or, with ``--device cpu``, a CPU).

Model: a ResNet-18 trunk (BasicBlocks 2-2-2-2, 64-128-256-512 channels, 11.2 M parameters,
global average pooling) on 3 x 32 x 32 images, K linear heads 512 -> 1 with MSE losses, SGD;
K = 10 and 40, batch 128 by default (``--batch``: 64-256). ``--small`` swaps in a narrow
trunk of the same shape (one block per stage, 8-16-32-64 channels) for a CPU.

For each K, interleaved round robin with equal weighting timed again right before every
configuration (:func:`speed.timed`: the ratio is the median of these paired ratios):

* ``EW``: equal weighting, ``balancer(losses).backward()``: one backward.
* ``loop``: K ``loss.backward(retain_graph=True)``, each flattened into a row of J, mean
  direction (LibMTL's approach, :func:`speed.step_loop_baseline`).
* ``exact``: the engine's exact mode (``shared=`` the trunk), mean of the task gradients
  (:class:`speed.UniformGradient`: the engine with no solver) and UPGrad.
* ``J-free exact``: the exact mode with ``jacobian_free=True`` (the Gramian accumulated
  layer by layer, J never stored: :mod:`taskbalance.layerwise`), engine alone and UPGrad.
* ``features`` (``features=z``) and ``fork`` (``tb.fork(z, K)``): the representation modes,
  engine alone and UPGrad.

Then the peak memory of one step of each configuration (``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, model, optimizer state and data included; on a CPU
"n/a": no allocator statistic comparable to it exists there), and the solvers' time on the
device: ``aggregate(J, losses)`` of a random K x 1000 J, synchronised. ``--compile
inductor`` compiles the trunk (``torch.compile(trunk)``, donated buffers off, as the exact
mode needs: docs/compile.md) and first prints each configuration's first step and the
number of graphs compiled after the first steps (0: no recompilation).

Usage: ``python benchmarks/gpu.py`` (CUDA; meant to finish in under five minutes, not yet
run on a GPU);
``python benchmarks/gpu.py --device cpu --small --threads 1 --rounds 3 --steps 1`` (a CPU;
one torch thread: on a loaded machine a second one mostly waits for a core).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
from torch import Tensor, nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed

import taskbalance as tb

#: the solvers timed on the device (one of each family; every method: ``speed.py --section solver``)
SOLVERS = ("mgda", "upgrad", "cagrad", "nash_mtl", "imtl", "pcgrad", "aligned_mtl", "graddrop")


class Block(nn.Module):
    """ResNet's BasicBlock: two 3x3 convolutions with batch norm and a skip connection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet_trunk(widths: Sequence[int] = (64, 128, 256, 512), blocks: int = 2) -> nn.Module:
    """A CIFAR-style ResNet trunk (3x3 stem) ending in global average pooling: (B, widths[-1])."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            layers.append(Block(cin, width, 2 if stage > 0 and b == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class ConvSetup:
    """Model, data and optimizer for one K: the interface of :class:`speed.Setup`."""

    def __init__(
        self,
        k: int,
        batch: int,
        image: int,
        small: bool,
        device: torch.device,
        backend: str | None = None,
    ) -> None:
        torch.manual_seed(0)
        self.k = k
        widths, blocks = ((8, 16, 32, 64), 1) if small else ((64, 128, 256, 512), 2)
        self.body = resnet_trunk(widths, blocks).to(device)
        #: what the forward runs: the trunk, or the trunk compiled with ``backend``
        self.run_body = self.body if backend is None else torch.compile(self.body, backend=backend)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(k)).to(device)
        self.x = torch.randn(batch, 3, image, image, device=device)
        self.y = torch.randn(batch, k, device=device)
        params = list(self.body.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.SGD(params, lr=1e-4)

    def forward(
        self, forked: bool = False, factored: bool = True
    ) -> tuple[list[Tensor], Tensor | list[Tensor]]:
        z = self.run_body(self.x)
        inputs = tb.fork(z, self.k, factored=factored) if forked else [z] * self.k
        losses = [
            nn.functional.mse_loss(h(zi).squeeze(-1), self.y[:, i])
            for i, (h, zi) in enumerate(zip(self.heads, inputs))
        ]
        return losses, (inputs if forked else z)


class EngineOnly(speed.UniformGradient):
    """:class:`speed.UniformGradient` with its weights on the Gramian's device (a GPU's)."""

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return super().weights_from_gramian(gramian, losses).to(gramian.device)


def step_engine(s: ConvSetup, mode: str) -> Callable[[], None]:
    """The engine with no solver (mean of the task gradients) in ``mode``."""
    engine = EngineOnly(s.k, jacobian_free=mode == "J-free exact")

    def step() -> None:
        s.opt.zero_grad()
        losses, z = s.forward(forked=mode == "fork")
        if mode in ("exact", "J-free exact"):
            engine.backward(losses, shared=s.body)
        else:
            engine.backward(losses, features=z)
        s.opt.step()

    return step


def configurations(s: ConvSetup) -> dict[str, Callable[[], None]]:
    configs = {
        "EW": speed.step_balancer(s, "equal", "loss"),  # type: ignore[arg-type]
        "loop (LibMTL)": speed.step_loop_baseline(s),  # type: ignore[arg-type]
    }
    for mode in ("exact", "J-free exact", "features", "fork"):
        configs[f"{mode}, engine only (mean)"] = step_engine(s, mode)
        if mode == "J-free exact":
            configs[f"{mode}, upgrad"] = step_jacobian_free(s, "upgrad")
            continue
        speed_mode = "forked" if mode == "fork" else mode
        configs[f"{mode}, upgrad"] = speed.step_balancer(s, "upgrad", speed_mode)  # type: ignore[arg-type]
    return configs


def step_jacobian_free(s: ConvSetup, name: str) -> Callable[[], None]:
    """``name`` in the exact mode with ``jacobian_free=True``."""
    bal = tb.make(name, s.k, jacobian_free=True)

    def step() -> None:
        s.opt.zero_grad()
        losses, _ = s.forward()
        bal.backward(losses, shared=s.body)
        s.opt.step()

    return step


def synchronised(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a wait for the device (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return fn

    def step() -> None:
        fn()
        torch.cuda.synchronize(device)

    return step


def peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    """MiB allocated at the peak of one step (after one warm-up step); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def print_memory(peaks: dict[str, float | None]) -> None:
    print("\n| configuration | peak memory (MiB) | ratio to EW |")
    print("|---|---:|---:|")
    base = peaks.get("EW")
    for name, peak in peaks.items():
        if peak is None:
            print(f"| {name} | n/a on CPU | n/a |")
        else:
            ratio = f"{peak / base:.2f}" if base else "n/a"
            print(f"| {name} | {peak:.0f} | {ratio} |")


def solver_times(ks: Sequence[int], device: torch.device, rounds: int) -> None:
    """``aggregate(J, losses)`` of a random K x 1000 J on the device, ms per call."""
    print(f"\n## solvers on {device} (ms per call, random J of K x 1000, synchronised)\n")
    print("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---:|" * len(ks))
    for name in SOLVERS:
        cells = []
        for k in ks:
            gen = torch.Generator().manual_seed(k)
            jac = torch.randn(k, 1000, generator=gen).to(device)
            losses = (torch.rand(k, generator=gen) + 0.5).to(device)
            bal = speed.make_balancer(name, k)
            call = synchronised(
                lambda bal=bal, jac=jac, losses=losses: bal.aggregate(jac, losses), device
            )
            call()  # warm-up
            samples = []
            for _ in range(max(rounds, 3)):
                t0 = time.perf_counter()
                for _ in range(10):
                    call()
                samples.append((time.perf_counter() - t0) / 10)
            cells.append(f"{statistics.median(samples) * 1e3:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def compile_report(configs: dict[str, Callable[[], None]]) -> None:
    """Time the first step of each configuration (the first compiles the trunk), then say
    how many graphs dynamo compiled and whether any was compiled after the first step."""
    torch._dynamo.reset()
    counters.clear()
    firsts = []
    for name, fn in configs.items():
        t0 = time.perf_counter()
        fn()
        firsts.append(f"{name} {time.perf_counter() - t0:.2f} s")
    before = counters["stats"]["unique_graphs"]
    for fn in configs.values():
        fn()
    after = counters["stats"]["unique_graphs"]
    print("\nfirst step of each configuration (the first one compiles): " + "; ".join(firsts))
    print(f"graphs compiled: {before} in the first steps, {after - before} afterwards")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} torch threads"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--tasks", default="10,40", help="comma-separated K values")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32, help="image side in pixels")
    parser.add_argument("--small", action="store_true", help="a narrow trunk (for a CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--solver-rounds", type=int, default=5)
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="compile the trunk with torch.compile (inductor, aot_eager); docs/compile.md",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run with --device cpu (and --small)")
    ks = [int(k) for k in args.tasks.split(",")]
    threads, donated = torch.get_num_threads(), torch._functorch.config.donated_buffer
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args, device, ks)
    finally:
        torch.set_num_threads(threads)
        torch._functorch.config.donated_buffer = donated


def run(args: argparse.Namespace, device: torch.device, ks: list[int]) -> None:
    """Every table of :func:`main` for the parsed ``args``."""
    trunk = "narrow ResNet (8-16-32-64, 1 block/stage)" if args.small else "ResNet-18"
    print(
        f"{describe(device)}; torch {torch.__version__}; {trunk} trunk, "
        f"{args.image}x{args.image} images, batch {args.batch}, K={ks}; "
        f"{args.rounds} rounds of {args.steps}-step samples, paired with EW"
    )
    if args.compile:
        # the exact mode retains the trunk's graph between the tasks (docs/compile.md)
        torch._functorch.config.donated_buffer = False
        print(f"trunk compiled with torch.compile(backend={args.compile!r}), no donated buffers")
    for k in ks:
        s = ConvSetup(k, args.batch, args.image, args.small, device, args.compile)
        configs = {name: synchronised(fn, device) for name, fn in configurations(s).items()}
        if args.compile:
            compile_report(configs)
        times = speed.timed(configs, args.rounds, args.steps, "EW")
        speed.print_table(f"K={k}, {trunk}, batch {args.batch}", times, "EW")
        print_memory({name: peak_memory(fn, device) for name, fn in configs.items()})
        del s, configs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    solver_times(ks, device, args.solver_rounds)


if __name__ == "__main__":
    main()
