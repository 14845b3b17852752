"""Worker for ``test_engine_misuse.py``: FSDP2 (``fully_shard``) on two gloo ranks.

Run by ``python -m torch.distributed.run --nproc_per_node=2 fsdp_worker.py OUT_DIR``. Each
rank saves to ``OUT_DIR/rank{r}.pt``:

* ``refusals``: the message of the error MGDA's ``backward`` raised (``"not refused"`` if it
  did not) for each sharding with the heads inside FSDP (the whole model, each body layer
  then the model, body and heads then the model) in the exact, features and forked modes,
  and for the body sharded alone with ``distributed="local"`` (the exact mode on a body
  sharded alone works: ``fsdp_exact_worker.py``);
* ``gaps``: the largest parameter difference after 4 SGD steps between the 2-rank run
  (4 samples per rank) and one process on the 8-sample global batch, and the difference
  between that reference and one process on this rank's 4 samples alone (a control: it
  must be large, or the comparison could not fail). For GradNorm's features variant and
  DWA (a weighted loss, backpropagated by FSDP as usual) with the whole model sharded and
  with nested sharding, and for MGDA, UPGrad and Nash-MTL in the features and forked modes
  with the body sharded (each layer, then the body) and the heads outside it;
  Also MGDA in the forked mode with ``accumulation_steps=2`` (:func:`accumulated`);
* ``weights``: for MGDA, UPGrad and Nash-MTL, the weights of the 4 steps (to compare across
  the ranks).
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
    if sharding in ("nested", "body"):
        fully_shard(net.body[0])
        fully_shard(net.body[2])
    if sharding == "body":
        fully_shard(net.body)  # the heads stay plain (replicated) modules
        return net
    if sharding == "body+heads":
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


def refusal(sharding: str, mode: str, x: Tensor, y: Tensor, setting: str = "auto") -> str:
    net = make(sharding)
    z, zs, outputs = net(x, fork=mode == "forked")
    features = {"exact": None, "features": z, "forked": zs}[mode]
    try:
        tb.make("mgda", K, distributed=setting).backward(
            losses(outputs, y), shared=net.body if mode == "exact" else None, features=features
        )
    except tb.BalancerUsageError as err:
        return str(err)
    return "not refused"


def train(
    net: Net, bal: tb.Balancer, x: Tensor, y: Tensor, mode: str | None = None
) -> tuple[list[Tensor], Tensor]:
    """Parameters (full tensors) after STEPS SGD steps, and the weights of each step.
    ``mode``: ``"features"``, ``"forked"``, or ``None`` (a loss method; GradNorm on z)."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    weights = []
    for _ in range(STEPS):
        opt.zero_grad()
        z, zs, outputs = net(x, fork=mode == "forked")
        features = zs if mode == "forked" else z
        if mode is None and bal.method_name != "gradnorm":
            features = None
        weights.append(bal.backward(losses(outputs, y), features=features))
        opt.step()
    params = [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in net.parameters()
    ]
    return params, torch.stack(weights)


def gap(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


def compare(method: str, sharding: str, mode: str | None, x: Tensor, y: Tensor, rank: int):
    """``((gap to one process on the global batch, control), the ranks' weights)``."""
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    ranks, weights = train(make(sharding), tb.make(method, K), x[mine], y[:, mine], mode)
    single, _ = train(make(None), tb.make(method, K, distributed="local"), x, y, mode)
    local = tb.make(method, K, distributed="local")
    alone, _ = train(make(None), local, x[mine], y[:, mine], mode)
    return (gap(ranks, single), gap(alone, single)), weights


def accumulated(x: Tensor, y: Tensor, rank: int) -> tuple[float, float]:
    """MGDA in the forked mode with ``accumulation_steps=2`` (2 micro-batches of 2 samples
    per rank) against one process whose micro-batch j joins the ranks' micro-batches j:
    ``(gap, control)`` as in :func:`compare`."""

    def run(net: Net, bal: tb.Balancer, parts: list[Tensor]) -> list[Tensor]:
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        for _ in range(STEPS):
            opt.zero_grad()
            for rows in parts:
                _, zs, outputs = net(x[rows], fork=True)
                bal.backward(losses(outputs, y[:, rows]), features=zs)
            opt.step()
        return [
            p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in net.parameters()
        ]

    def rows(r: int, j: int) -> Tensor:
        return torch.arange(r * LOCAL + 2 * j, r * LOCAL + 2 * j + 2)

    mine = [rows(rank, j) for j in range(2)]
    joined = [torch.cat([rows(0, j), rows(1, j)]) for j in range(2)]
    ranks = run(make("body"), tb.make("mgda", K, accumulation_steps=2), mine)
    local = {"accumulation_steps": 2, "distributed": "local"}
    single = run(make(None), tb.make("mgda", K, **local), joined)
    alone = run(make(None), tb.make("mgda", K, **local), mine)
    return gap(ranks, single), gap(alone, single)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = data()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    refusals = {
        f"{sharding} exact": refusal(sharding, "exact", x[mine], y[:, mine])
        for sharding in ("root", "nested", "body+heads")
    }
    for sharding in ("root", "nested", "body+heads"):
        for mode in ("features", "forked"):
            refusals[f"{sharding} {mode}"] = refusal(sharding, mode, x[mine], y[:, mine])
    refusals["body local"] = refusal("body", "features", x[mine], y[:, mine], "local")
    gaps, weights = {}, {}
    for method in ("gradnorm", "dwa"):
        for sharding in ("root", "nested"):
            gaps[f"{method} {sharding}"], _ = compare(method, sharding, None, x, y, rank)
    for method in ("mgda", "upgrad", "nash_mtl"):
        for mode in ("features", "forked"):
            key = f"{method} {mode}"
            gaps[key], weights[key] = compare(method, "body", mode, x, y, rank)
    gaps["mgda forked accumulated"] = accumulated(x, y, rank)
    torch.save({"refusals": refusals, "gaps": gaps, "weights": weights}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
