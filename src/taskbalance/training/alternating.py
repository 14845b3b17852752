"""Alternating training: one task per step, each task with its own data.

This is the classic recipe for tasks that do not share a dataset (translation
English→French and English→German with one shared encoder): at each step a schedule picks
one task, a batch is drawn from that task's data, and only that task's loss is minimised,
either by one shared optimizer or by the task's own optimizer (as in the TensorFlow 1
recipe with one ``optimizer.minimize(loss_i)`` per task).

Stopping rule: training runs for exactly ``steps`` optimizer steps in total (over all
tasks). Each task's data is an iterable that is restarted when exhausted; every restart
completes one epoch of that task (counted in :attr:`AlternatingResult.epochs`). Without
``steps``, the default is one step per batch of every dataset, ``sum_i len(data_i)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from taskbalance.training.joint import make_progress, split_batch

Schedule = Literal["random", "round_robin", "proportional"]


def dataset_size(data: Iterable[Any]) -> int:
    """Examples in ``data``: ``len(data.dataset)`` for a DataLoader, else ``len(data)``."""
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else len(data)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            "the proportional schedule needs sized data; pass sizes={task: n_examples}"
        ) from err


def task_schedule(
    tasks: tuple[str, ...],
    schedule: Schedule,
    *,
    sizes: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Iterator[str]:
    """An endless, seeded sequence of task names.

    ``"round_robin"``: the tasks in order, cyclically. ``"random"``: uniform draws.
    ``"proportional"``: draws with probability ``sizes[task] / sum(sizes)``.
    """
    if schedule == "round_robin":
        while True:
            yield from tasks
    rng = random.Random(seed)
    if schedule == "random":
        while True:
            yield rng.choice(tasks)
    if schedule != "proportional":
        raise ValueError(
            f"schedule must be 'random', 'round_robin' or 'proportional', got {schedule!r}"
        )
    if sizes is None or any(t not in sizes for t in tasks):
        raise ValueError(f"the proportional schedule needs a size for every task of {tasks}")
    weights = [float(sizes[t]) for t in tasks]
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"sizes must be non-negative with a positive sum, got {weights}")
    while True:
        yield from rng.choices(tasks, weights=weights, k=1024)


@dataclass
class AlternatingResult:
    """What :func:`train_alternating` returns.

    ``order`` is the task of every step; ``losses[task]`` the task's loss at each of its
    steps; ``step_counts[task]`` how many steps it got; ``epochs[task]`` how many times its
    data ran out and was restarted (completed passes).
    """

    tasks: tuple[str, ...]
    order: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    step_counts: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)


def train_alternating(
    model: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]],
    data: Mapping[str, Iterable[Any]],
    loss_fns: Mapping[str, Callable[[Any, Any], Tensor]] | Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
    *,
    steps: int | None = None,
    schedule: Schedule = "random",
    sizes: Mapping[str, float] | None = None,
    seed: int = 0,
    split: Callable[[Any], tuple[Any, Any]] = split_batch,
    progress: bool = True,
    description: str = "alternating",
) -> AlternatingResult:
    """Train one task per step, the task picked by ``schedule`` (see the module docstring).

    Args:
        model: ``model(inputs)`` for every task (its outputs picked by task name when it
            returns a mapping), or ``{task: forward}`` when each task has its own path
            (e.g. a shared encoder and one decoder per language).
        data: ``{task: iterable of batches}``, sizes may differ; restarted when exhausted.
        loss_fns: ``{task: criterion(output, target)}`` or one criterion for all tasks;
            targets come from ``split(batch)`` (picked by task name when a mapping holds
            the task, else used whole: each task's data carries its own targets).
        optimizer: one optimizer for everything, or ``{task: optimizer}`` holding the
            shared parameters and that task's own; only the active task's optimizer is
            zeroed and stepped at a step.
        steps: total steps over all tasks (default ``sum_i len(data_i)``).
        schedule: ``"random"``, ``"round_robin"`` or ``"proportional"`` (to dataset sizes).
        sizes: dataset sizes for ``"proportional"`` (default :func:`dataset_size`).
        seed: seeds the task draws.
        split: ``batch -> (inputs, targets)``.
        progress: show a rich progress bar over steps.
    """
    tasks = tuple(data)
    if not tasks:
        raise ValueError("data must name at least one task")
    for name, given in (("model", model), ("loss_fns", loss_fns), ("optimizer", optimizer)):
        if isinstance(given, Mapping) and set(given) != set(tasks):
            raise ValueError(f"{name} is keyed by {sorted(given)}, data by {sorted(tasks)}")
    if steps is None:
        steps = sum(len(data[t]) for t in tasks)  # type: ignore[arg-type]
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if schedule == "proportional" and sizes is None:
        sizes = {t: dataset_size(data[t]) for t in tasks}
    order = task_schedule(tasks, schedule, sizes=sizes, seed=seed)
    result = AlternatingResult(tasks, [], {t: [] for t in tasks}, dict.fromkeys(tasks, 0))
    result.epochs = dict.fromkeys(tasks, 0)
    iterators: dict[str, Iterator[Any]] = {t: iter(data[t]) for t in tasks}
    step_losses: dict[str, list[Tensor]] = {t: [] for t in tasks}
    modules = model.values() if isinstance(model, Mapping) else [model]
    for module in modules:
        if isinstance(module, nn.Module):
            module.train()
    with make_progress(progress, description) as bar:
        bar_task = bar.add_task(description, total=steps, info="")
        for _ in range(steps):
            task = next(order)
            batch = _next_batch(task, iterators, data, result.epochs)
            inputs, targets = split(batch)
            opt = optimizer[task] if isinstance(optimizer, Mapping) else optimizer
            opt.zero_grad(set_to_none=True)
            forward = model[task] if isinstance(model, Mapping) else model
            outputs = forward(inputs)
            criterion = loss_fns[task] if isinstance(loss_fns, Mapping) else loss_fns
            loss = criterion(_pick(outputs, task), _pick(targets, task))
            loss.backward()
            opt.step()
            result.order.append(task)
            result.step_counts[task] += 1
            step_losses[task].append(loss.detach().reshape(()))
            bar.update(bar_task, advance=1, info=task)
    for task in tasks:
        values = step_losses[task]
        result.losses[task] = torch.stack(values).double().tolist() if values else []
    return result


def _pick(values: Any, task: str) -> Any:
    return values[task] if isinstance(values, Mapping) and task in values else values


def _next_batch(
    task: str,
    iterators: dict[str, Iterator[Any]],
    data: Mapping[str, Iterable[Any]],
    epochs: dict[str, int],
) -> Any:
    try:
        return next(iterators[task])
    except StopIteration:
        epochs[task] += 1
        iterators[task] = iter(data[task])
        try:
            return next(iterators[task])
        except StopIteration:
            raise ValueError(f"the data of task {task!r} is empty") from None
