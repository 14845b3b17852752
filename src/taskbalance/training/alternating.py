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

Misuse is refused before the first step where it can be seen then (data that is not
``{task: batches}``, dictionaries whose tasks differ from the data's, empty data, a
misspelt schedule, unsized data without ``steps``) and at the step where it shows
otherwise (a model output or a target without the task, a loss that is not a scalar
tensor, a one-shot iterator that ran out), always naming the task and the fix. See
``docs/alternating.md``.
"""

from __future__ import annotations

import difflib
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from taskbalance.errors import NotScalarLossError, TaskBalanceWarning, TaskMismatchError
from taskbalance.training.joint import make_progress, split_batch

Schedule = Literal["random", "round_robin", "proportional"]
SCHEDULES: tuple[str, ...] = ("random", "round_robin", "proportional")


def dataset_size(data: Iterable[Any]) -> int:
    """Examples in ``data``: ``len(data.dataset)`` for a DataLoader, else ``len(data)``."""
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else len(data)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            "the proportional schedule needs sized data; pass sizes={task: n_examples}"
        ) from err


def check_schedule(schedule: str) -> None:
    """Raise :class:`ValueError` (with the closest name) unless ``schedule`` is known."""
    if schedule in SCHEDULES:
        return
    close = difflib.get_close_matches(str(schedule).replace("-", "_"), SCHEDULES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"schedule must be 'random', 'round_robin' or 'proportional', got {schedule!r}{hint}"
    )


def task_schedule(
    tasks: tuple[str, ...],
    schedule: Schedule,
    *,
    sizes: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Iterator[str]:
    """An endless, seeded sequence of task names (arguments checked at the call).

    ``"round_robin"``: the tasks in order, cyclically. ``"random"``: uniform draws.
    ``"proportional"``: draws with probability ``sizes[task] / sum(sizes)``.
    """
    check_schedule(schedule)
    weights: list[float] = []
    if schedule == "proportional":
        if sizes is None or any(t not in sizes for t in tasks):
            raise ValueError(f"the proportional schedule needs a size for every task of {tasks}")
        weights = [float(sizes[t]) for t in tasks]
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"sizes must be non-negative with a positive sum, got {weights}")
    return _draws(tasks, schedule, weights, seed)


def _draws(tasks: tuple[str, ...], schedule: str, weights: list[float], seed: int) -> Iterator[str]:
    if schedule == "round_robin":
        while True:
            yield from tasks
    rng = random.Random(seed)
    if schedule == "random":
        while True:
            yield rng.choice(tasks)
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
    model: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | nn.ModuleDict,
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
        model: ``model(inputs)`` for every task, returning ``{task: output}`` (the task's
            output is picked by name), or ``{task: forward}`` (a dict or an
            ``nn.ModuleDict``) when each task has its own path (e.g. a shared encoder and
            one decoder per language); a task's own forward may return its output directly.
        data: ``{task: iterable of batches}``, sizes may differ; restarted when exhausted
            (a one-shot iterator cannot be, so it may not run out before ``steps``).
        loss_fns: ``{task: criterion(output, target)}`` or one criterion for all tasks;
            targets come from ``split(batch)`` (picked by task name when a mapping holds
            the task, else used whole: each task's data carries its own targets). A
            criterion returns a scalar tensor.
        optimizer: one optimizer for everything, or ``{task: optimizer}`` holding the
            shared parameters and that task's own; only the active task's optimizer is
            zeroed and stepped at a step.
        steps: total steps over all tasks (default ``sum_i len(data_i)``; required when some
            task's data has no ``len()``).
        schedule: ``"random"``, ``"round_robin"`` or ``"proportional"`` (to dataset sizes).
        sizes: dataset sizes for ``"proportional"`` (default :func:`dataset_size`); ignored,
            with a warning, by the other schedules.
        seed: seeds the task draws.
        split: ``batch -> (inputs, targets)``.
        progress: show a rich progress bar over steps.
        description: the progress bar's label.

    Raises:
        TypeError: ``data`` is not a mapping, a task's data is not iterable, ``steps`` is
            not an int (or is needed and missing), a criterion returns no tensor.
        TaskMismatchError: a ``{task: ...}`` argument, a model output or a batch's targets
            name other tasks than ``data``.
        ValueError: empty data, an unknown schedule, bad sizes, negative ``steps``.
        NotScalarLossError: a criterion returns more than one element.
    """
    tasks = _tasks_of(data, model, loss_fns, optimizer)
    for name, given in (("model", model), ("loss_fns", loss_fns), ("optimizer", optimizer)):
        if _per_task(given):
            _check_keys(name, given, tasks)  # type: ignore[arg-type]
    check_schedule(schedule)
    if sizes is not None and schedule != "proportional":
        warnings.warn(
            f"sizes is only used by schedule='proportional', and the schedule is "
            f"{schedule!r}: the tasks are not drawn in proportion to {dict(sizes)}. Pass "
            "schedule='proportional' as well, or drop sizes",
            TaskBalanceWarning,
            stacklevel=2,
        )
    iterators = {t: _first_iterator(t, data[t]) for t in tasks}
    steps = _total_steps(steps, data, tasks)
    if schedule == "proportional" and sizes is None:
        sizes = {t: _size_for_proportional(t, data[t]) for t in tasks}
    order = task_schedule(tasks, schedule, sizes=sizes, seed=seed)
    result = AlternatingResult(tasks, [], {t: [] for t in tasks}, dict.fromkeys(tasks, 0))
    result.epochs = dict.fromkeys(tasks, 0)
    step_losses: dict[str, list[Tensor]] = {t: [] for t in tasks}
    per_task_model = _per_task(model)
    modules = model.values() if per_task_model else [model]  # type: ignore[union-attr]
    for module in modules:
        if isinstance(module, nn.Module):
            module.train()
    with make_progress(progress, description) as bar:
        bar_task = bar.add_task(description, total=steps, info="")
        for step in range(steps):
            task = next(order)
            batch = _next_batch(task, iterators, data, result)
            inputs, targets = split(batch)
            opt = optimizer[task] if isinstance(optimizer, Mapping) else optimizer
            opt.zero_grad(set_to_none=True)
            forward = model[task] if per_task_model else model  # type: ignore[index]
            outputs = forward(inputs)
            if step == 0 and not per_task_model and not isinstance(outputs, Mapping):
                _warn_one_output(outputs, tasks)
            criterion = loss_fns[task] if _per_task(loss_fns) else loss_fns  # type: ignore[index]
            output = _task_output(outputs, task, tasks, per_task_model)
            loss = _checked_loss(criterion(output, _task_target(targets, task, tasks)), task)
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


# ------------------------------------------------------------------ checks before training


def _per_task(given: Any) -> bool:
    """Whether an argument is given per task (``{task: ...}`` or an ``nn.ModuleDict``)."""
    return isinstance(given, (Mapping, nn.ModuleDict))


def _tasks_of(data: Any, *others: Any) -> tuple[str, ...]:
    """The tasks named by ``data``, which must be ``{task: batches}``."""
    if not isinstance(data, Mapping):
        known = next((list(o) for o in others if _per_task(o)), ["fr", "de"])
        example = ", ".join(f"{t!r}: loader_{t}" for t in known)
        if isinstance(data, (list, tuple)):
            what = f"a {type(data).__name__} of {len(data)} entries"
        else:
            what = f"a {type(data).__name__}"
        raise TypeError(
            f"data must be {{task: batches}}, one entry per task, got {what}. Name each "
            f"task's data: data={{{example}}}. When one loader holds every task's targets, "
            "give it to every task (data={task: loader for task in tasks}; targets are "
            "picked by task name) or train all tasks at each step with train_joint"
        )
    tasks = tuple(data)
    if not tasks:
        raise ValueError("data must name at least one task: data={task: batches}")
    return tasks


_FIXES = {
    "model": "give one forward per task of data, or one model whose outputs are keyed by task",
    "loss_fns": "give one criterion per task of data, or one criterion for all tasks",
    "optimizer": (
        "give one optimizer per task of data (each holding the shared parameters and that "
        "task's own), or a single optimizer for all tasks"
    ),
}


def _check_keys(name: str, given: Mapping[str, Any], tasks: Sequence[str]) -> None:
    missing = [t for t in tasks if t not in given]
    extra = [k for k in given if k not in tasks]
    if not missing and not extra:
        return
    problems = []
    if missing:
        plural = "s" if len(missing) > 1 else ""
        problems.append(f"{name} has no entry for task{plural} {', '.join(map(repr, missing))}")
    if extra:
        plural = "entries" if len(extra) > 1 else "an entry"
        problems.append(
            f"{name} has {plural} for {', '.join(map(repr, extra))}, which data does not name"
        )
    raise TaskMismatchError(f"{'; '.join(problems)} (data names {list(tasks)}): {_FIXES[name]}")


def _empty_data_error(task: str, data: Any) -> ValueError:
    dataset = getattr(data, "dataset", None)
    batch_size = getattr(data, "batch_size", None)
    if getattr(data, "drop_last", False) and batch_size and hasattr(dataset, "__len__"):
        return ValueError(
            f"the data of task {task!r} is empty: its DataLoader has {len(dataset)} examples, "
            f"batch_size={batch_size} and drop_last=True, so not one full batch; use "
            "drop_last=False or a smaller batch_size"
        )
    return ValueError(
        f"the data of task {task!r} is empty (it yields no batch): give it at least one "
        "batch (for a DataLoader, check its dataset, and that drop_last=True leaves a full "
        "batch)"
    )


def _first_iterator(task: str, data: Any) -> Iterator[Any]:
    """``iter(data)``, after checking that the task's data is iterable and not empty."""
    try:
        size = len(data)
    except TypeError:
        size = None
    if size == 0:
        raise _empty_data_error(task, data)
    try:
        return iter(data)
    except TypeError:
        raise TypeError(
            f"the data of task {task!r} is {data!r}, not an iterable of batches: give a "
            "DataLoader, a list of batches or another re-iterable"
        ) from None


def _total_steps(steps: Any, data: Mapping[str, Any], tasks: Sequence[str]) -> int:
    if steps is None:
        total = 0
        for task in tasks:
            try:
                total += len(data[task])
            except TypeError:
                raise TypeError(
                    f"the data of task {task!r} has no len() (an iterable dataset, a "
                    "generator...), so the default number of steps (one per batch of every "
                    "task) is unknown: pass steps=N, the total over all tasks"
                ) from None
        return total
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(
            f"steps must be a non-negative int (the optimizer steps over all tasks), got {steps!r}"
        )
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    return steps


def _size_for_proportional(task: str, data: Any) -> int:
    try:
        return dataset_size(data)
    except TypeError:
        raise TypeError(
            f"the proportional schedule draws tasks in proportion to their data's size, and "
            f"the data of task {task!r} has no len(): pass sizes={{task: n_examples}}"
        ) from None


# ------------------------------------------------------------------ checks at a step


def _warn_one_output(outputs: Any, tasks: tuple[str, ...]) -> None:
    if len(tasks) < 2:
        return
    warnings.warn(
        f"the model returned one {type(outputs).__name__}, not {{task: output}}: every "
        f"task's criterion gets the same output, so the tasks {list(tasks)} train one "
        "shared output. Return a dict keyed by the task names, or pass "
        "model={task: forward} (one forward per task); if the tasks share one output on "
        "purpose, pass model={task: model for task in tasks} to say so",
        TaskBalanceWarning,
        stacklevel=3,
    )


def _task_output(outputs: Any, task: str, tasks: Sequence[str], per_task_model: bool) -> Any:
    """The task's output: by name from a mapping; a task's own forward may return it whole."""
    if not isinstance(outputs, Mapping) or task in outputs:
        return outputs[task] if isinstance(outputs, Mapping) else outputs
    if per_task_model and not any(k in tasks for k in outputs):
        return outputs  # the task's own forward returned a dict of its own
    where = f"model[{task!r}]" if per_task_model else "the model"
    raise TaskMismatchError(
        f"task {task!r}: {where}'s outputs are keyed {sorted(map(str, outputs))}, with no "
        f"{task!r}. Key the model's outputs by the task names of data ({list(tasks)}), or "
        "pass model={task: forward} with one forward per task"
    )


def _task_target(targets: Any, task: str, tasks: Sequence[str]) -> Any:
    """The task's target: by name from a mapping that holds it, else the targets whole
    (each task's data carries its own) unless they are keyed by other tasks."""
    if not isinstance(targets, Mapping):
        return targets
    if task in targets:
        return targets[task]
    if any(k in tasks for k in targets):
        raise TaskMismatchError(
            f"task {task!r}: its batch's targets are keyed {sorted(map(str, targets))}, with "
            f"no {task!r}. Give each task data whose targets are its own, or key them by "
            f"the task names of data ({list(tasks)})"
        )
    return targets


def _checked_loss(loss: Any, task: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"the criterion of task {task!r} returned a {type(loss).__name__}, not a scalar "
            "tensor: return the loss as a tensor connected to the model (e.g. "
            "nn.functional.mse_loss(output, target))"
        )
    if loss.numel() != 1:
        raise NotScalarLossError(
            f"the loss of task {task!r} has shape {tuple(loss.shape)}, not one element: give "
            "a criterion that reduces over the batch (reduction='mean' or 'sum')"
        )
    return loss


def _next_batch(
    task: str,
    iterators: dict[str, Iterator[Any]],
    data: Mapping[str, Iterable[Any]],
    result: AlternatingResult,
) -> Any:
    try:
        return next(iterators[task])
    except StopIteration:
        pass
    source = data[task]
    if isinstance(source, Iterator) and result.step_counts[task] > 0:
        drawn = result.step_counts[task]
        raise ValueError(
            f"the data of task {task!r} is a one-shot iterator (a generator or iter(...)), "
            f"exhausted after {drawn} batches, and it cannot restart: give a re-iterable "
            f"(a list, a DataLoader), or an endless iterator, or at most {drawn} steps to "
            "this task"
        )
    result.epochs[task] += 1
    iterators[task] = iter(source)
    try:
        return next(iterators[task])
    except StopIteration:
        raise _empty_data_error(task, source) from None
