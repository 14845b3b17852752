"""PyTorch Lightning integration: any balancer in a ``LightningModule`` in a few lines.

Install with ``pip install 'taskbalance[lightning]'``. ``import taskbalance`` never imports
Lightning; this module does, and raises an :class:`ImportError` with that hint when it is
missing.

Usage::

    import lightning.pytorch as pl
    import taskbalance as tb
    from taskbalance.integrations.lightning import BalancerMixin

    class MultiTask(BalancerMixin, pl.LightningModule):   # the mixin first
        def __init__(self):
            super().__init__()                            # sets manual optimisation
            self.body = ...
            self.heads = ...
            self.balancer = tb.make("upgrad", tasks=["a", "b"])

        def training_step(self, batch, batch_idx):
            x, ys = batch
            z = self.body(x)
            losses = {t: crit(self.heads[t](z), ys[t]) for t in ("a", "b")}
            return self.balanced_step(losses, shared=self.body)   # or features=z

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

What :class:`BalancerMixin` does:

* **Manual optimisation.** Gradient methods compute K per-task gradients with their own
  autograd calls and write ``.grad``; Lightning's automatic loop (one ``loss.backward()``
  of what ``training_step`` returns) cannot express that, so the mixin switches the module
  to manual optimisation (``self.automatic_optimization = False``) and
  :meth:`BalancerMixin.balanced_step` does ``zero_grad``, the balanced backward, and
  ``step`` of every optimizer of ``configure_optimizers``.
* **Backward.** Loss-weighting methods backpropagate ``balancer(losses)`` through
  ``self.manual_backward`` — Lightning's precision plugin scales it under fp16 AMP, its
  ``on_before_backward`` / ``on_after_backward`` hooks run and the strategy prepares DDP.
  Gradient methods run ``balancer.backward`` outside autocast (see
  :func:`taskbalance.integrations.amp_backward`); with a GradScaler
  (``MixedPrecision("16-mixed", ...)``) their losses carry the scale in their gradients
  only, so the optimizer step's ``unscale_`` restores exact gradients. On this path there
  is no single backward, so Lightning's backward hooks do not run;
  ``on_before_optimizer_step`` (and gradient clipping done there) still does.
* **Schedulers.** In manual optimisation Lightning steps no LR scheduler; the mixin steps
  the schedulers of ``configure_optimizers`` as the automatic loop would: ``interval="step"``
  ones after every ``frequency`` balanced steps of the epoch, ``interval="epoch"`` ones at
  every ``frequency``-th epoch end, ``ReduceLROnPlateau`` with the metric named by
  ``balancer_plateau_monitor`` from ``trainer.callback_metrics`` (Lightning drops the
  config's ``monitor`` in manual optimisation). Set ``balancer_step_schedulers = False``
  to do it yourself.
* **Gradient accumulation.** With a balancer made with ``accumulation_steps=N``,
  :meth:`BalancerMixin.balanced_step` zero-grads before the first of N batches and steps
  the optimizers (and step-interval schedulers) after the N-th; the epoch's last batch
  closes an incomplete step. ``Trainer(accumulate_grad_batches=N)`` does not work under
  manual optimisation and is refused with a pointer to ``accumulation_steps``.
* **Periods.** ``balancer.end_period()`` at every training-epoch end (DWA's period).
* **Checkpoints.** ``balancer.state_dict()`` is stored in the Lightning checkpoint under
  ``checkpoint["taskbalance"]`` and restored on load, so a resumed fit continues exactly.
* **Logging.** Each balanced step logs ``weight/<task>``, ``loss/<task>``, the method's
  per-task extras (e.g. ``sigma/<task>`` for uncertainty weighting) and ``weighted_loss``
  (``sum_i w_i L_i``) through ``self.log_dict``, so every Lightning logger records them.
  The losses are those the weights were computed from (``balancer.last_losses``): under
  DDP the losses averaged over the ranks, the same on every rank, so rank 0's dashboard
  shows the global losses beside the global weights.
  A balancer built with ``diagnostics=`` adds its ``diag/...`` columns (``diag/cos/<a>-<b>``,
  ``diag/norm/<task>``, ``diag/norm_ratio``, ...; see ``docs/diagnostics.md``), step
  values only, NaN on the steps it does not diagnose (as in its history).
  Lightning writes logged values every ``Trainer(log_every_n_steps=...)`` steps (50 by
  default).

* **DDP.** ``Trainer(strategy="ddp", devices=N)``: the balancer synchronises itself over
  the process group (``distributed="auto"``, see :mod:`taskbalance.distributed`); the mixin
  adds no collective. ``distributed="off"`` is refused under a group of two or more ranks
  (``distributed="local"`` if the ranks are meant to diverge). With ``ddp_spawn``,
  ``ddp_fork`` or ``ddp_notebook`` the ranks train in child processes and Lightning hands
  only rank 0's ``state_dict()`` back to the launching process: at the end of its fit a
  rank adds the balancer's state to it (key :data:`HANDBACK_KEY`), and the launching
  module's ``load_state_dict`` restores the balancer from it, so ``model.balancer`` after
  ``fit`` holds the trained state, as ``model``'s parameters do.

If you override ``on_train_epoch_end``, ``on_fit_end``, ``on_save_checkpoint`` or
``on_load_checkpoint``, call ``super()``: a forgotten ``on_train_epoch_end`` is detected at
the next epoch's first step and raises :class:`~taskbalance.errors.BalancerUsageError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # the standalone package works the same way
    except ImportError as err:
        raise ImportError(
            "taskbalance.integrations.lightning needs PyTorch Lightning; install it with "
            "pip install 'taskbalance[lightning]'"
        ) from err

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, with_reference
from taskbalance.errors import BalancerUsageError
from taskbalance.integrations import (
    _amp_backward,
    _current_scale,
    _max_norm_clip,
    uses_loss_path,
)

__all__ = ["CHECKPOINT_KEY", "HANDBACK_KEY", "BalancerMixin", "LightningModule"]

#: key of the balancer's state in a Lightning checkpoint.
CHECKPOINT_KEY = "taskbalance"

#: key under which a worker of a spawning strategy (``ddp_spawn``, ``ddp_fork``,
#: ``ddp_notebook``) adds the balancer's state to the module's ``state_dict()`` at the end
#: of its fit, the one state that Lightning hands back to the launching process.
HANDBACK_KEY = "_taskbalance_balancer_state"

#: the ``LightningModule`` class of the Lightning package found (``lightning`` first).
LightningModule = pl.LightningModule

#: the launcher of the strategies that fit in spawned (or forked) child processes
_SpawnLauncher = pl.strategies.launchers._MultiProcessingLauncher


class BalancerMixin:
    """Mixin for a ``LightningModule`` trained with a taskbalance balancer.

    Put it before ``LightningModule`` in the bases and assign the balancer to
    ``self.balancer`` in ``__init__`` (another attribute name: set
    :attr:`balancer_attribute`). In ``training_step``, compute the task losses and return
    ``self.balanced_step(losses, shared=..., features=...)``. See the module docstring.
    """

    #: name of the attribute that holds the balancer.
    balancer_attribute: ClassVar[str] = "balancer"
    #: prefix of the logged names, e.g. ``"train/"`` gives ``train/weight/<task>``.
    balancer_log_prefix: ClassVar[str] = ""
    #: also log epoch means (``on_epoch=True`` in ``self.log_dict``).
    balancer_log_on_epoch: ClassVar[bool] = False
    #: log the method's per-task extras (``balancer.extras()``), e.g. uncertainty's sigma.
    balancer_log_extras: ClassVar[bool] = True
    #: step the LR schedulers of ``configure_optimizers`` (Lightning does not in manual mode).
    balancer_step_schedulers: ClassVar[bool] = True
    #: the logged metric a ``ReduceLROnPlateau`` scheduler monitors (Lightning drops the
    #: config's ``monitor`` key in manual optimisation), read from ``trainer.callback_metrics``.
    balancer_plateau_monitor: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._tb_epoch: int | None = None  # epoch of the last balanced step
        self._tb_closed: int | None = None  # last epoch closed by on_train_epoch_end
        self._tb_batches = 0  # optimizer steps so far in the current epoch
        self._tb_contributed = False  # a micro-batch of the open step wrote gradients
        self._tb_hand_back = False  # a spawned worker's fit ended: state_dict() carries it
        self.register_state_dict_post_hook(_add_balancer_state)
        self.register_load_state_dict_pre_hook(_take_balancer_state)

    # ------------------------------------------------------------------ access
    @property
    def task_balancer(self) -> Balancer:
        """The balancer held in :attr:`balancer_attribute`."""
        balancer = getattr(self, self.balancer_attribute, None)
        if not isinstance(balancer, Balancer):
            raise BalancerUsageError(
                f"{type(self).__name__}.{self.balancer_attribute} must hold a taskbalance "
                f"balancer (e.g. tb.make('upgrad', tasks=...)), found {type(balancer).__name__}"
            )
        return balancer

    def _tb_optimizers(self) -> list[Any]:
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def _tb_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's GradScaler when fp16 AMP is on, else ``None``."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler

    def _tb_begin_step(self) -> None:
        if self.automatic_optimization:
            raise BalancerUsageError(
                f"{type(self).__name__} uses automatic optimisation; balanced_step needs manual "
                "optimisation. Put BalancerMixin before LightningModule in the bases, call "
                "super().__init__() and do not set automatic_optimization back to True"
            )
        epoch = self.trainer.current_epoch
        unclosed = self._tb_epoch is not None and self._tb_closed != self._tb_epoch
        if epoch != self._tb_epoch and unclosed:
            raise BalancerUsageError(
                f"epoch {self._tb_epoch} ended without balancer.end_period(): "
                f"{type(self).__name__}.on_train_epoch_end must call "
                "super().on_train_epoch_end()"
            )
        if epoch != self._tb_epoch:
            self._tb_epoch = epoch
            self._tb_batches = 0

    # ------------------------------------------------------------------ the step
    def balanced_backward(
        self, losses: Losses, *, shared: Any = None, features: Any = None, **context: Any
    ) -> Tensor | None:
        """Backpropagate the balanced losses (no optimizer step); return the task weights.

        For loops that step the optimizers themselves. Loss-weighting methods go through
        ``self.manual_backward``; gradient methods through ``balancer.backward`` (outside
        autocast, with the GradScaler's scale in their gradients). ``None``: no weights
        this step — either the balancer skipped it (``balancer.last_step_skipped``;
        nothing was written to ``.grad``, do not step) or, under fp16 AMP, the gradients
        overflowed (the shared gradients were made non-finite: step as usual and the
        scaler skips the step and lowers its scale). For gradient accumulation prefer the
        balancer's ``accumulation_steps`` with :meth:`balanced_step`.
        """
        weights, _ = self._tb_backward(losses, shared, features, context)
        return weights

    def _tb_backward(
        self, losses: Losses, shared: Any, features: Any, context: dict[str, Any]
    ) -> tuple[Tensor | None, bool]:
        """``(weights, poisoned)``: :meth:`balanced_backward` and whether the gradients were
        made non-finite for the scaler (an overflow: the optimizer step must still run)."""
        return _amp_backward(
            self.task_balancer,
            losses,
            scaler=self._tb_scaler(),
            shared=shared,
            features=features,
            loss_backward=self.manual_backward,
            **context,
        )

    def balanced_step(
        self, losses: Losses, *, shared: Any = None, features: Any = None, **context: Any
    ) -> Tensor | None:
        """One training step: zero_grad, balanced backward, optimizer and scheduler steps, logs.

        With a balancer made with ``accumulation_steps=N``, N consecutive calls form one
        optimizer step: ``zero_grad`` before the first, the optimizer and step-interval
        scheduler steps after the N-th (each micro-batch contributes 1/N of its gradient);
        the epoch's last batch closes an incomplete step (``balancer.flush()``), as
        Lightning's own accumulation does. ``Trainer(accumulate_grad_batches=...)`` is
        refused (Lightning does not accumulate under manual optimisation).

        Args:
            losses: the task losses by name (dict) or in task order (list), each a scalar
                with its graph.
            shared: the shared parameters (a module, a tensor or an iterable of tensors),
                for gradient methods' exact mode (and FAMO's ``max_norm`` clipping).
            features: the shared representation (or ``tb.fork`` views), for gradient
                methods' representation mode.
            **context: extra arguments of the method (``kpi=`` for DTP,
                ``last_shared=`` for GradNorm).

        Returns:
            ``sum_i w_i L_i`` (detached; the losses the weights came from, under DDP the
            global ones, the same on every rank) for logging or returning from
            ``training_step``,
            or ``None`` when the balancer skipped the step (no optimizer step then) or
            the fp16 gradients overflowed (the optimizer step runs; the scaler skips it).
        """
        self._tb_begin_step()
        balancer = self.task_balancer
        optimizers = self._tb_optimizers()
        if balancer.micro_step == 0:  # a new (accumulated) step; every call without one
            for optimizer in optimizers:
                optimizer.zero_grad()
            self._tb_contributed = False
        weights, poisoned = self._tb_backward(losses, shared, features, context)
        # a skipped call writes nothing; an overflow's poisoned gradients must reach the scaler
        self._tb_contributed = self._tb_contributed or weights is not None or poisoned
        if balancer.micro_step != 0 and self.trainer.is_last_batch:
            balancer.flush()  # the epoch's last, incomplete accumulated step
            if uses_loss_path(balancer):  # FAMO's clipping of the step's gradient
                _, reference = with_reference(losses)
                device = reference.device if reference is not None else torch.device("cpu")
                _max_norm_clip(balancer, shared, _current_scale(self._tb_scaler(), device))
        if balancer.micro_step == 0 and self._tb_contributed:
            for optimizer in optimizers:
                optimizer.step()
            self._tb_contributed = False
            self._tb_batches += 1
            if self.balancer_step_schedulers:
                self._tb_step_schedulers("step")
        if weights is None:
            return None
        return self._tb_log(balancer, losses, weights)

    def _tb_log(self, balancer: Balancer, losses: Losses, weights: Tensor) -> Tensor:
        used = weights.detach().double()
        if balancer.last_losses is not None:  # what the weights came from: global under DDP
            values = balancer.last_losses.detach().reshape(-1).to(used)
        else:  # a balancer that records no losses: this process's own
            values = torch.stack([v.detach().reshape(()) for v in _by_task(balancer, losses)])
            values = values.to(used)
        prefix = self.balancer_log_prefix
        metrics: dict[str, Tensor] = {}
        for i, task in enumerate(balancer.tasks):
            metrics[f"{prefix}weight/{task}"] = used[i]
            metrics[f"{prefix}loss/{task}"] = values[i]
        if self.balancer_log_extras:
            for name, extra in balancer.extras().items():
                flat = extra.detach().reshape(-1)
                if flat.numel() == balancer.num_tasks:
                    for i, task in enumerate(balancer.tasks):
                        metrics[f"{prefix}{name}/{task}"] = flat[i]
        weighted = (used * values).sum()
        metrics[f"{prefix}weighted_loss"] = weighted
        self.log_dict(metrics, on_step=True, on_epoch=self.balancer_log_on_epoch)
        diagnosed = balancer.last_diagnostics
        if diagnosed is not None:
            # Lightning would repeat a key's last value on steps that do not log it: the
            # steps not diagnosed (and the micro-batches) log NaN, as the history holds
            fresh = balancer.last_diagnostics_step == balancer.steps - 1
            fresh = fresh and balancer.micro_step == 0  # the call that closed the step
            nan = torch.full((), float("nan"), dtype=torch.float64)
            diag = {f"{prefix}{name}": v if fresh else nan for name, v in diagnosed.items()}
            self.log_dict(diag, on_step=True, on_epoch=False)
        return weighted

    def _tb_step_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``interval`` whose frequency is due (as Lightning would)."""
        trainer = self.trainer
        index = self._tb_batches if interval == "step" else trainer.current_epoch + 1
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or index % config.frequency != 0:
                continue
            metric = None
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self._tb_plateau_metric()
            self.lr_scheduler_step(config.scheduler, metric)

    def _tb_plateau_metric(self) -> Any:
        # Lightning drops the scheduler config's "monitor" in manual optimisation
        monitor = self.balancer_plateau_monitor
        if monitor is None:
            raise BalancerUsageError(
                "a ReduceLROnPlateau scheduler needs the metric it monitors, and Lightning "
                "ignores the config's 'monitor' key in manual optimisation: set "
                f"{type(self).__name__}.balancer_plateau_monitor = '<logged metric>' (or "
                "balancer_step_schedulers = False and step the schedulers yourself)"
            )
        metric = self.trainer.callback_metrics.get(monitor)
        if metric is None:
            raise BalancerUsageError(
                f"ReduceLROnPlateau monitors {monitor!r}, which has not been logged; "
                f"logged so far: {sorted(self.trainer.callback_metrics)}"
            )
        return metric

    # ------------------------------------------------------------------ hooks
    def configure_callbacks(self) -> Any:
        """Refuse ``Trainer(accumulate_grad_batches=N)`` with N > 1 when fitting.

        Lightning does not accumulate under manual optimisation (it would raise an error
        that suggests switching to automatic optimisation, which a balancer cannot use);
        this is the first module hook of a fit, so the error says what to do instead.
        """
        trainer = getattr(self, "_trainer", None)  # None: not attached (called by hand)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if accumulate != 1 and getattr(getattr(trainer, "state", None), "fn", None) == "fit":
            raise BalancerUsageError(
                f"Trainer(accumulate_grad_batches={accumulate}) does not apply to a "
                f"BalancerMixin module (manual optimisation). Remove it and construct the "
                f"balancer with accumulation_steps={accumulate} instead (e.g. tb.make(..., "
                f"accumulation_steps={accumulate})): balanced_step then steps the optimizers "
                f"once every {accumulate} batches, each contributing 1/{accumulate} of its "
                "gradient, and the balancer's state advances once per optimizer step "
                "(docs/lightning_amp.md)"
            )
        return super().configure_callbacks()

    def on_train_epoch_end(self) -> None:
        """Close the balancer's period (DWA) and step epoch-interval schedulers."""
        super().on_train_epoch_end()
        balancer = self.task_balancer
        if balancer.micro_step != 0:  # the last batch was not known as such (rare)
            warnings.warn(
                f"the epoch ended inside an accumulated step ({balancer.micro_step} of "
                f"{balancer.accumulation_steps} micro-batches); it is closed without an "
                "optimizer step and its gradients are dropped",
                stacklevel=2,
            )
            balancer.flush()
        balancer.end_period()
        self._tb_closed = self.trainer.current_epoch
        if self.balancer_step_schedulers:
            self._tb_step_schedulers("epoch")

    def on_fit_end(self) -> None:
        """In a worker of a spawning strategy, have ``state_dict()`` carry the balancer.

        ``ddp_spawn`` (and ``ddp_fork``, ``ddp_notebook``) fit in child processes and hand
        back to the launching process only rank 0's ``state_dict()``, which Lightning loads
        into the launching process's module; without this, its balancer would stay at its
        initial state (no steps, an empty history) although the workers trained it.
        """
        super().on_fit_end()
        if isinstance(getattr(self.trainer.strategy, "launcher", None), _SpawnLauncher):
            self._tb_hand_back = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store ``balancer.state_dict()`` in the checkpoint under :data:`CHECKPOINT_KEY`."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"balancer": self.task_balancer.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the balancer's state from the checkpoint (warn if it holds none)."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            warnings.warn(
                f"the checkpoint has no {CHECKPOINT_KEY!r} entry (saved without BalancerMixin?); "
                "the balancer starts from its initial state",
                stacklevel=2,
            )
            return
        self.task_balancer.load_state_dict(state["balancer"])


def _add_balancer_state(
    module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook: add the balancer's state in a spawned worker after its fit."""
    if getattr(module, "_tb_hand_back", False):
        state_dict[prefix + HANDBACK_KEY] = {"balancer": module.task_balancer.state_dict()}


def _take_balancer_state(module: Any, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: restore (and remove) a handed-back balancer state."""
    state = state_dict.pop(prefix + HANDBACK_KEY, None)
    if state is not None:
        module.task_balancer.load_state_dict(state["balancer"])


def _by_task(balancer: Balancer, losses: Losses) -> list[Tensor]:
    """The losses in task order (by name from a mapping)."""
    if isinstance(losses, Tensor):
        return list(losses.reshape(-1).unbind(0))
    if isinstance(losses, Mapping):
        return balancer.values_by_task(losses, "losses")
    return list(losses)
