"""Joint training: every task contributes to every step, combined by a balancer.

One step is ``outputs = model(inputs)``, ``losses = loss_fn(outputs, batch)``,
``balancer.backward(losses, shared=..., features=...)``, ``optimizer.step()``; at each
epoch end ``balancer.end_period()`` closes the period of per-epoch methods (DWA).
The same loop serves loss-weighting methods (which ignore ``shared`` / ``features``) and
gradient methods (which need them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from taskbalance.balancer import Balancer
from taskbalance.history import History

#: ``criterion(output_of_task, target_of_task) -> scalar loss``.
Criterion = Callable[[Any, Any], Tensor]
#: per-task criteria by name, or ``loss_fn(outputs, batch) -> {task: loss}`` (or a sequence).
LossSpec = Mapping[str, Criterion] | Callable[[Any, Any], Any]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Default ``batch -> (inputs, targets)``.

    ``(x, y)`` gives ``(x, y)``; ``(x, y1, y2, ...)`` gives ``(x, (y1, y2, ...))``; a
    mapping with ``"input"`` gives ``(batch["input"], the other entries)``; anything else
    is taken as inputs without targets.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], (batch[1] if len(batch) == 2 else tuple(batch[1:]))
    if isinstance(batch, Mapping) and "input" in batch:
        return batch["input"], {k: v for k, v in batch.items() if k != "input"}
    return batch, None


def select(values: Any, task: str, index: int) -> Any:
    """Pick a task's entry: by name from a mapping, by position from a tuple or list."""
    if isinstance(values, Mapping):
        return values[task]
    if isinstance(values, (tuple, list)):
        return values[index]
    return values


def criteria_losses(
    criteria: Mapping[str, Criterion], tasks: Sequence[str], outputs: Any, targets: Any
) -> dict[str, Tensor]:
    """``{task: criteria[task](output of task, target of task)}`` for every task."""
    return {
        t: criteria[t](select(outputs, t, i), select(targets, t, i)) for i, t in enumerate(tasks)
    }


def stack_detached(losses: Any, tasks: Sequence[str]) -> Tensor:
    """The losses as a detached float64 ``(K,)`` tensor in task order (no host sync)."""
    items = [losses[t] for t in tasks] if isinstance(losses, Mapping) else list(losses)
    return torch.stack([v.detach().reshape(()).double() for v in items])


def make_progress(enabled: bool, description: str) -> Progress:
    """A rich progress bar (a disabled one when ``enabled`` is false)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )


@dataclass
class JointResult:
    """What :func:`train_joint` returns.

    ``epoch_losses[task][e]`` is the task's mean training loss over epoch ``e`` (steps the
    balancer skipped are left out); ``history`` is the balancer's per-step history.
    """

    tasks: tuple[str, ...]
    epoch_losses: dict[str, list[float]] = field(default_factory=dict)
    history: History | None = None
    steps: int = 0
    skipped_steps: int = 0

    @property
    def epochs(self) -> int:
        return len(next(iter(self.epoch_losses.values()), []))


def step_budget(epochs: float, batches: int) -> int:
    """The training steps of ``epochs`` passes over ``batches`` batches: whole epochs
    exactly, a fractional budget rounded to the nearest step and at least one (none for 0
    epochs)."""
    if float(epochs).is_integer():
        return int(epochs) * batches
    return max(1, round(epochs * batches))


def train_joint(
    model: Callable[[Any], Any],
    data: Iterable[Any],
    loss_fn: LossSpec,
    optimizer: torch.optim.Optimizer,
    balancer: Balancer,
    *,
    epochs: int = 1,
    split: Callable[[Any], tuple[Any, Any]] = split_batch,
    shared_parameters: Iterable[Tensor] | None = None,
    features_fn: Callable[[Any], Tensor] | None = None,
    context_fn: Callable[[Any, Any], Mapping[str, Any]] | None = None,
    on_epoch_end: Callable[[int, JointResult], None] | None = None,
    progress: bool = True,
    description: str = "joint",
) -> JointResult:
    """Train all tasks at every step, combining their losses with ``balancer``.

    Args:
        model: called as ``model(inputs)``; typically returns ``{task: output}``.
        data: re-iterable batches (a DataLoader, a list...), one pass per epoch; each batch
            is cut into ``(inputs, targets)`` by ``split`` (default :func:`split_batch`).
        loss_fn: per-task criteria ``{task: criterion(output, target)}`` (outputs and
            targets picked by task name from mappings, by task position from tuples or
            lists; extra keys such as ``"features"`` are ignored), or
            ``loss_fn(outputs, batch)`` returning the losses by name or position.
        optimizer: steps the model's parameters (not the balancer's: learnable balancers
            step their own by default).
        balancer: any method; ``balancer.backward`` is called every step.
        epochs: passes over ``data``; ``balancer.end_period()`` runs after each.
        shared_parameters: the shared parameters, for gradient methods (``shared=``).
        features_fn: ``features_fn(outputs)`` -> shared representation, for gradient
            methods' feature-level mode (``features=``); it must feed the losses.
        context_fn: ``context_fn(outputs, batch)`` -> extra keyword arguments for the
            balancer (e.g. ``{"kpi": ...}`` for DTP).
        on_epoch_end: called as ``on_epoch_end(epoch, result_so_far)`` after each epoch.
        progress: show a rich progress bar over epochs.
        description: the progress bar's label.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    tasks = balancer.tasks
    shared = list(shared_parameters) if shared_parameters is not None else None
    result = JointResult(tasks, {t: [] for t in tasks}, balancer.history)
    if isinstance(model, nn.Module):
        model.train()
    with make_progress(progress, description) as bar:
        bar_task = bar.add_task(description, total=epochs, info="")
        for epoch in range(epochs):
            total: Tensor | None = None
            count = 0
            for batch in data:
                inputs, targets = split(batch)
                optimizer.zero_grad(set_to_none=True)
                outputs = model(inputs)
                if isinstance(loss_fn, Mapping):
                    losses = criteria_losses(loss_fn, tasks, outputs, targets)
                else:
                    losses = loss_fn(outputs, batch)
                features = features_fn(outputs) if features_fn is not None else None
                context = dict(context_fn(outputs, batch)) if context_fn is not None else {}
                balancer.backward(losses, shared=shared, features=features, **context)
                result.steps += 1
                if balancer.last_step_skipped:
                    result.skipped_steps += 1
                    continue
                optimizer.step()
                step_losses = stack_detached(losses, tasks)
                total = step_losses if total is None else total + step_losses
                count += 1
            balancer.end_period()
            means = (total / count).tolist() if total is not None else [float("nan")] * len(tasks)
            for task, value in zip(tasks, means):
                result.epoch_losses[task].append(value)
            if on_epoch_end is not None:
                on_epoch_end(epoch, result)
            info = "  ".join(f"{t}={v:.4g}" for t, v in zip(tasks, means))
            bar.update(bar_task, advance=1, info=info)
    return result
