"""Worker for ``test_ddp.py``: every balancer inside DistributedDataParallel, in one launch.

Run by ``python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py OUT_DIR``: each
rank trains a fresh DDP-wrapped model with every configuration of :data:`CONFIGS` in turn,
on its half of a deterministic global batch, and saves the weights of every step and the
final parameters to ``OUT_DIR/rank{r}.pt``. The test imports :func:`run` to train the same
configurations in one process on the whole global batch, and compares.

A configuration is ``(method, mode, accumulation_steps, kwargs)``; ``mode`` is ``"loss"``
(``balancer(losses).backward()`` through DDP), ``"exact"`` (``shared=``), ``"features"``
(``features=z``) or ``"forked"`` (``features=tb.fork(z, K)``). ``seed="rank"`` gives every
rank a different seed (the balancer must broadcast rank 0's generator); ``ddp=`` picks
DDP's options: ``"find_unused"`` (``find_unused_parameters=True``), ``"static_graph"``, or
``"body_only"`` (only the shared body is wrapped, with ``find_unused_parameters=True``,
and the heads run outside DDP). :func:`controls`
are configurations with ``distributed="local"``, which must *not* match: they show that the
comparison can fail.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch import Tensor, nn

import taskbalance as tb

K = 3  # tasks
LOCAL = 4  # samples per rank and micro-batch
STEPS = 4
LR = 0.05

Config = tuple[str, str, int, dict[str, Any]]


def modes_of(method: str) -> tuple[str, ...]:
    """The modes to test for a registered method."""
    cls = tb.get(method)
    if cls.kind == "loss":
        return ("loss",)
    if method == "gradnorm":
        return ("exact", "features")
    modes = tuple(getattr(cls, "modes", ("exact", "features")))
    return modes + (("forked",) if "features" in modes else ())


def configs() -> list[Config]:
    """Every registered method in every mode, plus variants and accumulation."""
    out: list[Config] = [(m, mode, 1, {}) for m in tb.list_methods() for mode in modes_of(m)]
    out += [
        ("imtl", "exact", 1, {"variant": "hybrid"}),
        ("imtl", "features", 1, {"variant": "hybrid"}),
        ("pcgrad", "exact", 1, {"seed": "rank"}),
        ("gradvac", "exact", 1, {"seed": "rank"}),
        ("graddrop", "features", 1, {"seed": "rank"}),
        ("rlw", "loss", 1, {"seed": "rank"}),
        ("relobralo", "loss", 1, {"seed": "rank", "expected_rho": 0.5, "alpha": 0.5}),
        ("relobralo", "loss", 2, {"expected_rho": 0.5, "alpha": 0.5}),
        ("softadapt", "loss", 2, {"beta": 5.0}),
        ("stch", "loss", 1, {"warmup_periods": 1, "steps_per_period": 2}),
        ("stch", "loss", 2, {"warmup_periods": 1, "steps_per_period": 2, "mu": 0.5}),
        ("equal", "loss", 2, {}),
        ("uncertainty", "loss", 2, {}),
        ("dwa", "loss", 2, {"period": "step"}),
        ("cr_mogm", "loss", 2, {"inner": "dwa", "period": "step", "beta": 0.5}),
        ("cr_mogm", "exact", 2, {"inner": "upgrad"}),
        ("lr_annealing", "exact", 2, {"every": 2, "alpha": 0.5}),
        ("metabalance", "exact", 2, {"relax": 1.0}),
        ("moco", "exact", 2, {"rho": 0.1}),
        ("excess_mtl", "exact", 2, {"eta": 1.0}),
        ("upgrad", "features", 2, {}),
        ("mgda", "exact", 2, {}),
        ("pcgrad", "forked", 2, {}),
        ("upgrad", "exact", 1, {"ddp": "find_unused"}),
        ("uncertainty", "loss", 1, {"ddp": "find_unused"}),
        ("nash_mtl", "exact", 1, {"ddp": "static_graph"}),
        ("mgda", "features", 1, {"ddp": "body_only"}),
        ("upgrad", "forked", 2, {"ddp": "body_only"}),
        # objective sampling (K = 3): a subset of the tasks per step, the same on every rank
        ("sdmgrad_os", "exact", 1, {"n": 1, "seed": "rank"}),
        ("sdmgrad_os", "features", 2, {"n": 2}),
        ("sdmgrad_os", "forked", 1, {"n": 2}),
        ("m_config", "exact", 2, {}),
        ("m_config", "exact", 1, {"per_step": 2, "adaptive": False}),
        ("upgrad", "exact", 1, {"tasks_per_step": 2, "tasks_seed": "rank"}),
        ("nash_mtl", "features", 2, {"tasks_per_step": 2}),
        ("pcgrad", "forked", 1, {"tasks_per_step": 1}),
        # gradient diagnostics: from the Gramian the method used, the same on every rank
        ("mgda", "exact", 1, {"diagnostics": True}),
        ("upgrad", "features", 2, {"diagnostics": True}),
        ("graddrop", "features", 1, {"diagnostics": 2, "seed": "rank"}),
        # the exact mode without J: each layer's K gradients averaged before the Gramian
        ("upgrad", "exact", 1, {"jacobian_free": True}),
        ("nash_mtl", "exact", 2, {"jacobian_free": True}),
        ("mgda", "exact", 1, {"jacobian_free": True, "diagnostics": True}),
        ("upgrad", "exact", 1, {"jacobian_free": True, "wide": True}),
        ("nash_mtl", "exact", 2, {"jacobian_free": True, "wide": True}),
        ("mgda", "exact", 1, {"jacobian_free": "auto", "wide": True}),
        ("upgrad", "exact", 1, {"jacobian_free": True, "tasks_per_step": 2, "tasks_seed": "rank"}),
        # MoDo's double sampling: three independent batches per (micro-)step
        ("modo", "exact", 1, {"batches": 3, "gamma": 0.5}),
        ("modo", "exact", 2, {"batches": 3, "gamma": 0.5}),
    ]
    return out


def controls() -> list[Config]:
    """Configurations without synchronisation, which must differ from one process."""
    off = {"distributed": "local"}  # "off" is refused under a 2-rank group
    return [
        ("dwa", "loss", 1, off),
        ("uncertainty", "loss", 1, off),
        ("mgda", "exact", 1, off),
        ("upgrad", "features", 1, off),
        ("nash_mtl", "forked", 1, off),
        ("gradvac", "exact", 1, {**off, "seed": "rank"}),
    ]


def key(config: Config) -> str:
    method, mode, acc, kw = config
    extra = ",".join(f"{k}={v}" for k, v in sorted(kw.items()))
    return f"{method}/{mode}/acc{acc}/{extra}"


class Net(nn.Module):
    """A shared tanh layer and K linear heads; returns ``(features, outputs)``."""

    def __init__(self, forked: bool, wide: bool = False) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(7)
        # wide: a second layer with more weights than the global batch has rows, whose share
        # of the Gramian the mode without J takes from its input and output gradients
        self.body = (
            nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 6))
            if wide
            else nn.Linear(5, 6)
        )
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(K))
        torch.random.set_rng_state(gen_state)
        self.forked = forked

    def forward(self, x: Tensor, body: nn.Module | None = None) -> tuple[Any, list[Tensor]]:
        z = torch.tanh((body or self.body)(x))
        if self.forked:
            zs = tb.fork(z, K)
            return zs, [h(zi).squeeze(-1) for h, zi in zip(self.heads, zs)]
        return z, [h(z).squeeze(-1) for h in self.heads]


def global_batch(step: int, micro: int, size: int) -> tuple[Tensor, Tensor]:
    """The global (micro-)batch ``(x (size, 5), y (size, K))``, a pure function of its index."""
    gen = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(size, 5, generator=gen)
    y = torch.stack([(i + 1) * x[:, i] + 0.5 * i for i in range(K)], dim=1)
    return x, y + 0.3 * torch.randn(size, K, generator=gen)


def kpi(outs: list[Tensor], y: Tensor) -> Tensor:
    """A KPI in (0, 1] that is a mean over samples (so the ranks' mean is the global one)."""
    return torch.stack([torch.exp(-((o - y[:, i]) ** 2)).mean() for i, o in enumerate(outs)])


def run(config: Config, rank: int, world: int) -> dict[str, Tensor]:
    """Train ``config`` for :data:`STEPS` steps; ``world == 1`` is the single-process run."""
    method, mode, acc, kw = config
    kw = dict(kw)
    wrap = kw.pop("ddp", "default")
    batches = kw.pop("batches", 1)  # MoDo: losses of 3 independent batches per call
    wide = kw.pop("wide", False)  # a two-layer body (Net)
    if method == "static":
        kw["weights"] = [0.5, 1.0, 2.0]
    if kw.get("seed") == "rank":
        kw["seed"] = rank  # rank 0's generator state is broadcast: same draws everywhere
    if kw.get("tasks_seed") == "rank":
        kw["tasks_seed"] = rank  # the same: rank 0's seed draws the tasks_per_step subsets
    bal = tb.make(method, K, accumulation_steps=acc, **kw)
    net = Net(forked=mode == "forked", wide=wide)
    model: Any = net
    if world > 1 and wrap == "body_only":
        body = nn.parallel.DistributedDataParallel(net.body, find_unused_parameters=True)
        model = lambda x: net(x, body=body)  # noqa: E731
    elif world > 1:
        options = {"find_unused": {"find_unused_parameters": True}}.get(wrap, {})
        options.update({"static_graph": {"static_graph": True}}.get(wrap, {}))
        model = nn.parallel.DistributedDataParallel(net, **options)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    weights = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for micro in range(acc):
            x, y = global_batch(step, micro, LOCAL * world if world > 1 else LOCAL * 2)
            if world > 1:
                x, y = x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]
            last = micro == acc - 1
            sync_ctx = contextlib.nullcontext()
            if world > 1 and mode == "loss" and not last:
                sync_ctx = model.no_sync()  # DDP's own accumulation for ordinary backwards
            if world > 1 and mode != "loss" and kw.get("distributed") == "local":
                sync_ctx = model.no_sync()  # the plain engine's backward would trip DDP
            with sync_ctx:
                z, outs = model(x)
                losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
                ctx = {"kpi": kpi(outs, y).detach()} if method == "dtp" else {}
                if mode == "loss":
                    bal(losses, **ctx).backward()
                elif mode == "exact" and batches == 3:
                    sets = []
                    for extra in (50, 60):  # batches a and b, then this one (c)
                        part = slice(rank * len(x), (rank + 1) * len(x))
                        xe, ye = global_batch(step + extra, micro, len(x) * world)
                        outs_e = model(xe[part])[1]
                        sets.append([((o - ye[part, i]) ** 2).mean() for i, o in enumerate(outs_e)])
                    bal.backward([*sets, losses], shared=net.body.parameters())
                elif mode == "exact":
                    bal.backward(losses, shared=net.body.parameters(), **ctx)
                else:
                    bal.backward(losses, shared=net.body.parameters(), features=z, **ctx)
            weights.append(bal.last_weights.detach().clone())
        opt.step()
        if method == "famo":
            with torch.no_grad():
                _, outs = net(x)
                bal.update([((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)])
        bal.end_period()
    out = {f"param/{n}": p.detach().clone() for n, p in net.named_parameters()}
    out["weights"] = torch.stack(weights)
    out["steps"] = torch.tensor(bal.steps)
    if kw.get("diagnostics"):
        out.update({n: bal.history.extra(n) for n in bal.history.extra_names})
    return out


def main(out_dir: str) -> None:
    """Run every configuration on this rank; save the results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for config in configs() + controls():
        print(f"rank {rank}: {key(config)}", file=sys.stderr, flush=True)  # names a failure
        results[key(config)] = run(config, rank, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
