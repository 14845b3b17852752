"""Worker for ``test_lightning_ddp.py``: ``BalancerMixin`` under Lightning's DDP on 2 CPU ranks.

Two ways to run it, each writing its results under ``OUT_DIR``:

* ``python -m torch.distributed.run --nproc_per_node=2 lightning_ddp_worker.py ddp OUT_DIR``:
  each rank fits every case of :data:`CASES` with ``Trainer(accelerator="cpu", devices=2,
  strategy="ddp")`` (gloo) on its half of every global batch, resumes DWA from a checkpoint
  that rank 0 wrote after 2 epochs, checks that ``distributed="off"`` is refused under
  Lightning and in a plain loop, and saves ``rank{r}.pt``;
* ``python lightning_ddp_worker.py ddp_fork OUT_DIR`` (or ``ddp_spawn``): one fit whose 2
  ranks run in child processes; rank 0's balancer at the end of its fit
  (``spawn-rank0.pt``) and, in the launching process, what the balancer holds afterwards
  (``spawn.pt``). Both strategies use Lightning's ``_MultiProcessingLauncher``, which
  hands rank 0's ``state_dict()`` back; ``ddp_fork`` starts in a second instead of
  re-importing Lightning in every rank.

The test imports :func:`plain_run` to train the same cases in one process on the whole
global batches, and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import taskbalance as tb
from taskbalance.errors import BalancerUsageError
from taskbalance.integrations.lightning import BalancerMixin

TASKS = ("a", "b", "c")
WORLD = 2
EPOCHS = 3  # DWA's weights leave 1 in the third epoch
BATCHES = 4  # global batches per epoch
GLOBAL = 8  # samples per global batch (4 per rank)
LR = 0.05
RESUME_AT = 2  # epochs trained before the checkpoint that DWA resumes from

#: name -> (method, mode, balancer options). ``local`` must *not* match one process.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dwa": ("dwa", "loss", {}),
    "upgrad-exact": ("upgrad", "exact", {}),
    "mgda-features": ("mgda", "features", {}),
    "mgda-exact-local": ("mgda", "exact", {"distributed": "local"}),
}


class Net(nn.Module):
    """A two-layer tanh body and one linear head per task, the same weights everywhere."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        z = self.body(x)
        losses = {
            task: nn.functional.mse_loss(head(z).squeeze(-1), y[:, i])
            for i, (task, head) in enumerate(zip(TASKS, self.heads))
        }
        return losses, z

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()])


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * GLOBAL, 5, generator=gen)
    directions = torch.randn(len(TASKS), 5, generator=gen)
    noise = torch.tensor([0.1, 0.5, 1.0])
    y = x @ directions.T + noise * torch.randn(BATCHES * GLOBAL, len(TASKS), generator=gen)
    return TensorDataset(x, y)


def rank_loader(rank: int) -> DataLoader:
    """This rank's half of every global batch, in order: an explicit DistributedSampler
    with ``shuffle=False`` (Lightning's own would shuffle, whatever the DataLoader says)."""
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=GLOBAL // WORLD, sampler=sampler)


def make(method: str, **options: Any) -> tb.Balancer:
    return tb.make(method, tasks=list(TASKS), **options)


def optimizer_and_scheduler(params: Any) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def plain_run(name: str, epochs: int = EPOCHS) -> dict[str, torch.Tensor]:
    """One process, the whole global batches, a plain PyTorch loop (no Lightning)."""
    method, mode, options = CASES[name]
    net = Net()
    bal = make(method, **options)
    opt, sched = optimizer_and_scheduler(net.parameters())
    for _ in range(epochs):
        for x, y in DataLoader(dataset(), batch_size=GLOBAL, shuffle=False):
            opt.zero_grad()
            losses, z = net.losses(x, y)
            features = z if mode == "features" else None
            bal.backward(losses, shared=net.body, features=features)
            opt.step()
            sched.step()
        bal.end_period()
    assert bal.history is not None
    return {"weights": bal.history.weights, "losses": bal.history.losses, "params": net.flat()}


class MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call in memory (on every rank: no rank-zero filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def series(self, key: str) -> torch.Tensor:
        return torch.tensor([m[key] for m in self.rows if key in m], dtype=torch.float64)


class MultiTask(BalancerMixin, pl.LightningModule):
    """The tiny module: ``balanced_step`` in exact, features or loss mode."""

    def __init__(self, name: str) -> None:
        super().__init__()
        method, mode, options = CASES[name]
        self.net = Net()
        self.mode = mode
        self.balancer = make(method, **options)
        self.returned: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        losses, z = self.net.losses(x, y)
        if self.mode == "features":
            total = self.balanced_step(losses, features=z)
        else:
            total = self.balanced_step(losses, shared=self.net.body)
        if total is not None:
            self.returned.append(float(total))
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = optimizer_and_scheduler(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(strategy: str, epochs: int = EPOCHS, **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": WORLD,
        "strategy": strategy,
        "logger": MemoryLogger(),
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(options)
    return pl.Trainer(**settings)


def outcome(module: MultiTask, fit: pl.Trainer) -> dict[str, torch.Tensor]:
    """What a rank saw: the balancer's history, the logged values, the parameters."""
    history = module.balancer.history
    assert history is not None
    logger = fit.logger
    assert isinstance(logger, MemoryLogger)
    logged = {
        f"logged/{kind}/{task}": logger.series(f"{kind}/{task}")
        for kind in ("weight", "loss")
        for task in TASKS
    }
    return {
        "weights": history.weights,
        "losses": history.losses,
        "params": module.net.flat(),
        "global_step": torch.tensor(fit.global_step),
        "logged/weighted_loss": logger.series("weighted_loss"),
        "returned": torch.tensor(module.returned, dtype=torch.float64),
        **logged,
    }


def refusal(call: Any) -> str:
    """The message of the BalancerUsageError that ``call()`` raises ('' if none)."""
    try:
        call()
    except BalancerUsageError as err:
        return str(err)
    return ""


def plain_loop_refusals() -> dict[str, Any]:
    """``distributed="off"`` in a plain loop under the 2-rank group: refused for a loss
    method and a gradient method; ``"local"`` trains each rank on its own losses."""
    rank = dist.get_rank()
    net = Net()
    x, y = dataset().tensors
    mine = slice(rank * GLOBAL, (rank + 1) * GLOBAL)  # different data on each rank

    def losses() -> dict[str, torch.Tensor]:
        return net.losses(x[mine], y[mine])[0]

    off_loss = refusal(lambda: make("dwa", distributed="off")(losses()))
    off_grad = refusal(lambda: make("mgda", distributed="off").backward(losses(), shared=net.body))
    weights = make("mgda", distributed="local").backward(losses(), shared=net.body)
    return {"off_loss": off_loss, "off_grad": off_grad, "local_weights": weights}


def run_ddp(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {}
    for name in CASES:
        module = MultiTask(name)
        fit = trainer("ddp")
        fit.fit(module, rank_loader(rank))
        results[name] = outcome(module, fit)

    # resume: rank 0 writes the checkpoint after RESUME_AT epochs; both ranks load it
    first = MultiTask("dwa")
    fit = trainer("ddp", epochs=RESUME_AT)
    fit.fit(first, rank_loader(rank))
    path = out / "dwa-mid.ckpt"
    fit.save_checkpoint(path)
    resumed = MultiTask("dwa")
    refit = trainer("ddp")
    refit.fit(resumed, rank_loader(rank), ckpt_path=path)
    results["dwa-resumed"] = outcome(resumed, refit)

    results["plain"] = plain_loop_refusals()
    off = MultiTask("dwa")
    off.balancer = make("dwa", distributed="off")
    results["lightning_off"] = refusal(lambda: trainer("ddp").fit(off, rank_loader(rank)))
    torch.save(results, out / f"rank{rank}.pt")


class Reporting(MultiTask):
    """Rank 0 saves what its balancer holds at the end of the fit (in the worker)."""

    def __init__(self, name: str, out: Path) -> None:
        super().__init__(name)
        self.out = out

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.trainer.is_global_zero:
            torch.save(balancer_state(self), self.out / "spawn-rank0.pt")


def balancer_state(module: MultiTask) -> dict[str, torch.Tensor]:
    history = module.balancer.history
    assert history is not None
    return {
        "steps": torch.tensor(module.balancer.steps),
        "weights": history.weights,
        "params": module.net.flat(),
    }


def run_spawn(out: Path, strategy: str) -> None:
    """``strategy`` ``"ddp_fork"`` or ``"ddp_spawn"``: the ranks train in child processes;
    afterwards, the balancer of the launching process (``spawn.pt``) and that of rank 0 at
    the end of its fit (``spawn-rank0.pt``)."""
    torch.set_num_threads(1)
    module = Reporting("upgrad-exact", out)
    loader = DataLoader(dataset(), batch_size=GLOBAL // WORLD, shuffle=False)
    trainer(strategy).fit(module, loader)
    torch.save(balancer_state(module), out / "spawn.pt")


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        run_ddp(Path(sys.argv[2]))
    else:
        run_spawn(Path(sys.argv[2]), strategy=sys.argv[1])
