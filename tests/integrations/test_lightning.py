"""The PyTorch Lightning integration (:mod:`taskbalance.integrations.lightning`).

A tiny LightningModule with :class:`BalancerMixin` trains on CPU and must give exactly
what a plain PyTorch loop with the same balancer, optimizer, scheduler, seed and batches
gives (parameters to 1e-6, which makes every check below able to fail): loss-weighting
methods (DWA with its epoch periods, uncertainty weighting with its own optimizer) and
gradient methods (UPGrad exact mode, MGDA representation mode). The weights and losses
are read back from the logger; a checkpoint saved mid-run and resumed continues exactly;
bf16-mixed and fp16-mixed (with a GradScaler) precision are checked against plain
autocast / float32 loops. ``import taskbalance`` never imports Lightning.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import taskbalance as tb
from conftest import memory_logger
from taskbalance.errors import BalancerUsageError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is in the dev extra
    pl = None

needs_lightning = pytest.mark.skipif(pl is None, reason="needs taskbalance[lightning]")
# Lightning's own deprecation noise, unrelated to taskbalance
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")

TASKS = ("a", "b", "c")
EPOCHS = 4
BATCHES = 4  # per epoch
BATCH = 8
LR = 0.05


# ---------------------------------------------------------------------- optional import
def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_taskbalance_does_not_import_lightning() -> None:
    result = _run_python(
        """
        import sys
        import taskbalance
        import taskbalance.integrations
        loaded = [m for m in sys.modules
                  if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")]
        print(loaded)
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_lightning_raises_an_import_error_with_the_install_hint() -> None:
    result = _run_python(
        """
        import sys
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        try:
            import taskbalance.integrations.lightning
        except ImportError as err:
            print(err)
        else:
            raise SystemExit("no ImportError")
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pip install 'taskbalance[lightning]'" in result.stdout


# ---------------------------------------------------------------------- shared pieces
class Net(nn.Module):
    """Shared two-layer body (tanh) and one linear head per task, deterministic weights."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def losses(
        self, x: torch.Tensor, y: torch.Tensor, float_features: bool = False
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """Per-task MSE (float32) and z; ``float_features``: the heads get ``z.float()``
        (the fp16 representation-mode recipe: a float32 Jacobian and Gramian)."""
        z = self.body(x)
        if float_features:
            z = z.float()
        losses = {
            task: nn.functional.mse_loss(head(z).squeeze(-1).float(), y[:, i])
            for i, (task, head) in enumerate(zip(TASKS, self.heads))
        }
        return losses, z

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()])


def loader() -> DataLoader:
    """BATCHES batches of BATCH samples, in a fixed order (no shuffling)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 5, generator=gen)
    directions = torch.randn(len(TASKS), 5, generator=gen)
    noise = torch.tensor([0.1, 0.5, 1.0])
    y = x @ directions.T + noise * torch.randn(BATCHES * BATCH, len(TASKS), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def make(method: str, **kw: Any) -> tb.Balancer:
    if method == "static":
        kw.setdefault("weights", [0.5, 1.0, 2.0])
    return tb.make(method, tasks=list(TASKS), **kw)


def context(bal: tb.Balancer, losses: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DTP's KPIs in (0, 1] (a deterministic function of the losses); nothing for others."""
    if bal.uses_kpi:
        return {"kpi": {t: 1.0 / (1.0 + float(v.detach())) for t, v in losses.items()}}
    return {}


def modes_of(method: str) -> tuple[str, ...]:
    cls = tb.get(method)
    if cls.kind == "loss":
        return ("loss",)
    return tuple(getattr(cls, "modes", None) or ("exact", "features"))


def optimizer_and_scheduler(params: Any) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def plain_run(
    method: str,
    mode: str,
    interval: str,
    *,
    epochs: int = EPOCHS,
    autocast: torch.dtype | None = None,
    **kw: Any,
) -> tuple[Net, tb.Balancer, torch.optim.Optimizer]:
    """The same training in a plain PyTorch loop (forward under ``autocast`` if given)."""
    net = Net()
    bal = make(method, **kw)
    opt, sched = optimizer_and_scheduler(net.parameters())
    for _ in range(epochs):
        for x, y in loader():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                losses, z = net.losses(x, y)
            features = z if mode == "features" else None
            bal.backward(losses, shared=net.body, features=features, **context(bal, losses))
            opt.step()
            if interval == "step":
                sched.step()
        bal.end_period()
        if interval == "epoch":
            sched.step()
    return net, bal, opt


if pl is not None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    from taskbalance.integrations.lightning import CHECKPOINT_KEY, BalancerMixin

    class MultiTask(BalancerMixin, pl.LightningModule):
        """The tiny multi-task module: ``balanced_step`` in ``training_step``."""

        def __init__(
            self,
            method: str,
            mode: str,
            interval: str = "step",
            float_features: bool = False,
            **kw: Any,
        ) -> None:
            super().__init__()
            self.net = Net()
            self.mode = mode
            self.float_features = float_features
            self.interval = interval
            self.balancer = make(method, **kw)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            x, y = batch
            losses, z = self.net.losses(x, y, self.float_features)
            ctx = context(self.balancer, losses)
            if self.mode == "features":
                return self.balanced_step(losses, features=z, **ctx)
            return self.balanced_step(losses, shared=self.net.body, **ctx)

        def configure_optimizers(self) -> dict[str, Any]:
            opt, sched = optimizer_and_scheduler(self.parameters())
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": self.interval},
            }

    class Plateau(MultiTask):
        """ReduceLROnPlateau that never sees an improvement (threshold 10, relative)."""

        balancer_plateau_monitor = "loss/a"

        def configure_optimizers(self) -> dict[str, Any]:
            opt = torch.optim.SGD(self.parameters(), lr=LR)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, patience=0, factor=0.5, threshold=10.0
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    class PlateauWithoutMonitor(Plateau):
        balancer_plateau_monitor = None

    class ForgetsSuper(MultiTask):
        def on_train_epoch_end(self) -> None:  # does not call super()
            pass

    class Automatic(MultiTask):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.automatic_optimization = True


def trainer(tmp_path: Path, epochs: int = EPOCHS, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": memory_logger(),
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    options.update(kw)
    return pl.Trainer(**options)


# ---------------------------------------------------------------------- training
CASES = [
    pytest.param("dwa", "loss", "epoch", id="dwa"),
    pytest.param("uncertainty", "loss", "step", id="uncertainty"),
    pytest.param("upgrad", "exact", "step", id="upgrad-exact"),
    pytest.param("mgda", "features", "epoch", id="mgda-features"),
]


@needs_lightning
@pytest.mark.parametrize(("method", "mode", "interval"), CASES)
def test_lightning_training_equals_the_plain_loop(
    tmp_path: Path, method: str, mode: str, interval: str
) -> None:
    module = MultiTask(method, mode, interval)
    start = module.net.flat()
    fit = trainer(tmp_path)
    fit.fit(module, loader())

    net, bal, opt = plain_run(method, mode, interval)
    steps = EPOCHS * BATCHES
    assert fit.global_step == steps and module.balancer.steps == steps
    assert not torch.equal(module.net.flat(), start)
    torch.testing.assert_close(module.net.flat(), net.flat(), rtol=0, atol=1e-6)
    history = module.balancer.history
    torch.testing.assert_close(history.weights, bal.history.weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(history.losses, bal.history.losses, rtol=0, atol=1e-6)
    # the schedulers were stepped as in the plain loop
    assert fit.optimizers[0].param_groups[0]["lr"] == opt.param_groups[0]["lr"] < LR

    # the logger got one weight and one loss per task and step, equal to the history
    logger = fit.logger
    for i, task in enumerate(TASKS):
        logged_w = logger.series(f"weight/{task}")
        logged_l = logger.series(f"loss/{task}")
        assert logged_w.shape == (steps,) and logged_l.shape == (steps,)
        torch.testing.assert_close(logged_w, history.weights[:, i], rtol=0, atol=1e-6)
        torch.testing.assert_close(logged_l, history.losses[:, i], rtol=0, atol=1e-6)
    weighted = (history.weights * history.losses).sum(1)
    torch.testing.assert_close(logger.series("weighted_loss"), weighted, rtol=1e-6, atol=1e-6)
    if method == "dwa":  # the epoch periods were closed: DWA's weights moved from epoch 3
        assert torch.equal(history.weights[: 2 * BATCHES], torch.ones(2 * BATCHES, 3).double())
        assert not torch.equal(history.weights[2 * BATCHES :], torch.ones(2 * BATCHES, 3).double())
    if method == "uncertainty":  # the method's extras are logged too
        assert logger.series("sigma/a").shape == (steps,)


@needs_lightning
@pytest.mark.parametrize(
    ("method", "mode"),
    [pytest.param(m, mode, id=f"{m}-{mode}") for m in tb.list_methods() for mode in modes_of(m)],
)
def test_every_method_through_the_mixin_equals_the_plain_loop(
    tmp_path: Path, method: str, mode: str
) -> None:
    """Every registered method, in every mode it defines, one epoch."""
    module = MultiTask(method, mode)
    start = module.net.flat()
    fit = trainer(tmp_path, epochs=1)
    fit.fit(module, loader())
    net, bal, _ = plain_run(method, mode, "step", epochs=1)
    assert module.balancer.steps == BATCHES and not torch.equal(module.net.flat(), start)
    torch.testing.assert_close(module.net.flat(), net.flat(), rtol=0, atol=1e-6)
    weights = module.balancer.history.weights
    torch.testing.assert_close(weights, bal.history.weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.logger.series(f"weight/{TASKS[-1]}"), weights[:, -1])


@needs_lightning
@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
def test_checkpoint_resume_continues_exactly(tmp_path: Path, method: str) -> None:
    first = MultiTask(method, "loss", "epoch")
    fit = trainer(tmp_path, epochs=2)
    fit.fit(first, loader())
    path = tmp_path / "mid.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved[CHECKPOINT_KEY]["balancer"]["method"] == first.balancer.method_name
    assert saved[CHECKPOINT_KEY]["balancer"]["steps"] == 2 * BATCHES

    resumed = MultiTask(method, "loss", "epoch")  # fresh balancer, fresh model
    refit = trainer(tmp_path)
    refit.fit(resumed, loader(), ckpt_path=path)

    net, bal, _ = plain_run(method, "loss", "epoch")
    assert resumed.balancer.steps == EPOCHS * BATCHES
    torch.testing.assert_close(resumed.net.flat(), net.flat(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        resumed.balancer.history.weights, bal.history.weights, rtol=0, atol=1e-6
    )
    if method == "uncertainty":
        torch.testing.assert_close(resumed.balancer.log_vars, bal.log_vars, rtol=0, atol=1e-6)


@needs_lightning
@pytest.mark.filterwarnings("ignore:The lr scheduler dict contains the key")
def test_reduce_lr_on_plateau_is_stepped_with_the_monitored_metric(tmp_path: Path) -> None:
    module = Plateau("equal", "loss")
    fit = trainer(tmp_path, epochs=3)
    fit.fit(module, loader())
    # never an improvement: halved at each of the 3 epoch ends
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR / 8)
    with pytest.raises(BalancerUsageError, match="balancer_plateau_monitor"):
        trainer(tmp_path, epochs=1).fit(PlateauWithoutMonitor("equal", "loss"), loader())


@needs_lightning
def test_forgotten_super_on_train_epoch_end_is_loud(tmp_path: Path) -> None:
    with pytest.raises(BalancerUsageError, match="super"):
        trainer(tmp_path, epochs=2).fit(ForgetsSuper("dwa", "loss"), loader())


@needs_lightning
def test_automatic_optimisation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BalancerUsageError, match="manual"):
        trainer(tmp_path, epochs=1).fit(Automatic("upgrad", "exact"), loader())


# ---------------------------------------------------------------------- mixed precision
@needs_lightning
@pytest.mark.parametrize(("method", "mode"), [("upgrad", "exact"), ("uncertainty", "loss")])
def test_bf16_mixed_equals_the_plain_autocast_loop(tmp_path: Path, method: str, mode: str) -> None:
    """Lightning runs training_step under autocast; the balancer must leave it for the engine."""
    module = MultiTask(method, mode)
    trainer(tmp_path, precision="bf16-mixed").fit(module, loader())
    net, bal, _ = plain_run(method, mode, "step", autocast=torch.bfloat16)
    torch.testing.assert_close(module.net.flat(), net.flat(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        module.balancer.history.weights, bal.history.weights, rtol=0, atol=1e-6
    )


#: fp16 rounds to 11 significant bits (u ≈ 4.9e-4); after 16 steps with momentum the
#: relative gap of the parameter updates to float32 measured here is ≈ 1e-3. 1e-2 leaves
#: room and still fails if the GradScaler's factor is left in or divided out twice.
FP16_TOL = 1e-2


@needs_lightning
@pytest.mark.parametrize(
    ("method", "mode"), [("upgrad", "exact"), ("mgda", "features"), ("uncertainty", "loss")]
)
def test_fp16_mixed_with_grad_scaler_matches_float32(
    tmp_path: Path, method: str, mode: str
) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=10_000)
    module = MultiTask(method, mode, float_features=mode == "features")
    start = module.net.flat()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(tmp_path, plugins=[plugin]).fit(module, loader())
    assert scaler.get_scale() == 2.0**6  # never overflowed: every step applied
    net, bal, _ = plain_run(method, mode, "step")
    error = (module.net.flat() - net.flat()).norm() / (net.flat() - start).norm()
    assert 0 < float(error) < FP16_TOL
    gap = (module.balancer.history.weights - bal.history.weights).abs().max()
    assert float(gap) < FP16_TOL


@needs_lightning
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize(
    ("method", "mode"), [("upgrad", "exact"), ("dwa", "loss"), ("gradnorm", "exact")]
)
def test_fp16_overflow_is_skipped_by_the_scaler(tmp_path: Path, method: str, mode: str) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28, growth_interval=10_000)
    module = MultiTask(method, mode)
    start = module.net.flat()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    fit = trainer(tmp_path, plugins=[plugin])
    fit.fit(module, loader())
    assert scaler.get_scale() < 2.0**20  # backed off at least 8 times
    assert fit.global_step == EPOCHS * BATCHES  # overflowed steps count, as in Lightning AMP
    params = module.net.flat()
    assert bool(torch.isfinite(params).all()) and not torch.equal(params, start)
    weights = module.balancer.history.weights
    assert len(weights) > 0 and bool(torch.isfinite(weights).all())  # GradNorm: never NaN


@needs_lightning
def test_nash_mtl_is_refused_under_fp16_scaler(tmp_path: Path) -> None:
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(BalancerUsageError, match="GradScaler"):
        trainer(tmp_path, epochs=1, plugins=[plugin]).fit(MultiTask("nash_mtl", "exact"), loader())


# ---------------------------------------------------------------------- gradient accumulation
def plain_accumulating_run(
    method: str, mode: str, epochs: int, **kw: Any
) -> tuple[Net, tb.Balancer, int]:
    """The plain loop of docs/scaling.md with ``accumulation_steps``: zero_grad at the start
    of an accumulated step, optimizer and scheduler steps when it closes, ``flush()`` (and
    FAMO's clipping) after the epoch's last batch; returns the optimizer steps taken."""
    net = Net()
    bal = make(method, **kw)
    opt, sched = optimizer_and_scheduler(net.parameters())
    steps = 0
    for _ in range(epochs):
        batches = list(loader())
        for j, (x, y) in enumerate(batches):
            if bal.micro_step == 0:
                opt.zero_grad()
            losses, z = net.losses(x, y)
            features = z if mode == "features" else None
            bal.backward(losses, shared=net.body, features=features, **context(bal, losses))
            if bal.micro_step != 0 and j == len(batches) - 1:
                bal.flush()
                if kw.get("max_norm"):
                    torch.nn.utils.clip_grad_norm_(net.body.parameters(), kw["max_norm"])
            if bal.micro_step == 0:
                opt.step()
                sched.step()
                steps += 1
        bal.end_period()
    return net, bal, steps


@needs_lightning
@pytest.mark.parametrize(
    ("method", "mode", "kw"),
    [
        pytest.param("uncertainty", "loss", {"accumulation_steps": 2}, id="uncertainty-2"),
        pytest.param("famo", "loss", {"accumulation_steps": 3, "max_norm": 0.2}, id="famo-3"),
        pytest.param("upgrad", "exact", {"accumulation_steps": 3}, id="upgrad-exact-3"),
        pytest.param("mgda", "features", {"accumulation_steps": 2}, id="mgda-features-2"),
    ],
)
def test_balancer_accumulation_through_the_mixin_equals_the_plain_loop(
    tmp_path: Path, method: str, mode: str, kw: dict[str, Any]
) -> None:
    """A balancer with ``accumulation_steps=N``: one optimizer step per N batches, the
    epoch's incomplete last step closed (4 batches, N = 3: a step of 3 and one of 1)."""
    epochs = 2
    module = MultiTask(method, mode, **kw)
    start = module.net.flat()
    fit = trainer(tmp_path, epochs=epochs)
    fit.fit(module, loader())
    net, bal, steps = plain_accumulating_run(method, mode, epochs, **kw)
    n = kw["accumulation_steps"]
    assert steps == epochs * -(-BATCHES // n)  # ceil: the last, incomplete step counts
    assert fit.global_step == steps and module.balancer.steps == bal.steps == steps
    assert module.balancer.micro_step == 0
    assert not torch.equal(module.net.flat(), start)
    torch.testing.assert_close(module.net.flat(), net.flat(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        module.balancer.history.weights, bal.history.weights, rtol=0, atol=1e-6
    )
    assert fit.optimizers[0].param_groups[0]["lr"] == LR * 0.5 ** (steps // 3)


@needs_lightning
def test_trainer_accumulate_grad_batches_is_refused_with_a_pointer(tmp_path: Path) -> None:
    with pytest.raises(BalancerUsageError, match="accumulation_steps=2"):
        trainer(tmp_path, epochs=1, accumulate_grad_batches=2).fit(
            MultiTask("upgrad", "exact"), loader()
        )
