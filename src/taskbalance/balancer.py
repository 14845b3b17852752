"""The :class:`Balancer` base class: a stateful object that turns K task losses into one update.

A balancer is to task losses what an optimizer is to parameters: hyper-parameters in the
constructor (paper defaults), state that evolves step by step, ``state_dict()`` /
``load_state_dict()`` for exact resumption, and one job per step.

Two ways to use one:

* ``loss = balancer(losses)`` returns the weighted scalar for methods that weight loss
  values (equal, static, DWA, uncertainty, DTP, RLW, GLS, ...); call ``loss.backward()``.
* ``balancer.backward(losses, shared=..., features=...)`` works for every method; gradient
  methods (MGDA, PCGrad, ...) override it and fill ``.grad`` themselves.

Losses are given by task name (a mapping) or by position (a sequence or a 1-D tensor);
the number and names of tasks are checked on every call.

Every balancer also works under DistributedDataParallel (``distributed="auto"``, see
:mod:`taskbalance.distributed`) and with gradient accumulation (``accumulation_steps=N``:
weights per micro-batch, state per accumulated step); both are described in
``docs/scaling.md``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.distributed import Sync, active_sync, check_setting
from taskbalance.errors import (
    BalancerUsageError,
    NonFiniteLossError,
    NotScalarLossError,
    TaskMismatchError,
    warn,
)
from taskbalance.history import History
from taskbalance.learnable import OwnedParameters
from taskbalance.registry import constructor_parameters

logger = logging.getLogger("taskbalance")

Losses = Mapping[str, Tensor] | Sequence[Tensor] | Tensor
Tasks = int | Sequence[str]
NonFinitePolicy = Literal["raise", "skip_step"]


def task_names(tasks: Tasks) -> tuple[str, ...]:
    """Normalise ``tasks`` (a count or a sequence of unique names) to a tuple of names."""
    if isinstance(tasks, bool):
        raise TypeError("tasks must be a positive int or a sequence of task names")
    if isinstance(tasks, int):
        if tasks < 1:
            raise ValueError(f"the number of tasks must be at least 1, got {tasks}")
        return tuple(str(i) for i in range(tasks))
    if isinstance(tasks, str):
        raise TypeError("tasks must be a sequence of names, not a single string")
    names = tuple(str(t) for t in tasks)
    if not names:
        raise ValueError("tasks must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    return names


def detached_stack(items: list[Tensor]) -> Tensor:
    """``torch.stack`` of the items without a graph (one op, not one detach per item)."""
    with torch.no_grad():
        return torch.stack(items)


def with_reference(losses: Any) -> tuple[Any, Tensor | None]:
    """``(losses, the first tensor among them)``, before the losses are checked.

    Used to find the device the losses live on (e.g. to turn autocast off for it). A
    one-shot iterator is turned into a list first, so that looking does not consume it.
    Sets of losses nested one level deep (MoDo's three batches, ``[losses_a, losses_b,
    losses_c]``) are looked into as well. The reference is ``None`` when there is no tensor
    (the checks then raise).
    """
    if isinstance(losses, Tensor):
        return losses, losses
    if isinstance(losses, Iterator):
        losses = list(losses)
    values = _values(losses)
    if values is None:
        return losses, None
    nested = []
    for value in values:
        if isinstance(value, Tensor):
            return losses, value
        nested.append(value)
    for value in nested:  # one level down, without consuming an iterator
        inner = None if isinstance(value, Iterator) else _values(value)
        for item in inner or ():
            if isinstance(item, Tensor):
                return losses, item
    return losses, None


def _values(losses: Any) -> Iterable[Any] | None:
    """The values of a mapping or the items of another iterable (``None`` for neither)."""
    if isinstance(losses, Mapping):
        return losses.values()
    if isinstance(losses, Iterable) and not isinstance(losses, str):
        return losses
    return None


class Balancer:
    """Base class of every balancing method.

    Args:
        tasks: the number of tasks, or their names (losses may then be passed as a dict).
        nonfinite: what to do when a task loss is NaN or infinite. ``"raise"`` (default)
            raises :class:`~taskbalance.errors.NonFiniteLossError` naming the task and the
            value. ``"skip_step"`` makes the step a no-op: ``balancer(losses)`` returns a
            zero loss connected to no model parameter, ``backward`` fills no gradient and
            returns ``None``, the method's state is left untouched, the step is counted in
            :attr:`skipped_steps` and logged as a warning on the ``taskbalance`` logger.
            GradNorm applies the same policy to a non-finite task gradient; the other
            gradient methods raise :class:`~taskbalance.errors.NonFiniteGradientError` on
            one, with their state untouched.
        record: keep a :class:`~taskbalance.history.History` of every step.
        distributed: ``"auto"`` (default) synchronises the balancer over the default
            ``torch.distributed`` process group when one is initialised with two or more
            ranks (same weights on every rank, update equal to one process on the global
            batch); ``"off"`` never does, and raises
            :class:`~taskbalance.errors.BalancerUsageError` at a call made while a group of
            two or more ranks is initialised (the ranks would drift apart unnoticed);
            ``"local"`` never synchronises, for ranks that are meant to train on their own;
            a ``ProcessGroup`` synchronises within it. See :mod:`taskbalance.distributed`.
        accumulation_steps: N consecutive calls form one accumulated step (one optimizer
            step). Each call computes its micro-batch's weights from the state at the start
            of the step and contributes 1/N of its gradient; the state (history, step
            counter, DWA's periods, random draws, learnable parameters) advances once, at
            the N-th call. See ``docs/scaling.md``. Default 1: every call is a step.
        diagnostics: record the gradient diagnostics (pairwise cosines, gradient norms and
            their max/min ratio, the fraction of conflicting pairs, each task's alignment
            with the applied update, the loss ratios ``L_i/L_i(0)``; see
            :mod:`taskbalance.diagnostics` and ``docs/diagnostics.md``) in :attr:`history`
            as ``diag/...`` columns. ``False`` (default): nothing is computed; ``True``:
            every step; an int ``n``: every n-th step (steps 0, n, 2n, ...; the other rows
            hold NaN). They come from the Gramian the method used (under DDP the global
            one, so every rank records the same values); under accumulation a row holds
            the mean over the step's micro-batches. Gradient methods that form the Gramian
            or the Jacobian through the engine record them; loss-weighting methods record
            them on the diagnosed steps of ``backward(losses, shared=...)`` (or
            ``features=``), where the engine computes the task gradients for them (K extra
            backward passes in the exact mode; ``balancer(losses).backward()`` cannot be
            diagnosed and is warned about once); GradNorm, MoDo and CR-MOGM refuse the
            setting. Needs ``record=True``.

    Every call is a training step: it advances the method's state (DWA's period means,
    RLW's random draws, the step counter) and is recorded in the history. A call with
    autograd disabled (``torch.no_grad()``, ``torch.inference_mode()``) is refused with
    :class:`~taskbalance.errors.BalancerUsageError`, as it can only be an evaluation:
    :meth:`evaluate` gives a weighted validation loss and touches no state.

    Hyper-parameters are the constructor's arguments (:meth:`hyperparameters`, shown by
    ``repr``); :meth:`load_state_dict` restores state only and keeps them (see there).

    Subclasses of loss-weighting methods implement :meth:`compute_weights`; those whose
    combined loss is not a weighted sum (uncertainty weighting, GLS) override
    :meth:`combine` as well.
    """

    method_name: ClassVar[str] = ""
    #: ``"loss"``: weights come from loss values; ``"gradient"``: from task gradients.
    kind: ClassVar[str] = "loss"
    #: the method needs per-task KPIs in (0, 1] with the losses (``kpi=``; DTP).
    uses_kpi: ClassVar[bool] = False
    #: under accumulation, every micro-batch starts from the state saved at the start of
    #: the accumulated step (through :meth:`method_state` / :meth:`load_method_state`).
    restores_micro_batches: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Balancer:
        self = super().__new__(cls)
        # the constructor's arguments as given, for hyperparameters() / repr / state_dict
        self._given = (args, kwargs)
        return self

    def __init__(
        self,
        tasks: Tasks,
        *,
        nonfinite: NonFinitePolicy = "raise",
        record: bool = True,
        distributed: Any = "auto",
        accumulation_steps: int = 1,
        diagnostics: bool | int = False,
    ) -> None:
        if nonfinite not in ("raise", "skip_step"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip_step', got {nonfinite!r}")
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise ValueError(
                f"accumulation_steps must be a positive int, got {accumulation_steps!r}"
            )
        self.distributed = check_setting(distributed)
        self.accumulation_steps = accumulation_steps
        self._open: _OpenStep | None = None
        self._random_synced = False
        self._touched: dict[int, Tensor] = {}
        self.tasks: tuple[str, ...] = task_names(tasks)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.steps = 0
        self.skipped_steps = 0
        self.history: History | None = History(self.tasks) if record else None
        self.last_weights: Tensor | None = None
        #: the losses ``(K,)`` that :attr:`last_weights` were computed from: under DDP the
        #: losses averaged over the ranks (the global batch's), else the call's own.
        self.last_losses: Tensor | None = None
        self.last_step_skipped = False
        self._skip_reason = "loss"
        self._init_diagnostics(diagnostics)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def last_skip_reason(self) -> str | None:
        """What made the last step a skipped one: ``"loss"`` (a non-finite loss) or
        ``"gradient"`` (a non-finite gradient; GradNorm); ``None`` if it was not skipped."""
        return self._skip_reason if self.last_step_skipped else None

    @property
    def micro_step(self) -> int:
        """Calls made so far in the open accumulated step (0 right after a step closes)."""
        return 0 if self._open is None else self._open.calls

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's arguments, defaults filled in (``tasks`` excluded).

        These are what the balancer was built with; :meth:`state_dict` saves them and
        :meth:`load_state_dict` compares them with its own (the constructor's values win).
        """
        params = constructor_parameters(type(self))
        values = {name: p.default for name, p in params.items()}
        args, kwargs = getattr(self, "_given", ((), {}))
        try:
            bound = inspect.signature(type(self).__init__).bind_partial(self, *args, **kwargs)
        except TypeError:
            bound = None
        if bound is not None:
            for name, value in bound.arguments.items():
                if name in ("self", "tasks"):
                    continue
                if params.get(name) is None and isinstance(value, dict):
                    values.update(value)  # the **kw of the leaf constructor
                else:
                    values[name] = value
        return {k: v for k, v in values.items() if v is not inspect.Parameter.empty}

    def __repr__(self) -> str:
        defaults = constructor_parameters(type(self))
        shown = [f"tasks={list(self.tasks)}"]
        for name, value in self.hyperparameters().items():
            if name in _COMMON_SETTINGS and _same(value, defaults[name].default):
                continue  # settings every balancer has: only when not the default
            shown.append(f"{name}={_short_repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def parameters(self) -> list[torch.nn.Parameter]:
        """The balancer's learnable parameters (empty for most methods).

        Uncertainty weighting (``log_vars``), GradNorm (``weights``), IMTL-L / IMTL hybrid
        (``scales``) and FAMO (``logits``) have some. With ``optimizer="own"`` (the default)
        they are stepped by the balancer itself: do not give them to your optimizer.
        """
        return [p for learnable in self._learnables() for p in learnable.parameters()]

    def attach(self, optimizer: torch.optim.Optimizer, lr: float | None = None) -> None:
        """Hand the learnable parameters to ``optimizer`` as a param group with weight
        decay 0 (for a balancer built with ``optimizer="external"``)."""
        learnables = self._learnables()
        if not learnables:
            raise BalancerUsageError(
                f"{type(self).__name__} has no learnable parameters to attach to an optimizer"
            )
        if "optimizer" not in constructor_parameters(type(self)):
            raise BalancerUsageError(
                f"{type(self).__name__} steps its parameters itself (its update rule is part "
                "of the method) and takes no optimizer='external'; nothing to attach"
            )
        for learnable in learnables:
            learnable.attach(optimizer, lr)

    # ------------------------------------------------------------------ inputs
    def split_losses(self, losses: Losses) -> list[Tensor]:
        """Check ``losses`` against the tasks; return one scalar per task, in task order.

        Each keeps its autograd graph; the dtype is the promoted dtype of the losses, at
        least float32. A 1-D tensor of K losses is accepted as well.
        """
        k = self.num_tasks
        if isinstance(losses, Tensor):
            if losses.dim() != 1 or losses.numel() != k:
                raise TaskMismatchError(
                    f"expected a 1-D tensor of {k} losses, got shape {tuple(losses.shape)}"
                )
            items = list(losses.unbind(0))
        elif isinstance(losses, (Mapping, Iterable)) and not isinstance(losses, str):
            items = self.values_by_task(losses, "losses")
        else:
            raise TypeError(f"losses must be a dict, a sequence or a tensor, not {type(losses)}")
        for task, item in zip(self.tasks, items):
            if not isinstance(item, Tensor):
                raise TypeError(f"loss of task {task!r} is a {type(item).__name__}, not a tensor")
            if item.numel() != 1:
                raise NotScalarLossError(
                    f"loss of task {task!r} must be a scalar, got shape {tuple(item.shape)}; "
                    "reduce it (e.g. .mean()) first"
                )
        dtype = torch.float32
        for item in items:
            dtype = torch.promote_types(dtype, item.dtype)
        # 0-d losses of the common dtype pass as they are (no view node in their graphs)
        return [
            item if item.dim() == 0 and item.dtype == dtype else item.reshape(()).to(dtype)
            for item in items
        ]

    def values_by_task(
        self, values: Mapping[Any, Any] | Iterable[Any], what: str, *, partial: bool = False
    ) -> list[Any]:
        """Per-task values in task order from a mapping (keys matched as ``str``) or a sequence.

        Unknown names always raise :class:`~taskbalance.errors.TaskMismatchError` (a typo
        must not be ignored); missing names raise too unless ``partial`` is set, in which
        case they come back as ``None``.
        """
        if isinstance(values, Mapping):
            by_name = {str(name): value for name, value in values.items()}
            missing = [t for t in self.tasks if t not in by_name]
            extra = [n for n in by_name if n not in self.tasks]
            if extra or (missing and not partial):
                raise TaskMismatchError(
                    f"{what} do not match the tasks {list(self.tasks)}: "
                    f"missing {[] if partial else missing}, unexpected {extra}"
                )
            return [by_name.get(t) for t in self.tasks]
        items = list(values)
        if len(items) != self.num_tasks:
            raise TaskMismatchError(
                f"expected {self.num_tasks} {what} (one per task of {list(self.tasks)}), "
                f"got {len(items)} {what}"
            )
        return items

    def stack_losses(self, losses: Losses) -> Tensor:
        """:meth:`split_losses` stacked into a ``(K,)`` tensor, checked to be finite."""
        return self._check_finite(self._stack(losses))

    def _stack(self, losses: Losses) -> Tensor:
        if isinstance(losses, Tensor) and losses.dim() == 1 and losses.numel() == self.num_tasks:
            return self._promote(losses)
        return torch.stack(self.split_losses(losses))

    def global_losses(self, losses: Losses) -> Tensor:
        """The detached ``(K,)`` losses averaged over the ranks (as they are without DDP),
        checked to be finite; a skipped step raises the internal skip signal."""
        stacked = self._stack(losses).detach()
        sync = self.current_sync()
        if sync is not None:
            stacked = sync.mean([stacked])[0]
        return self._check_finite(stacked)

    @staticmethod
    def _promote(losses: Tensor) -> Tensor:
        if losses.dtype in (torch.float64, torch.float32):
            return losses
        return losses.float()

    def _check_finite(self, losses: Tensor) -> Tensor:
        if math.isfinite(float(losses.detach().sum())):
            return losses  # one reduction and one read in the usual case
        finite = torch.isfinite(losses.detach())
        if bool(finite.all()):
            return losses  # finite values whose sum overflows
        bad = int((~finite).nonzero()[0])
        task, value = self.tasks[bad], float(losses[bad].detach())
        if self.nonfinite == "raise":
            raise NonFiniteLossError(task, value)
        raise _SkipStepError(task, value)

    def begin_step(self, losses: Losses) -> tuple[list[Tensor], Tensor] | None:
        """Start a gradient step: the per-task losses (with graph) and their detached stack.

        Returns ``None`` when the step is skipped (``nonfinite="skip_step"``). A single
        stacked tensor is refused: it merges the tasks' graphs, which gradient methods
        must tell apart.
        """
        self.last_step_skipped = False
        items = self.split_separate(losses)
        try:
            stacked = self._check_finite(detached_stack(items))
        except _SkipStepError as err:
            self._skip(err)
            return None
        return items, stacked

    def split_separate(self, losses: Losses) -> list[Tensor]:
        """:meth:`split_losses`, refusing one stacked tensor (gradient methods)."""
        if isinstance(losses, Tensor):
            raise BalancerUsageError(
                f"{type(self).__name__} needs the task losses as a list or a dict (not one "
                "stacked tensor) so that each task's graph can be told apart"
            )
        return self.split_losses(losses)

    def _skip(self, err: _SkipStepError) -> None:
        self.skipped_steps += 1
        self.last_step_skipped = True
        self._skip_reason = err.what
        logger.warning(
            "%s: skipped a step because the %s of task %r is %s (%d skipped so far)",
            type(self).__name__,
            err.what,
            err.task,
            err.value,
            self.skipped_steps,
        )

    # ------------------------------------------------------------------ the step
    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        """Weights ``(K,)`` for this step from the detached losses ``(K,)``."""
        raise BalancerUsageError(
            f"{type(self).__name__} combines task gradients, not loss values: call "
            "balancer.backward(losses, shared=..., features=...) instead of balancer(losses)"
        )

    def combine(self, losses: Tensor, weights: Tensor) -> Tensor:
        """The scalar to backpropagate; by default ``sum_i w_i L_i``."""
        return (weights.to(losses.dtype) * losses).sum()

    def extras(self) -> dict[str, Tensor]:
        """Method-specific per-task values ``(K,)`` to record at each step (e.g. sigma)."""
        return {}

    def __call__(self, losses: Losses, **context: Any) -> Tensor:
        """Return the combined scalar loss for this step (loss-weighting methods).

        Under DDP its value is the combined loss of the global batch (the same on every
        rank) and its gradient is ``sum_i w_i dL_i/dθ`` of the local losses, which DDP
        averages into the global batch's gradient; with ``accumulation_steps=N`` both are
        divided by N.

        Raises:
            BalancerUsageError: autograd is disabled (an evaluation: use :meth:`evaluate`).
        """
        self._check_training_call()
        sync = self.current_sync()
        if sync is not None or self.accumulation_steps > 1:
            return self._call_general(losses, sync, context)
        self.last_step_skipped = False
        try:
            stacked = self.stack_losses(losses)
        except _SkipStepError as err:
            self._skip(err)
            return torch.zeros((), requires_grad=True)
        weights = self.compute_weights(stacked.detach(), **context)
        total = self.combine(stacked, weights)
        if self._diag_every:
            self._diagnose_loss_step(weights, None)
        self.record_step(stacked.detach(), weights)
        return total

    def _call_general(self, losses: Losses, sync: Sync | None, context: dict[str, Any]) -> Tensor:
        """:meth:`__call__` under DDP and/or gradient accumulation."""
        boundary = self._begin_call(rerun=True)
        self.last_step_skipped = False
        local = self._stack(losses)
        try:
            if sync is None:
                stacked = self._check_finite(local.detach())
            else:
                stacked = self._check_finite(sync.mean([local.detach()])[0])
        except _SkipStepError as err:
            self._skip(err)
            self._end_call(None, None, boundary, sync, context)
            return torch.zeros((), requires_grad=True)
        self._restore_micro()
        weights = self.compute_weights(stacked, **context)
        if sync is None:
            total = self.combine(local, weights)
        else:
            # value: the global combined loss; gradient: sum_i w_i dL_i of the local losses
            # (DDP averages it) plus the learnable parameters' gradient at the global losses
            surrogate = weights.detach().to(local.dtype) * (local - local.detach())
            total = self.combine(stacked, weights) + surrogate.sum()
        if self.accumulation_steps > 1:
            total = total / self.accumulation_steps
        if self._diag_every:
            self._diagnose_loss_step(weights, sync)
        self._end_call(stacked, weights, boundary, sync, context)
        return total

    def _check_training_call(self) -> None:
        """Refuse a step with autograd disabled: it can only be an evaluation, and counting
        it as a training step would advance the method's state with validation losses."""
        if not torch.is_grad_enabled():
            raise BalancerUsageError(
                f"{type(self).__name__} was called with autograd disabled (torch.no_grad() or "
                "torch.inference_mode()): every call is a training step and advances the "
                "method's state and history. For a weighted validation loss use "
                "balancer.evaluate(losses), which touches no state"
            )

    def evaluate(self, losses: Losses, **context: Any) -> Tensor:
        """The combined loss for ``losses`` as this step would weight it, touching no state.

        For logging a weighted validation loss: no history row, no step counted, no period
        mean, no random draw consumed, no learnable parameter stepped (the method's state is
        saved and put back). Gradient methods, whose weights come from gradients, weight the
        losses with the last step's weights (1 before the first step). Runs without
        autograd and returns a detached scalar; local to this process under DDP.
        """
        stacked = self._check_finite_for_evaluate(losses)
        with torch.no_grad():
            if self.kind == "gradient":
                weights = (
                    torch.ones_like(stacked)
                    if self.last_weights is None
                    else self.last_weights.to(stacked)
                )
                return (weights * stacked).sum()
            saved_state, saved_attrs = _clone(self.method_state()), dict(vars(self))
            try:
                weights = self.evaluation_weights(stacked, **context)
                return self.combine(stacked, weights).detach()
            finally:
                self.load_method_state(saved_state)
                vars(self).update(saved_attrs)

    def evaluation_weights(self, losses: Tensor, **context: Any) -> Tensor:
        """The weights :meth:`evaluate` uses (its caller puts the state back afterwards);
        by default :meth:`compute_weights`. A method whose weight computation also acts
        on the past (FAMO's catch-up step of its logits) overrides this."""
        return self.compute_weights(losses, **context)

    def _check_finite_for_evaluate(self, losses: Losses) -> Tensor:
        stacked = self._stack(losses).detach()
        try:
            return self._check_finite(stacked)
        except _SkipStepError as err:  # nonfinite="skip_step": an evaluation still reports it
            raise NonFiniteLossError(err.task, err.value) from None

    def backward(
        self,
        losses: Losses,
        shared: Any = None,
        features: Any = None,
        **context: Any,
    ) -> Tensor | None:
        """Backpropagate this step's combined loss; return the task weights used.

        For loss-weighting methods this is ``balancer(losses).backward()``: the update is
        the same with or without ``diagnostics=``. ``shared`` and ``features`` are used
        only on the steps diagnosed (``diagnostics=``), where the engine computes the task
        gradients from them (exact mode with ``shared=``, features mode with
        ``features=``) for the diagnostics before the combined loss is backpropagated.
        """
        total = self.balanced_loss(losses, shared=shared, features=features, **context)
        if total is None:
            return None
        total.backward()
        return self.last_weights

    def balanced_loss(
        self, losses: Losses, *, shared: Any = None, features: Any = None, **context: Any
    ) -> Tensor | None:
        """``balancer(losses)``, diagnosed: the combined loss to backpropagate yourself
        (``None`` when the step was skipped, ``nonfinite="skip_step"``).

        The same as ``balancer(losses, **context)``, except on the steps that
        ``diagnostics=`` diagnoses, where the task gradients are computed from ``shared``
        (exact mode) or ``features`` (features mode) for the diagnostics first. For a
        backward of your own (a GradScaler's ``scaler.scale(loss).backward()``,
        Lightning's ``manual_backward``)::

            total = balancer.balanced_loss(losses, shared=model.body)
            scaler.scale(total).backward()
        """
        if self._diag_every and self.steps % self._diag_every == 0:
            if shared is not None or features is not None:
                losses, _ = with_reference(losses)  # a one-shot iterator becomes a list
                if isinstance(losses, Tensor):
                    raise BalancerUsageError(
                        f"{type(self).__name__} with diagnostics= needs the task losses as a "
                        "list or a dict, not one stacked tensor, so that each task's gradient "
                        "can be told apart on the diagnosed steps: pass [loss_a, loss_b, ...]"
                    )
                self._diag_pending = (self.split_losses(losses), shared, features)
            try:
                total = self(losses, **context)
            finally:
                self._diag_pending = None
        else:
            total = self(losses, **context)
        return None if self.last_step_skipped else total

    def record_step(self, losses: Tensor, weights: Tensor) -> None:
        """Bookkeeping after a successful step: counter, last weights, history."""
        weights = weights.detach()
        self.last_weights, self.last_losses = weights, losses.detach()
        if self.history is not None:
            extras = self.extras()
            if self._diag_sum is not None:
                extras.update(self._take_diagnostics(losses))
            self.history.append(self.steps, losses, weights, **extras)
        self.steps += 1

    # ------------------------------------------------------------------ diagnostics
    #: steps between two diagnosed steps (0: diagnostics off); see ``diagnostics=``.
    _diag_every = 0
    _diag_sum: dict[str, Tensor] | None = None  # summed over the step's micro-batches
    _diag_count = 0
    _diag_initial: Tensor | None = None  # the losses of the first diagnosed step
    #: the diagnostics of the last diagnosed step by column name (``None`` before one).
    last_diagnostics: dict[str, Tensor] | None = None
    #: the step number (history row) of :attr:`last_diagnostics`.
    last_diagnostics_step: int | None = None

    #: a diagnosed step's ``(losses, shared, features)``, set by :meth:`backward` for the
    #: call it makes (loss-weighting methods)
    _diag_pending: tuple[list[Tensor], Any, Any] | None = None
    _diag_warned_call = False  # a diagnosed step without shared=/features= was warned about
    _diag_warned_heads = False  # a head in shared= of a diagnosed step was warned about

    @classmethod
    def supports_diagnostics(cls) -> bool:
        """Whether ``diagnostics=`` can be used: the method forms the task gradients'
        Gramian through the engine (gradient methods), or is a loss-weighting method,
        whose diagnosed steps compute it through the engine from ``backward``'s
        ``shared=`` / ``features=`` (see :mod:`taskbalance.diagnostics`)."""
        return cls.kind == "loss"

    def _diagnose_loss_step(self, weights: Tensor, sync: Sync | None) -> None:
        """A loss-weighting method's call: on a diagnosed step, the diagnostics of the
        update ``d = wᵀJ`` from the Gramian of the task gradients (kept for the step)."""
        if self.steps % self._diag_every != 0:
            return
        pending, self._diag_pending = self._diag_pending, None
        if pending is None:
            if not self._diag_warned_call:
                self._diag_warned_call = True
                warn(
                    f"{type(self).__name__}(diagnostics=...): this diagnosed step was called "
                    "without shared= or features=, so no task gradient was computed and no "
                    "diagnostics were recorded (loss = balancer(losses); loss.backward() "
                    "cannot be diagnosed). Call balancer.backward(losses, shared=model.body) "
                    "(or features=z) instead of balancer(losses).backward(), or "
                    "balancer.balanced_loss(losses, shared=model.body) for a backward of your "
                    "own. Warned once"
                )
            return
        from taskbalance.diagnostics import step_diagnostics, task_gramian

        items, shared, features = pending
        gram, single = task_gramian(items, self.tasks, shared=shared, features=features, sync=sync)
        if single is not None and not self._diag_warned_heads:
            self._diag_warned_heads = True
            warn(
                f"{type(self).__name__}(diagnostics=...): shared= holds tensors that only one "
                f"task's loss reaches ({single}); they look like a head. The update is not "
                "affected, but the diagnostics count them as shared: a head's gradient "
                "inflates its task's norm and lowers its cosines. Pass only the trunk as "
                "shared= (e.g. model.body). Warned once"
            )
        self._add_diagnostics(step_diagnostics(gram, weights.detach()))

    def _init_diagnostics(self, diagnostics: bool | int) -> None:
        if isinstance(diagnostics, bool):
            every = int(diagnostics)
        elif isinstance(diagnostics, int) and diagnostics >= 1:
            every = diagnostics
        else:
            raise ValueError(
                "diagnostics must be True (every step), False (off) or a positive int n "
                f"(every n-th step), got {diagnostics!r}"
            )
        if not every:
            return
        if not self.supports_diagnostics():
            raise BalancerUsageError(
                f"{type(self).__name__} (a gradient method with a step of its own) cannot "
                "record diagnostics=: they come from the Gramian of the task gradients that "
                "the engine forms (for the engine's gradient methods, e.g. tb.MGDA, "
                "tb.UPGrad, tb.PCGrad, and on the diagnosed steps of the loss-weighting "
                "methods), and this method does not form it through the engine. Leave "
                "diagnostics= out, or build another method with diagnostics=True to look at "
                "the conflict structure"
            )
        if self.history is None:
            raise BalancerUsageError(
                "diagnostics= are recorded in balancer.history, which record=False turns "
                "off: pass record=True (the default) or leave diagnostics= out"
            )
        from taskbalance.diagnostics import PREFIX, pair_labels

        self._diag_every = every
        self.history.define_extra(f"{PREFIX}/cos", pair_labels(self.tasks))
        self.history.define_extra(f"{PREFIX}/norm_ratio", [""])
        self.history.define_extra(f"{PREFIX}/conflict_fraction", [""])

    def _add_diagnostics(self, values: dict[str, Tensor]) -> None:
        """Add one computed call's diagnostics to the open step's (a mean is recorded)."""
        if self._diag_sum is None:
            self._diag_sum = dict(values)
            self._diag_count = 1
        else:
            for name, value in values.items():
                self._diag_sum[name] = self._diag_sum[name] + value
            self._diag_count += 1

    def _take_diagnostics(self, losses: Tensor) -> dict[str, Tensor]:
        """The step's diagnostics as history extras (with the loss ratios of ``losses``);
        clears them and sets :attr:`last_diagnostics`."""
        from taskbalance.diagnostics import PREFIX, loss_ratios

        assert self._diag_sum is not None and self.history is not None
        values = {name: v / self._diag_count for name, v in self._diag_sum.items()}
        self._diag_sum, self._diag_count = None, 0
        losses = losses.detach().double()
        if self._diag_initial is None:
            self._diag_initial = losses.clone()
        values[f"{PREFIX}/loss_ratio"] = loss_ratios(losses, self._diag_initial.to(losses))
        named: dict[str, Tensor] = {}
        for name, value in values.items():
            for label, item in zip(self.history.extra_columns(name), value.reshape(-1)):
                named[f"{name}/{label}" if label else name] = item
        self.last_diagnostics, self.last_diagnostics_step = named, self.steps
        return values

    def end_period(self) -> None:
        """Mark the end of a period (an epoch) for methods defined per period; else a no-op."""

    # ------------------------------------------------------------------ DDP and accumulation
    def current_sync(self) -> Sync | None:
        """The cross-rank synchroniser in effect now (``None`` in a single process).

        At the first synchronised call, the balancer's random generators take rank 0's
        state, so that random methods draw the same numbers on every rank.
        """
        sync = active_sync(self.distributed)
        if sync is not None and not self._random_synced:
            for generator in self._generators():
                sync.broadcast_generator(generator)
            self._random_synced = True
        return sync

    def _generators(self) -> list[torch.Generator]:
        return [v for v in vars(self).values() if isinstance(v, torch.Generator)]

    def _learnables(self) -> list[OwnedParameters]:
        found = getattr(self, "learnable", None)
        return [found] if isinstance(found, OwnedParameters) else []

    def micro_scale(self) -> float | None:
        """``1/N`` under accumulation (the share of one micro-batch), ``None`` otherwise."""
        return 1.0 / self.accumulation_steps if self.accumulation_steps > 1 else None

    def merge_context(self, contexts: list[dict[str, Any]]) -> dict[str, Any]:
        """The context (e.g. ``kpi=``) of a whole accumulated step, from its micro-batches'.

        Used once per accumulated step to advance the state of loss-weighting methods;
        the default is the last micro-batch's context.
        """
        return contexts[-1] if contexts else {}

    def close_accumulated_step(self) -> None:
        """Hook: finish method-specific work at the end of an accumulated step."""

    def _begin_call(self, *, rerun: bool) -> bool:
        """Start a call; return whether it closes the step (always, without accumulation).

        Under accumulation the first call of a step saves the state (see
        :meth:`_restore_micro`); learnable parameters hold their gradients until the last
        micro-batch.
        """
        n = self.accumulation_steps
        if n == 1:
            return True
        if self._open is None:
            snapshot = _clone(self.method_state()) if self.restores_micro_batches else None
            self._open = _OpenStep(snapshot=snapshot, rerun=rerun)
        boundary = self._open.calls + 1 == n
        for learnable in self._learnables():
            learnable.hold = not boundary
        return boundary

    def _restore_micro(self) -> None:
        """Before a micro-batch's weights are computed: go back to the state of the start
        of the accumulated step (skipped micro-batches never get here, so the state a
        gradient method keeps at the end is that of its last computed micro-batch)."""
        step = self._open
        if step is not None and step.calls > 0 and step.snapshot is not None:
            self.load_method_state(_clone(step.snapshot))

    def _end_call(
        self,
        losses: Tensor | None,
        weights: Tensor | None,
        boundary: bool,
        sync: Sync | None,
        context: dict[str, Any] | None = None,
    ) -> None:
        """Bookkeeping after a call; ``losses is None`` for a skipped micro-batch."""
        if self._open is None:
            if losses is not None and weights is not None:
                self.record_step(losses, weights)
            if sync is not None:
                self._reduce_touched(sync)
            return
        self._open.calls += 1
        if losses is not None and weights is not None:
            self.last_weights, self.last_losses = weights.detach(), losses.detach()
            self._open.add(losses.detach(), self.last_weights, context or {})
        if boundary:
            self._close(sync, release=losses is None)

    def flush(self) -> None:
        """Close an open accumulated step now, with the micro-batches seen so far.

        For an epoch whose length is not a multiple of ``accumulation_steps``: call it after
        the last micro-batch, before the optimizer step. Each micro-batch contributed 1/N
        of its gradient, as it would in a full step. A no-op when no step is open. Under
        DDP every rank must call it.
        """
        if self._open is not None:
            self._close(self.current_sync(), release=True)

    def _close(self, sync: Sync | None, *, release: bool) -> None:
        """End the open accumulated step: advance the state once, record it, release."""
        step = self._open
        assert step is not None
        self._open = None
        if step.snapshot is not None and (step.count == 0 or step.rerun):
            self.load_method_state(_clone(step.snapshot))
        mean_losses = step.mean_losses()
        if mean_losses is not None and step.rerun:
            like = mean_losses.to(step.dtype)
            self.compute_weights(like, **self.merge_context(step.contexts))
        self.close_accumulated_step()
        for learnable in self._learnables():
            if release:
                learnable.release()
            learnable.hold = False
        if mean_losses is not None:
            if self.history is not None:
                extras = self.extras()
                if self._diag_sum is not None:
                    extras.update(self._take_diagnostics(mean_losses))
                self.history.append(self.steps, mean_losses, step.mean_weights(), **extras)
            self.steps += 1
        self._diag_sum, self._diag_count = None, 0
        if sync is not None:
            self._reduce_touched(sync)

    def touch(self, tensors: Iterable[Tensor]) -> None:
        """Mark tensors whose ``.grad`` got rank-local contributions (averaged at the end of
        the step under DDP)."""
        for t in tensors:
            self._touched.setdefault(id(t), t)

    def _reduce_touched(self, sync: Sync) -> None:
        """Average the ``.grad`` of every touched tensor over the ranks, in place."""
        tensors = [t for t in self._touched.values() if t.grad is not None]
        self._touched = {}
        if not tensors:
            return
        reduced = sync.mean([t.grad for t in tensors])
        for t, value in zip(tensors, reduced):
            t.grad.copy_(value)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The method's own state (tensors and plain Python values only)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly; loadable with ``weights_only=True``.

        Inside an open accumulated step the method's state is the one saved at the start of
        that step (like the model's parameters, which have not been stepped yet): a resumed
        run redoes the whole accumulated step.
        """
        open_step = self._open
        state = (
            _clone(open_step.snapshot)
            if open_step is not None and open_step.snapshot is not None
            else self.method_state()
        )
        return {
            "method": self.method_name,
            "tasks": list(self.tasks),
            "hyperparameters": {k: _plain(v) for k, v in self.hyperparameters().items()},
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "last_weights": self.last_weights,
            "state": state,
            "history": self.history.state_dict() if self.history is not None else None,
            **(
                {"diagnostics_initial_losses": self._diag_initial.cpu().clone()}
                if self._diag_initial is not None
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; keep this balancer's hyper-parameters.

        The rule, the same for every method: a checkpoint restores *state* (step counter,
        history, the method's running values, learnable parameters and their optimizer's
        moments, random generators); *hyper-parameters* (every constructor argument, e.g.
        DWA's temperature, a learnable balancer's ``lr``) are the constructor's. Starting
        values (a ``seed``, uncertainty weighting's ``init``) are superseded by the state
        they started. When the checkpoint was saved
        with other values, a :class:`~taskbalance.errors.TaskBalanceWarning` names each one;
        build the balancer with the checkpoint's values to continue the same run.
        """
        if state.get("method") != self.method_name:
            raise BalancerUsageError(
                f"state of method {state.get('method')!r} cannot be loaded into "
                f"{self.method_name!r}"
            )
        if list(state["tasks"]) != list(self.tasks):
            raise TaskMismatchError(
                f"state was saved for tasks {list(state['tasks'])}, this balancer has "
                f"{list(self.tasks)}"
            )
        self.load_method_state(state["state"])  # first: it refuses a state it cannot take
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.last_weights = state["last_weights"]
        if self._open is not None:
            self._open = None
            for learnable in self._learnables():
                learnable.clear_held()
        self._touched = {}
        if self.history is not None and state["history"] is not None:
            self.history.load_state_dict(state["history"])
        if self._diag_every:
            initial = state.get("diagnostics_initial_losses")
            self._diag_initial = None if initial is None else initial.double()
            self._diag_sum, self._diag_count = None, 0
        self._compare_hyperparameters(state.get("hyperparameters"))

    def _compare_hyperparameters(self, saved: dict[str, Any] | None) -> None:
        """Warn (once per load) about hyper-parameters that differ from the checkpoint's."""
        if saved is None:  # a checkpoint from before hyper-parameters were saved
            return
        mine = {k: _plain(v) for k, v in self.hyperparameters().items()}
        differ = [
            f"{name}={_short_repr(saved[name])} in the checkpoint, {_short_repr(value)} here"
            for name, value in mine.items()
            if name in saved and name not in _RUNTIME_SETTINGS and not _same(saved[name], value)
        ]
        if differ:
            warn(
                f"{type(self).__name__}.load_state_dict: the checkpoint was saved with other "
                f"hyper-parameters ({'; '.join(differ)}). The constructor's values are kept "
                "(a checkpoint restores state only); build the balancer with the checkpoint's "
                "values to continue the same run"
            )


#: constructor settings every balancer has; ``repr`` shows them only when not the default.
_COMMON_SETTINGS = frozenset(constructor_parameters(Balancer)) | {
    "task_specific",
    "tasks_per_step",
    "tasks_seed",
    "jacobian_free",
}
#: not compared on load: how a run is executed (``record``, ``distributed``), and starting
#: values that the checkpoint's state supersedes (a random ``seed``, a learnable's ``init``).
_RUNTIME_SETTINGS = frozenset({"record", "distributed", "seed", "init", "diagnostics"})


def _plain(value: Any) -> Any:
    """``value`` as plain Python values and CPU tensors (loadable with ``weights_only``);
    objects of other types become their ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    """Equality of plain values, tensors compared by value (and to equal sequences)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        try:
            return bool(torch.equal(torch.as_tensor(a).double(), torch.as_tensor(b).double()))
        except (TypeError, ValueError, RuntimeError):
            return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _short_repr(value: Any) -> str:
    """A compact repr: tensors as lists of numbers."""
    if isinstance(value, Tensor):
        return repr(value.tolist()) if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    return repr(value)


def _clone(value: Any) -> Any:
    """A deep copy of nested dicts / lists / tuples with every tensor cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


@dataclass
class _OpenStep:
    """An accumulated step in progress: the saved state and the micro-batches seen."""

    snapshot: dict[str, Any] | None
    rerun: bool  # loss-weighting: advance the state again with the mean losses at the end
    calls: int = 0
    count: int = 0  # micro-batches that were not skipped
    dtype: torch.dtype = torch.float32  # of the losses
    loss_sum: Tensor | None = None
    weight_sum: Tensor | None = None
    contexts: list[dict[str, Any]] = field(default_factory=list)

    def add(self, losses: Tensor, weights: Tensor, context: dict[str, Any]) -> None:
        self.dtype = losses.dtype
        losses, weights = losses.double(), weights.double()
        self.loss_sum = losses if self.loss_sum is None else self.loss_sum + losses
        self.weight_sum = weights if self.weight_sum is None else self.weight_sum + weights
        self.count += 1
        self.contexts.append(context)

    def mean_losses(self) -> Tensor | None:
        return None if self.loss_sum is None else self.loss_sum / self.count

    def mean_weights(self) -> Tensor | None:
        return None if self.weight_sum is None else self.weight_sum / self.count


class _SkipStepError(Exception):
    """Internal signal: a non-finite loss (or, ``what="gradient"``, a non-finite task
    gradient) under ``nonfinite='skip_step'``."""

    def __init__(self, task: str, value: float, what: str = "loss") -> None:
        super().__init__(task, value)
        self.task = task
        self.value = value if not math.isnan(value) else float("nan")
        self.what = what
