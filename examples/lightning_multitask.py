"""Three regression tasks on one shared body, trained by PyTorch Lightning with UPGrad.

Run it (a few seconds on a CPU)::

    pip install 'taskbalance[lightning]'
    python examples/lightning_multitask.py                 # UPGrad, exact mode
    python examples/lightning_multitask.py --method dwa    # any registered method
    python examples/lightning_multitask.py --mode features --precision bf16-mixed
    python examples/lightning_multitask.py --devices 2 --strategy ddp        # DDP, 2 CPU ranks
    python examples/lightning_multitask.py --devices 2 --strategy ddp_spawn

The data are synthetic: ``y_t = a_t · x + noise_t`` with a different direction ``a_t`` and
noise level per task. The balancer's weights and the per-task losses are logged by
Lightning (``weight/<task>``, ``loss/<task>``) into ``runs/lightning_multitask/``
(a CSV file); the last ones are printed at the end.

Under DDP every rank trains on its part of each batch and the balancer keeps the ranks on
the same weights; the logged losses are the global ones the weights were computed from.
Lightning's DistributedSampler shuffles the training data (whatever the DataLoader's
``shuffle=``), so a DDP run sees other batches than a one-process run. With ``ddp_spawn``
the ranks run in child processes; the balancer's state comes back to this process with
the parameters, so the summary printed below is the trained one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import taskbalance as tb
from taskbalance.integrations.lightning import BalancerMixin, pl

TASKS = ("price", "demand", "risk")


def synthetic_data(n: int = 512, dim: int = 8, seed: int = 0) -> TensorDataset:
    """Inputs ``(n, dim)`` and one target column per task, with different noise levels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    directions = torch.randn(len(TASKS), dim, generator=gen)
    noise = torch.tensor([0.1, 0.5, 2.0])
    y = x @ directions.T + noise * torch.randn(n, len(TASKS), generator=gen)
    return TensorDataset(x, y)


class MultiTaskRegressor(BalancerMixin, pl.LightningModule):
    """A shared MLP body and one linear head per task; any balancer combines the losses."""

    def __init__(self, method: str = "upgrad", mode: str = "exact", lr: float = 1e-2) -> None:
        super().__init__()
        self.mode = mode
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in TASKS})
        options = {"weights": [1.0, 1.0, 1.0]} if method == "static" else {}
        self.balancer = tb.make(method, tasks=list(TASKS), **options)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        z = self.body(x)
        losses = {
            task: nn.functional.mse_loss(head(z).squeeze(-1).float(), y[:, i])
            for i, (task, head) in enumerate(self.heads.items())
        }
        context = {}
        if self.balancer.uses_kpi:  # DTP: a KPI in (0, 1] per task
            context["kpi"] = {t: float(torch.exp(-loss.detach())) for t, loss in losses.items()}
        if self.mode == "features":
            return self.balanced_step(losses, shared=self.body, features=z, **context)
        return self.balanced_step(losses, shared=self.body, **context)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="upgrad", choices=tb.list_methods())
    parser.add_argument("--mode", default="exact", choices=["exact", "features"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP if > 1)")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp, ddp_spawn")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_multitask"))
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    model = MultiTaskRegressor(args.method, args.mode)
    loader = DataLoader(synthetic_data(), batch_size=64, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        logger=pl.loggers.CSVLogger(args.out, name=args.method),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    if not trainer.is_global_zero:  # strategy="ddp": every rank runs this script
        return

    weights = model.balancer.history.weights[-1].tolist()
    losses = model.balancer.history.losses[-1].tolist()
    print(f"{args.method} ({args.mode}, {args.precision}): {model.balancer.steps} steps")
    for task, w, loss in zip(TASKS, weights, losses):
        print(f"  {task:7s} weight {w:.3f}  loss {loss:.4f}")
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
