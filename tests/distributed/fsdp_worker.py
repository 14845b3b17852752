"""Worker for ``test_engine_misuse.py``: FSDP2 (``fully_shard``) on two gloo ranks.

Run by ``python -m torch.distributed.run --nproc_per_node=2 fsdp_worker.py OUT_DIR``. Each
rank saves to ``OUT_DIR/rank{r}.pt``:

* ``refusals``: for each sharding (the whole model, each body layer then the model, body and
  heads then the model) and each gradient mode (exact, features, forked), the message of the
  error MGDA's ``backward`` raised (``"not refused"`` if it did not);
* ``gaps``: for GradNorm's features variant and DWA (a weighted loss, backpropagated by
  FSDP as usual) under FSDP2, the largest parameter difference after 4 SGD steps between
  the 2-rank run (4 samples per rank) and one process on the 8-sample global batch, and the
  difference between that reference and one process on this rank's 4 samples alone (a
  control: it must be large, or the comparison could not fail).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import taskbalance as tb

K, LOCAL, STEPS, LR = 3, 4, 4, 0.05


class Net(nn.Module):
    """A body and K heads; the forward computes the heads too (FSDP's hooks wrap it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(K))

    def forward(self, x: Tensor, fork: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        z = self.body(x)
        zs = tb.fork(z, K) if fork else [z] * K
        return z, zs, [h(zi).squeeze(-1) for h, zi in zip(self.heads, zs)]


def make(sharding: str | None) -> Net:
    net = Net()
    if sharding == "nested":
        fully_shard(net.body[0])
        fully_shard(net.body[2])
    elif sharding == "body+heads":
        fully_shard(net.body)
        for head in net.heads:
            fully_shard(head)
    if sharding is not None:
        fully_shard(net)
    return net


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2 * LOCAL, 5, generator=gen), torch.randn(K, 2 * LOCAL, generator=gen)


def losses(outputs: list[Tensor], y: Tensor) -> list[Tensor]:
    return [((o - t) ** 2).mean() for o, t in zip(outputs, y)]


def refusal(sharding: str, mode: str, x: Tensor, y: Tensor) -> str:
    net = make(sharding)
    z, zs, outputs = net(x, fork=mode == "forked")
    features = {"exact": None, "features": z, "forked": zs}[mode]
    try:
        tb.make("mgda", K).backward(
            losses(outputs, y), shared=net.body if mode == "exact" else None, features=features
        )
    except tb.BalancerUsageError as err:
        return str(err)
    return "not refused"


def train(net: Net, bal: tb.Balancer, x: Tensor, y: Tensor) -> list[Tensor]:
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        z, _, outputs = net(x)
        bal.backward(losses(outputs, y), features=z if bal.method_name == "gradnorm" else None)
        opt.step()
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in net.parameters()]


def gap(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = data()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    refusals = {
        f"{sharding} {mode}": refusal(sharding, mode, x[mine], y[:, mine])
        for sharding in ("root", "nested", "body+heads")
        for mode in ("exact", "features", "forked")
    }
    gaps = {}
    for method in ("gradnorm", "dwa"):
        for sharding in ("root", "nested"):
            ranks = train(make(sharding), tb.make(method, K), x[mine], y[:, mine])
            single = train(make(None), tb.make(method, K, distributed="local"), x, y)
            alone = train(make(None), tb.make(method, K, distributed="local"), x[mine], y[:, mine])
            gaps[f"{method} {sharding}"] = (gap(ranks, single), gap(alone, single))
    torch.save({"refusals": refusals, "gaps": gaps}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
