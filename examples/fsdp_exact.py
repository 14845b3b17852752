"""The exact mode of a gradient method (``balancer.backward(losses, shared=net.body)``) on a
body sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Run it on two CPU processes (gloo; on GPUs the NCCL backend is used)::

    torchrun --nproc_per_node=2 examples/fsdp_exact.py                    # UPGrad
    torchrun --nproc_per_node=2 examples/fsdp_exact.py --method nash_mtl
    torchrun --nproc_per_node=2 examples/fsdp_exact.py --accumulation-steps 2
    python examples/fsdp_exact.py                                          # one process

What it shows (see docs/scaling.md, "FSDP (fully_shard)"):

* each Linear of the body is sharded, then the body; the heads stay plain modules,
  replicated on every rank (the same seed everywhere);
* ``balancer.backward(losses, shared=net.body)`` runs one ordinary backward per task,
  which FSDP all-gathers and reduce-scatters as usual: each rank keeps its shard of every
  task's gradient, the K×K Gramian of the shards is summed over the ranks (one all-reduce
  of K² + K numbers), every rank takes the same weights, and the sharded ``.grad`` gets
  this rank's shard of ``d = wᵀJ``; the heads' gradients are averaged by the balancer;
* every rank trains on its own slice of each global batch; at the end rank 0 trains the
  same model unsharded, in one process, on the global batches and prints the largest
  parameter difference (float32 rounding), and the ranks' last weights are compared.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import taskbalance as tb

TASKS = ["a", "b", "c"]


class Net(nn.Module):
    """A shared body and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same body and heads on every rank
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.body(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def batches(steps: int, size: int) -> list[tuple[Tensor, Tensor]]:
    """``steps`` global batches of a synthetic 3-task regression (the same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, len(TASKS), generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(size, 16, generator=gen)
        y = torch.tanh(x @ mix).T + 0.1 * torch.randn(len(TASKS), size, generator=gen)
        out.append((x, y))
    return out


def train(
    net: Net, balancer: tb.Balancer, data: list[tuple[Tensor, Tensor]], micro: int
) -> list[Tensor]:
    """SGD on ``data`` (each batch cut into ``micro`` micro-batches); the full parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro, dim=1)):
            out = net(xs)
            losses = {t: ((out[t] - ys[i]) ** 2).mean() for i, t in enumerate(TASKS)}
            balancer.backward(losses, shared=net.body)  # exact mode: the body's J, sharded
        opt.step()
    return [
        p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        for p in net.parameters()
    ]


def interleave(x: Tensor, y: Tensor, world: int, micro: int) -> tuple[Tensor, Tensor]:
    """The global batch reordered so that its micro-batch j is the ranks' micro-batches j."""
    xs = [part.chunk(micro) for part in x.chunk(world)]
    ys = [part.chunk(micro, dim=1) for part in y.chunk(world, dim=1)]
    order = [(r, j) for j in range(micro) for r in range(world)]
    return torch.cat([xs[r][j] for r, j in order]), torch.cat([ys[r][j] for r, j in order], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="upgrad")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    args = parser.parse_args()
    if "RANK" not in os.environ:  # plain `python`: a process group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.update(RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(args.steps, args.batch_size * world)
    mine = [(x.chunk(world)[rank], y.chunk(world, dim=1)[rank]) for x, y in data]

    net = Net()
    fully_shard(net.body[0])
    fully_shard(net.body[2])
    fully_shard(net.body)  # the body only: the heads stay out of it
    options = {"accumulation_steps": args.accumulation_steps}
    balancer = tb.make(args.method, TASKS, **options)
    sharded = train(net, balancer, mine, args.accumulation_steps)

    last = balancer.last_weights
    gathered = [torch.empty_like(last) for _ in range(world)]
    dist.all_gather(gathered, last)
    if rank == 0:
        same = all(torch.equal(w, gathered[0]) for w in gathered)
        print(
            f"{args.method}: last weights {[round(float(w), 4) for w in last]}, "
            f"identical on the {world} ranks: {same}"
        )
        # one process, unsharded, on the global batches (micro-batch j joins the ranks'
        # micro-batches j, as the ranks' accumulated step does)
        joined = [interleave(x, y, world, args.accumulation_steps) for x, y in data]
        local = tb.make(args.method, TASKS, distributed="local", **options)
        single = train(Net(), local, joined, args.accumulation_steps)
        gap = max(float((p - q).abs().max()) for p, q in zip(sharded, single))
        print(f"largest parameter difference to one process on the global batch: {gap:.1e}")
    dist.barrier()  # rank 0's reference run done before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
