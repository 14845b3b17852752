"""Worker for ``test_fsdp_exact.py``: the exact mode (``shared=``) under FSDP2 on two gloo ranks.

Run by ``python -m torch.distributed.run --nproc_per_node=2 fsdp_exact_worker.py OUT_DIR``.
The body is sharded with ``fully_shard`` (each Linear, then the body; ``"body"``: the body
alone), the heads are plain modules. Each rank saves to ``OUT_DIR/rank{r}.pt``:

* ``gaps``: ``(gap, control)`` per configuration: the largest parameter difference after 4
  SGD steps between the 2-rank run (4 samples per rank) and one process on the 8-sample
  global batch, and between that reference and one process on this rank's 4 samples alone
  (the control: large, or the comparison could not fail). Configurations: DWA (a loss
  method, ``shared=`` given), MGDA, UPGrad and Nash-MTL in the exact mode; UPGrad on the
  body sharded alone, with ``task_specific="weighted"``, with ``tasks_per_step=2``, and on
  top of gradients already in ``.grad`` (an ordinary backward before the balancer's);
  MGDA with ``accumulation_steps=2``, MGDA with ``diagnostics=1`` and DWA with
  ``diagnostics=1`` (the task Gramian of a loss method, heads inside ``fully_shard``); the
  Jacobian methods (J all-gathered in the unsharded model's column order; the second
  Linear's 7 rows split 4 + 3, uneven): GradDrop (its uniforms drawn per column), DB-MTL,
  MoCo, LR annealing's ``"code"`` variant (per-tensor statistics) and M-ConFIG, GradDrop
  on the body sharded alone and with a weight sharded along its columns, DB-MTL with
  ``accumulation_steps=2`` and GradDrop with ``diagnostics=1``;
* ``weights``: the weights of the 4 steps of each configuration (compared across ranks);
* ``diagnostics``: MGDA's, DWA's and GradDrop's ``last_diagnostics`` on two ranks and in
  the reference;
* ``refusals``: the message of the error raised (``"not refused"`` if none) for MoDo (a
  step of its own), ``jacobian_free=True``, heads inside ``fully_shard`` (the whole model
  sharded), gradient
  sync turned off on the body, ``distributed="local"``, a body sharded over a 2-D mesh
  (HSDP), and a balancer synchronising a group of one rank while FSDP shards over two.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import taskbalance as tb

K, LOCAL, STEPS, LR = 3, 4, 4, 0.05


class Net(nn.Module):
    """A body and K heads (the forward computes both)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 7))
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(K))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.body(x)
        return [h(z).squeeze(-1) for h in self.heads]


def make(sharding: str | None) -> Net:
    """``"layers"``: each Linear of the body, then the body; ``"body"``: the body alone;
    ``"columns"``: the body alone, the second Linear's weight (7×8) sharded along its
    columns (dim 1, FSDP's ``shard_placement_fn``); ``"root"``: the layers, then the whole
    model (heads inside FSDP); ``None``: plain."""
    net = Net()
    if sharding == "columns":
        from torch.distributed.tensor import Shard

        fully_shard(net.body, shard_placement_fn=lambda p: Shard(1) if p.shape == (7, 8) else None)
    if sharding in ("layers", "root"):
        fully_shard(net.body[0])
        fully_shard(net.body[2])
    if sharding in ("layers", "body"):
        fully_shard(net.body)
    if sharding == "root":
        fully_shard(net)
    return net


def hybrid() -> Net:
    """The body sharded over a 2-D mesh (HSDP: 1 replica of 2 shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    net = Net()
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    fully_shard(net.body, mesh=mesh)
    return net


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2 * LOCAL, 5, generator=gen), torch.randn(K, 2 * LOCAL, generator=gen)


def losses(outputs: list[Tensor], y: Tensor) -> list[Tensor]:
    return [((o - t) ** 2).mean() for o, t in zip(outputs, y)]


def full(net: Net) -> list[Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in net.parameters()]


def train(
    net: Net, bal: tb.Balancer, parts: list[tuple[Tensor, Tensor]], before: bool = False
) -> tuple[list[Tensor], Tensor]:
    """Parameters after STEPS SGD steps (one balancer call per micro-batch of ``parts``) and
    the weights of each step. ``before``: an ordinary backward of half the summed losses
    first, whose gradients the balancer must add to."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    weights = []
    for _ in range(STEPS):
        opt.zero_grad()
        for x, y in parts:
            if before:
                (0.5 * sum(losses(net(x), y))).backward()
            w = bal.backward(losses(net(x), y), shared=net.body)
        weights.append(w)
        opt.step()
    return full(net), torch.stack(weights)


def gap(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


def compare(
    method: str, x: Tensor, y: Tensor, rank: int, sharding: str = "layers", **options: Any
) -> tuple[tuple[float, float], Tensor, tb.Balancer, tb.Balancer]:
    """``((gap, control), the ranks' weights, the 2-rank balancer, the reference's)``."""
    before = options.pop("before", False)
    micro = options.get("accumulation_steps", 1)

    def parts(rows: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        return [(x[r], y[:, r]) for r in rows]

    size = LOCAL // micro
    mine = [
        torch.arange(rank * LOCAL + j * size, rank * LOCAL + (j + 1) * size) for j in range(micro)
    ]
    joined = [
        torch.cat([torch.arange(r * LOCAL + j * size, r * LOCAL + (j + 1) * size) for r in (0, 1)])
        for j in range(micro)
    ]
    bal = tb.make(method, K, **options)
    ranks, weights = train(make(sharding), bal, parts(mine), before)
    reference = tb.make(method, K, distributed="local", **options)
    single, _ = train(make(None), reference, parts(joined), before)
    alone, _ = train(
        make(None), tb.make(method, K, distributed="local", **options), parts(mine), before
    )
    return (gap(ranks, single), gap(alone, single)), weights, bal, reference


def refusal(x: Tensor, y: Tensor, method: str, sharding: str, **options: Any) -> str:
    net = make(sharding) if sharding != "hsdp" else hybrid()
    if options.pop("no_sync", False):
        net.body.set_requires_gradient_sync(False)
    try:
        tb.make(method, K, **options).backward(losses(net(x), y), shared=net.body)
    except tb.BalancerUsageError as err:
        return str(err)
    return "not refused"


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = data()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    gaps, weights = {}, {}
    configs: dict[str, tuple[str, dict[str, Any]]] = {
        "dwa": ("dwa", {"sharding": "root"}),  # an ordinary backward: heads sharded too
        "mgda": ("mgda", {}),
        "upgrad": ("upgrad", {}),
        "nash_mtl": ("nash_mtl", {}),
        "upgrad body": ("upgrad", {"sharding": "body"}),
        "upgrad weighted": ("upgrad", {"task_specific": "weighted"}),
        "upgrad sampled": ("upgrad", {"tasks_per_step": 2}),
        "upgrad before": ("upgrad", {"before": True}),
        "mgda accumulated": ("mgda", {"accumulation_steps": 2}),
        "mgda diagnostics": ("mgda", {"diagnostics": 1}),
        "dwa diagnostics": ("dwa", {"sharding": "root", "diagnostics": 1}),
        "graddrop": ("graddrop", {}),
        "db_mtl": ("db_mtl", {}),
        "moco": ("moco", {}),
        "lr_annealing": ("lr_annealing", {"variant": "code"}),
        "m_config": ("m_config", {}),
        "graddrop body": ("graddrop", {"sharding": "body"}),
        "graddrop columns": ("graddrop", {"sharding": "columns"}),
        "db_mtl accumulated": ("db_mtl", {"accumulation_steps": 2}),
        "graddrop diagnostics": ("graddrop", {"diagnostics": 1}),
    }
    diagnostics = {}
    for key, (method, options) in configs.items():
        gaps[key], weights[key], bal, reference = compare(method, x, y, rank, **options)
        if "diagnostics" in options:
            diagnostics[key] = {"ranks": bal.last_diagnostics, "single": reference.last_diagnostics}
    refusals = {
        "modo": refusal(x[mine], y[:, mine], "modo", "layers"),
        "jacobian free": refusal(x[mine], y[:, mine], "upgrad", "layers", jacobian_free=True),
        "root": refusal(x[mine], y[:, mine], "mgda", "root"),
        "no sync": refusal(x[mine], y[:, mine], "mgda", "layers", no_sync=True),
        "local": refusal(x[mine], y[:, mine], "mgda", "layers", distributed="local"),
        "hsdp": refusal(x[mine], y[:, mine], "mgda", "hsdp"),
    }
    alone = [dist.new_group([0]), dist.new_group([1])]  # every rank makes both
    refusals["group"] = refusal(x[mine], y[:, mine], "mgda", "layers", distributed=alone[rank])
    result = {"gaps": gaps, "weights": weights, "diagnostics": diagnostics, "refusals": refusals}
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
