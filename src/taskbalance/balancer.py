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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.errors import (
    BalancerUsageError,
    NonFiniteLossError,
    NotScalarLossError,
    TaskMismatchError,
)
from taskbalance.history import History

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
        record: keep a :class:`~taskbalance.history.History` of every step.

    Every call is a training step: it advances the method's state (DWA's period means,
    RLW's random draws, the step counter) and is recorded in the history. Compute
    evaluation losses without the balancer (e.g. ``sum(losses)`` or your own weights).

    Subclasses of loss-weighting methods implement :meth:`compute_weights`; those whose
    combined loss is not a weighted sum (uncertainty weighting, GLS) override
    :meth:`combine` as well.
    """

    method_name: ClassVar[str] = ""
    #: ``"loss"``: weights come from loss values; ``"gradient"``: from task gradients.
    kind: ClassVar[str] = "loss"
    #: the method needs per-task KPIs in (0, 1] with the losses (``kpi=``; DTP).
    uses_kpi: ClassVar[bool] = False

    def __init__(
        self,
        tasks: Tasks,
        *,
        nonfinite: NonFinitePolicy = "raise",
        record: bool = True,
    ) -> None:
        if nonfinite not in ("raise", "skip_step"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip_step', got {nonfinite!r}")
        self.tasks: tuple[str, ...] = task_names(tasks)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.steps = 0
        self.skipped_steps = 0
        self.history: History | None = History(self.tasks) if record else None
        self.last_weights: Tensor | None = None
        self.last_step_skipped = False

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={list(self.tasks)})"

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
        return [item.reshape(()).to(dtype) for item in items]

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
        if isinstance(losses, Tensor) and losses.dim() == 1 and losses.numel() == self.num_tasks:
            return self._check_finite(self._promote(losses))
        return self._check_finite(torch.stack(self.split_losses(losses)))

    @staticmethod
    def _promote(losses: Tensor) -> Tensor:
        if losses.dtype in (torch.float64, torch.float32):
            return losses
        return losses.float()

    def _check_finite(self, losses: Tensor) -> Tensor:
        finite = torch.isfinite(losses.detach())
        if bool(finite.all()):
            return losses
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
        if isinstance(losses, Tensor):
            raise BalancerUsageError(
                f"{type(self).__name__} needs the task losses as a list or a dict (not one "
                "stacked tensor) so that each task's graph can be told apart"
            )
        items = self.split_losses(losses)
        try:
            stacked = self._check_finite(torch.stack([item.detach() for item in items]))
        except _SkipStepError as err:
            self._skip(err)
            return None
        return items, stacked

    def _skip(self, err: _SkipStepError) -> None:
        self.skipped_steps += 1
        self.last_step_skipped = True
        logger.warning(
            "%s: skipped a step because the loss of task %r is %s (%d skipped so far)",
            type(self).__name__,
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
        """Return the combined scalar loss for this step (loss-weighting methods)."""
        self.last_step_skipped = False
        try:
            stacked = self.stack_losses(losses)
        except _SkipStepError as err:
            self._skip(err)
            return torch.zeros((), requires_grad=True)
        weights = self.compute_weights(stacked.detach(), **context)
        total = self.combine(stacked, weights)
        self.record_step(stacked.detach(), weights)
        return total

    def backward(
        self,
        losses: Losses,
        shared: Any = None,
        features: Any = None,
        **context: Any,
    ) -> Tensor | None:
        """Backpropagate this step's combined loss; return the task weights used.

        For loss-weighting methods this is ``balancer(losses).backward()``; ``shared`` and
        ``features`` are accepted for a uniform signature and ignored.
        """
        total = self(losses, **context)
        if self.last_step_skipped:
            return None
        total.backward()
        return self.last_weights

    def record_step(self, losses: Tensor, weights: Tensor) -> None:
        """Bookkeeping after a successful step: counter, last weights, history."""
        weights = weights.detach()
        self.last_weights = weights
        if self.history is not None:
            self.history.append(self.steps, losses, weights, **self.extras())
        self.steps += 1

    def end_period(self) -> None:
        """Mark the end of a period (an epoch) for methods defined per period; else a no-op."""

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The method's own state (tensors and plain Python values only)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly; loadable with ``weights_only=True``."""
        return {
            "method": self.method_name,
            "tasks": list(self.tasks),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "last_weights": self.last_weights,
            "state": self.method_state(),
            "history": self.history.state_dict() if self.history is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.last_weights = state["last_weights"]
        self.load_method_state(state["state"])
        if self.history is not None and state["history"] is not None:
            self.history.load_state_dict(state["history"])


class _SkipStepError(Exception):
    """Internal signal: a non-finite loss under ``nonfinite='skip_step'``."""

    def __init__(self, task: str, value: float) -> None:
        super().__init__(task, value)
        self.task = task
        self.value = value if not math.isnan(value) else float("nan")
