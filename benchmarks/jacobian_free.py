"""The exact mode with J stored against the exact mode without J (``jacobian_free=True``).

Model: an MLP trunk ``256 -> w -> w -> w -> w`` (ReLU), K linear heads ``w -> 1``, batch 64,
MSE losses, SGD, CPU; ``w`` is chosen for a trunk of about P parameters. For each (K, P),
each configuration runs in a fresh process (one warm-up step, then the peak resident memory
is reset and ``--steps`` steps are timed):

* ``equal``: one backward of the summed losses (equal weighting, the floor);
* ``loop``: K backward passes, the K gradients flattened into a K×P matrix, the mean
  direction (the loop of ``benchmarks/speed.py``, LibMTL's approach);
* ``stored``: UPGrad in the exact mode, J stored (``jacobian_free=False``, the default);
* ``free``: UPGrad in the exact mode, ``jacobian_free=True``.

The processes of one (K, P) run one after another, ``--rounds`` times; the time and memory
ratios to ``loop`` are the medians over the rounds of the ratios within a round (a round's
processes run seconds apart). Memory is the peak RSS above the RSS after the warm-up step
(``/proc/self/status``, Linux), so the model, its gradients and the optimizer are not
counted; J (K·P·4 bytes) and the gradients' copies are.

Usage::

    python benchmarks/jacobian_free.py [--tasks 10,40] [--sizes 1,10,100] [--rounds 2]
        [--steps 3] [--threads 0]

``--sizes`` are P in millions; pairs whose J would exceed ``--max-j-gib`` (default 6) are
left out (the loop keeps two copies of J). ``--trunk conv`` takes the ResNet-style trunk of
``benchmarks/gpu.py`` (one block per stage, 3×32×32 images) instead, ``--sizes`` then being
its first stage's channels (8: 0.2 M parameters, 64: 4.9 M).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import taskbalance as tb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu.py's trunk, speed.py

from speed import _status_kib

BATCH, IN_DIM, DEPTH = 64, 256, 4
CONFIGS = ("equal", "loop", "stored", "free")


def width_for(params: float) -> int:
    """The width w of a trunk of about ``params`` parameters (IN_DIM·w + 3·w² + 4·w)."""
    a, b, c = DEPTH - 1, IN_DIM + DEPTH, -params
    return max(8, round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))


class Net(nn.Module):
    """The MLP trunk of width ``width``, or (``conv``) the ResNet-style trunk of
    ``benchmarks/gpu.py`` with ``width`` channels in its first stage (2w, 4w, 8w after)."""

    def __init__(self, k: int, width: int, conv: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        if conv:
            from gpu import resnet_trunk

            self.body = resnet_trunk((width, 2 * width, 4 * width, 8 * width), blocks=1)
            out = 8 * width
        else:
            layers: list[nn.Module] = [nn.Linear(IN_DIM, width), nn.ReLU()]
            for _ in range(DEPTH - 1):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            out = width
        self.heads = nn.ModuleList(nn.Linear(out, 1) for _ in range(k))

    def forward(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = self.body(x)
        return [nn.functional.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)]


def child(config: str, k: int, width: int, steps: int, conv: bool) -> None:
    """One configuration in this process: prints ``seconds_per_step peak_MiB``."""
    net = Net(k, width, conv)
    shape = (BATCH, 3, 32, 32) if conv else (BATCH, IN_DIM)
    x, y = torch.randn(*shape), torch.randn(BATCH, k)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    shared = list(net.body.parameters())
    bal = tb.make("upgrad", k, jacobian_free=config == "free", record=False)

    def step() -> None:
        opt.zero_grad()
        losses = net(x, y)
        if config == "equal":
            torch.stack(losses).sum().backward()
        elif config == "loop":
            rows = []
            for i, loss in enumerate(losses):
                loss.backward(retain_graph=i < k - 1)
                rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
                for p in shared:
                    p.grad = None
            direction = torch.stack(rows).mean(0)
            offset = 0
            for p in shared:
                p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        else:
            bal.backward(losses, shared=net.body)
        opt.step()

    step()  # warm-up: allocator pools, gradients, optimizer state
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(statistics.median(times), (_status_kib("VmHWM") - base) / 1024)


def run(
    config: str, k: int, width: int, steps: int, threads: int, conv: bool
) -> tuple[float, float]:
    command = [sys.executable, __file__, "--child", config, "--tasks", str(k)]
    command += ["--width", str(width), "--steps", str(steps), "--threads", str(threads)]
    command += ["--trunk", "conv" if conv else "mlp"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds, mib = out.stdout.split()[-2:]
    return float(seconds), float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="10,40")
    parser.add_argument("--sizes", default="1,10,100", help="trunk sizes P, in millions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--max-j-gib", type=float, default=6.0)
    parser.add_argument(
        "--trunk",
        default="mlp",
        choices=["mlp", "conv"],
        help="conv: the ResNet-style trunk of gpu.py, --sizes its first-stage channels",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, int(args.tasks), args.width, args.steps, args.trunk == "conv")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    print("\n| K | P (M) | J (GiB) | config | ms / step | time / loop | extra peak MiB (/ loop) |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for k in (int(v) for v in args.tasks.split(",")):
        for size in (float(v) for v in args.sizes.split(",")):
            conv = args.trunk == "conv"
            width = int(size) if conv else width_for(size * 1e6)
            p = sum(t.numel() for t in Net(1, width, conv).body.parameters())
            jac_gib = k * p * 4 / 2**30
            if jac_gib > args.max_j_gib:
                print(f"| {k} | {p / 1e6:.1f} | {jac_gib:.1f} | (left out: J over --max-j-gib) |")
                continue
            rounds = [
                {c: run(c, k, width, args.steps, args.threads, conv) for c in CONFIGS}
                for _ in range(args.rounds)
            ]
            for c in CONFIGS:
                t = statistics.median(r[c][0] / r["loop"][0] for r in rounds)
                ms = statistics.median(r[c][0] for r in rounds) * 1e3
                mib = statistics.median(r[c][1] for r in rounds)
                mem = statistics.median(r[c][1] / max(r["loop"][1], 1e-9) for r in rounds)
                print(
                    f"| {k} | {p / 1e6:.1f} | {jac_gib:.2f} | {c} | {ms:.0f} | {t:.2f} | "
                    f"{mib:.0f} ({mem:.2f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
