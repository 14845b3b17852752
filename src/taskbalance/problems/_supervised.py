"""The training and evaluation loop shared by the supervised comparison problems.

A supervised problem (MultiDigits, Penguins) is a fixed in-memory data set with one target
per task, a model with a shared body and one head per task, and per-task metrics on a
held-out test set. :class:`SupervisedProblem` implements
:meth:`~taskbalance.compare.problem.ComparisonProblem.run` once for all of them; a subclass
only declares its tasks (:class:`SupervisedTask`), builds its data (:class:`SupervisedData`)
and its model, and picks the optimiser settings.

One run (``seed`` fixed):

* ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng` (the caller's global RNG
  is left as it was), then the model is built (so every method starts from the same
  initial weights for a seed) and then the balancer;
* mini-batches are drawn from a reshuffling of the training set by a generator of their
  own, seeded with ``seed``, so every method sees the same batch sequence for a seed
  (whatever global random numbers the method itself draws);
* each step: forward, per-task losses by task name, one
  :func:`~taskbalance.compare.problem.balanced_backward` call (``shared=`` the model's
  shared parameters, ``features=`` its shared representation, ``kpi=`` the per-batch KPIs),
  then the optimiser step unless the balancer skipped the step; a balancer with a
  ``meta_step`` (Auto-Lambda) first gets one, with this batch and a batch of the training
  set in an independent order of its own (the official code's second loader);
* ``balancer.end_period()`` after every epoch;
* at the end, the metrics on the whole test set (``model.eval()``, no gradients).

Losses: cross-entropy on the logits for a classification task, mean squared error on the
standardised target for a regression task. KPIs (for DTP; Guo et al., ECCV 2018, use the
training accuracy): the batch accuracy for a classification task, and
``exp(-MAE)`` for a regression task, MAE measured in units of the target's training
standard deviation (1 for a perfect fit, ``e^-1`` when the error is one standard
deviation); both clamped to ``[1e-3, 1]`` so that the KPI never leaves (0, 1].

Losses of binary tasks: binary cross-entropy on one logit; their KPI is the batch accuracy.

Metrics, per task ``t``: ``t_acc`` (test accuracy, higher is better), ``t_auc`` (a binary
task's test ROC AUC, higher is better) or ``t_mae`` (test mean absolute error in the
target's own unit, lower is better), all counted in Δm%, then any summary metrics of the
problem (:meth:`SupervisedProblem.summary_metrics`), and ``t_loss`` (the test loss, a
diagnostic left out of Δm%). A problem with a validation set also reports every metric on
it, in ``RunResult.extras["validation"]``.
"""

from __future__ import annotations

import functools
import math
import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskbalance.balancer import Balancer
from taskbalance.compare.problem import (
    BalancerFactory,
    ComparisonProblem,
    Metric,
    RunResult,
    Size,
    after_step,
    balanced_backward,
)
from taskbalance.problems._scores import roc_auc
from taskbalance.training.joint import make_progress, step_budget

TaskKind = Literal["classification", "binary", "regression"]
KINDS: tuple[str, ...] = ("classification", "binary", "regression")

#: the lowest KPI handed to a balancer (DTP's ``log k`` must stay finite).
MIN_KPI = 1e-3


@dataclass(frozen=True)
class SupervisedTask:
    """One task of a supervised problem.

    Args:
        name: the task name (the balancer's task, the model's head).
        kind: ``"classification"`` (integer class targets, logits out), ``"binary"`` (0/1
            float targets, one logit out; reported by its ROC AUC) or ``"regression"`` (a
            standardised float target, one output).
        unit: the unit of the reported MAE (documentation only).
    """

    name: str
    kind: TaskKind
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")


@dataclass(frozen=True)
class SupervisedData:
    """In-memory train, test and (optional) validation sets: inputs and one target tensor
    per task name.

    Classification targets are ``long`` of shape ``(N,)``; binary targets float 0/1 of shape
    ``(N,)``; regression targets are float of shape ``(N,)``, already standardised with
    training statistics. ``scales[task]`` is a regression target's training standard
    deviation in its own unit (the reported MAE is ``scale · MAE`` on the standardised
    target; 1 when absent). With ``x_val``/``y_val`` every run also reports its metrics on
    the validation set (``RunResult.extras["validation"]``), for model selection and the
    tuned-static baseline; the test set is then reported, never used for a choice.
    """

    x_train: Tensor
    y_train: dict[str, Tensor]
    x_test: Tensor
    y_test: dict[str, Tensor]
    scales: dict[str, float] = field(default_factory=dict)
    x_val: Tensor | None = None
    y_val: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("give both x_val and y_val, or neither")
        for task, scale in self.scales.items():
            if not scale > 0:
                raise ValueError(f"the scale of {task!r} must be positive, got {scale}")
        parts = [(self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")]
        if self.x_val is not None and self.y_val is not None:
            parts.append((self.x_val, self.y_val, "validation"))
        for x, ys, part in parts:
            for task, y in ys.items():
                if y.shape != (len(x),):
                    raise ValueError(
                        f"{part} target {task!r} has shape {tuple(y.shape)}, expected ({len(x)},)"
                    )


class SharedBodyModel(Protocol):
    """What the loop needs from a model (e.g. :class:`~taskbalance.models.hps.
    HardParameterSharing`): the shared representation, the heads on it, the shared
    parameters."""

    def features(self, x: Tensor) -> Tensor: ...

    def heads(self, z: Tensor, x: Tensor | None = None) -> dict[str, Tensor]: ...

    def shared_parameters(self) -> list[nn.Parameter]: ...


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads inside the block (``None``: leave the setting alone)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def task_loss(task: SupervisedTask, output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy on logits ``(B, C)``, binary cross-entropy on one logit ``(B, 1)`` /
    ``(B,)``, or MSE on a ``(B, 1)`` / ``(B,)`` prediction."""
    if task.kind == "classification":
        return F.cross_entropy(output, target)
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(target.shape), target)
    return F.mse_loss(output.reshape(target.shape), target)


def task_kpi(task: SupervisedTask, output: Tensor, target: Tensor) -> float:
    """The task's KPI on a batch, in ``[MIN_KPI, 1]``: accuracy (a binary task: logit above
    0 for a positive), or ``exp(-MAE)`` for a regression on a standardised target."""
    with torch.no_grad():
        if task.kind == "classification":
            value = (output.argmax(dim=1) == target).double().mean()
        elif task.kind == "binary":
            value = ((output.reshape(target.shape) > 0) == (target == 1)).double().mean()
        else:
            value = torch.exp(-(output.reshape(target.shape) - target).abs().double().mean())
    return min(max(float(value), MIN_KPI), 1.0)


def task_metrics(
    task: SupervisedTask, output: Tensor, target: Tensor, scale: float = 1.0
) -> dict[str, float]:
    """``{name_acc, name_auc or name_mae; name_loss}`` of one task on a whole evaluation
    set; a regression's MAE is multiplied by ``scale`` (the target's standard deviation)."""
    loss = float(task_loss(task, output, target))
    if task.kind == "binary":
        auc = roc_auc(output.reshape(target.shape), target, name=f"task {task.name!r}")
        return {f"{task.name}_auc": auc, f"{task.name}_loss": loss}
    if task.kind == "classification":
        acc = float((output.argmax(dim=1) == target).double().mean())
        return {f"{task.name}_acc": acc, f"{task.name}_loss": loss}
    mae = float((output.reshape(target.shape) - target).abs().double().mean()) * scale
    return {f"{task.name}_mae": mae, f"{task.name}_loss": loss}


class SupervisedProblem(ComparisonProblem):
    """A comparison problem on a fixed supervised data set; see the module docstring.

    Subclasses set :attr:`batch_size`, :attr:`lr`, :attr:`threads` and the class
    attributes of :class:`~taskbalance.compare.problem.ComparisonProblem`, and implement
    :meth:`supervised_tasks`, :meth:`build_data` and :meth:`build_model`. The data are
    built once per problem instance and reused by every run.
    """

    #: the optimiser: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
    optimizer: ClassVar[Literal["adam", "sgd"]] = "adam"

    #: per size: ``epochs``, ``batch_size`` and the problem's own sizes (e.g. ``n_train``).
    SIZES: ClassVar[dict[str, dict[str, int]]] = {}
    #: learning rate of the model's optimiser.
    LR: ClassVar[float] = 1e-3

    def __init__(self, size: Size = "full", data_seed: int = 0) -> None:
        super().__init__(size)
        if data_seed < 0:
            raise ValueError(f"data_seed must be non-negative, got {data_seed}")
        self.data_seed = int(data_seed)
        self.settings = dict(self.SIZES[size])
        self._data: SupervisedData | None = None

    @property
    def batch_size(self) -> int:
        """Mini-batch size (``SIZES[size]["batch_size"]``)."""
        return self.settings["batch_size"]

    @property
    def lr(self) -> float:
        """Learning rate of the model's optimiser (:attr:`LR`)."""
        return self.LR

    @property
    def default_epochs(self) -> int:
        return self.settings["epochs"]

    # ------------------------------------------------------------------ to implement
    @property
    def threads(self) -> int | None:
        """torch intra-op threads during a run (``None``: leave the setting alone).

        1 by default: these models are small, and on a shared 2-core machine a second
        intra-op thread made MultiDigits steps 10 times *slower* (threads waiting for a
        busy core at every operator); see ``docs/problems.md``.
        """
        return 1

    @abstractmethod
    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        """The tasks, in the order the balancer sees them."""

    @abstractmethod
    def build_data(self) -> SupervisedData:
        """The train and test sets (independent of the run's seed)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (initialised from torch's global RNG) following
        :class:`SharedBodyModel`."""

    # ------------------------------------------------------------------ derived
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.supervised_tasks())

    @property
    def metrics(self) -> tuple[Metric, ...]:
        out: list[Metric] = []
        for task in self.supervised_tasks():
            if task.kind == "classification":
                out.append(Metric(f"{task.name}_acc", task.name, higher_is_better=True))
            elif task.kind == "binary":
                out.append(Metric(f"{task.name}_auc", task.name, higher_is_better=True))
            else:
                out.append(Metric(f"{task.name}_mae", task.name, higher_is_better=False))
        out.extend(self.summary_metrics())
        for task in self.supervised_tasks():
            out.append(
                Metric(f"{task.name}_loss", task.name, higher_is_better=False, in_delta_m=False)
            )
        return tuple(out)

    def summary_metrics(self) -> tuple[Metric, ...]:
        """Metrics over all tasks (e.g. a mean AUC), listed after the per-task ones and
        computed by :meth:`summary_values`. None by default."""
        return ()

    def summary_values(
        self, outputs: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> dict[str, float]:
        """The values of :meth:`summary_metrics` from one evaluation set's outputs and
        targets (by task name)."""
        return {}

    def run_extras(self, model: nn.Module, data: SupervisedData) -> dict[str, Any]:
        """Anything more a run reports about the trained model (JSON-serialisable; added to
        ``RunResult.extras``). Nothing by default."""
        return {}

    def prepare(self) -> None:
        """Build the data set now (see :meth:`data`)."""
        self.data()

    def data(self) -> SupervisedData:
        """The data set, built on first use and then cached on the instance."""
        if self._data is None:
            self._data = self.build_data()
        return self._data

    def epoch_steps(self) -> int:
        """The training steps of one epoch: the mini-batches of the training set."""
        return math.ceil(len(self.data().x_train) / self.batch_size)

    def config(self) -> dict[str, Any]:
        sizes = {k: v for k, v in self.settings.items() if k != "epochs"}  # the runner's
        return {
            **super().config(),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "optimizer": self.optimizer,
            **sizes,
            "data_seed": self.data_seed,
        }

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam, or SGD with momentum 0.9, over every model parameter, at :attr:`lr`."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    # ------------------------------------------------------------------ the run
    def run(
        self,
        make_balancer: BalancerFactory,
        *,
        seed: int,
        epochs: float,
        progress: bool = False,
    ) -> RunResult:
        """Train one model with one balancer for ``epochs`` passes; evaluate on the test set.

        ``epochs`` may be fractional (the probe's short budgets): ``round(epochs × B)``
        steps in all, at least one, with B the batches of one epoch; the last, partial
        epoch ends its period and its loss record like a whole one."""
        if not epochs >= 0:
            raise ValueError(f"epochs must be non-negative, got {epochs}")
        data = self.data()
        with torch.random.fork_rng(devices=[]), torch_threads(self.threads):
            torch.manual_seed(seed)
            model = self.build_model()
            balancer = make_balancer()
            if tuple(balancer.tasks) != self.tasks:
                raise ValueError(
                    f"the balancer's tasks {list(balancer.tasks)} are not the problem's "
                    f"{list(self.tasks)}"
                )
            optimizer = self.make_optimizer(model)
            order = torch.Generator().manual_seed(seed)
            epoch_losses, steps, seconds = self._train(
                model, balancer, optimizer, data, order, epochs, progress
            )
            metrics = self.evaluate(model, data)
            extras: dict[str, Any] = {"skipped_steps": balancer.skipped_steps}
            if data.x_val is not None:
                extras["validation"] = self.evaluate(model, data, part="validation")
            extras.update(self.run_extras(model, data))
        histories = {"main": balancer.history} if balancer.history is not None else {}
        return RunResult(
            metrics=metrics,
            epoch_losses=epoch_losses,
            step_time=seconds / steps if steps else 0.0,
            steps=steps,
            histories=histories,
            extras=extras,
        )

    def _train(
        self,
        model: nn.Module,
        balancer: Balancer,
        optimizer: torch.optim.Optimizer,
        data: SupervisedData,
        order: torch.Generator,
        epochs: float,
        progress: bool,
    ) -> tuple[dict[str, list[float]], int, float]:
        tasks = self.supervised_tasks()
        names = self.tasks
        shared = list(model.shared_parameters())  # type: ignore[operator]
        epoch_losses: dict[str, list[float]] = {t: [] for t in names}
        steps, seconds = 0, 0.0
        n = len(data.x_train)
        budget = step_budget(epochs, self.epoch_steps())
        meta_batches = self._meta_batches(balancer, order, n)
        model.train()
        with make_progress(progress, self.name) as bar:
            bar_task = bar.add_task(self.name, total=math.ceil(epochs), info="")
            for _epoch in range(math.ceil(epochs)):
                total = torch.zeros(len(names), dtype=torch.float64)
                counted = 0
                for idx in torch.randperm(n, generator=order).split(self.batch_size):
                    if steps == budget:
                        break
                    start = time.perf_counter()
                    x = data.x_train[idx]
                    ys = {t: y[idx] for t, y in data.y_train.items()}
                    if meta_batches is not None:  # Auto-Lambda: look ahead on another batch
                        v = next(meta_batches)
                        balancer.meta_step(  # type: ignore[attr-defined]
                            model.parameters(),
                            train_losses=functools.partial(self._losses, model, x, ys),
                            val_losses=functools.partial(
                                self._losses,
                                model,
                                data.x_train[v],
                                {t: y[v] for t, y in data.y_train.items()},
                            ),
                            lr=optimizer.param_groups[0]["lr"],
                        )
                    optimizer.zero_grad(set_to_none=True)
                    z = model.features(x)  # type: ignore[operator]
                    outputs = model.heads(z, x)  # type: ignore[operator]
                    losses = {t.name: task_loss(t, outputs[t.name], ys[t.name]) for t in tasks}
                    kpi = functools.partial(self._kpis, outputs, ys)
                    balanced_backward(balancer, losses, shared=shared, features=z, kpi=kpi)
                    if not balancer.last_step_skipped:
                        optimizer.step()
                        # FAMO (Liu et al., NeurIPS 2023, Alg. 1) learns from the same
                        # batch's losses after the model step; a no-op for other methods
                        after_step(balancer, functools.partial(self._losses, model, x, ys))
                        total += torch.stack([losses[t].detach().double() for t in names])
                        counted += 1
                    seconds += time.perf_counter() - start
                    steps += 1
                balancer.end_period()
                means = (total / counted).tolist() if counted else [float("nan")] * len(names)
                for name, value in zip(names, means):
                    epoch_losses[name].append(value)
                info = "  ".join(f"{t}={v:.4g}" for t, v in zip(names, means))
                bar.update(bar_task, advance=1, info=info)
        return epoch_losses, steps, seconds

    def _meta_batches(
        self, balancer: Balancer, order: torch.Generator, n: int
    ) -> Iterator[Tensor] | None:
        """For a balancer with ``meta_step`` (Auto-Lambda): endless mini-batches of the
        training set in an order of their own (as the official code's second loader), drawn
        from a generator seeded from ``order``'s seed, so the training batches stay the
        same as every other method's; ``None`` for other balancers."""
        if not callable(getattr(balancer, "meta_step", None)):
            return None
        meta_order = torch.Generator().manual_seed(order.initial_seed() + 1)

        def batches() -> Iterator[Tensor]:
            while True:
                yield from torch.randperm(n, generator=meta_order).split(self.batch_size)

        return batches()

    def _kpis(self, outputs: dict[str, Tensor], ys: dict[str, Tensor]) -> dict[str, float]:
        """The per-task KPIs of a batch (see :func:`task_kpi`)."""
        return {t.name: task_kpi(t, outputs[t.name], ys[t.name]) for t in self.supervised_tasks()}

    def _losses(self, model: nn.Module, x: Tensor, ys: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-task losses of a batch at the model's current parameters."""
        outputs = model.heads(model.features(x), x)  # type: ignore[operator]
        return {t.name: task_loss(t, outputs[t.name], ys[t.name]) for t in self.supervised_tasks()}

    def evaluate(
        self,
        model: nn.Module,
        data: SupervisedData,
        chunk: int = 4096,
        part: Literal["test", "validation"] = "test",
    ) -> dict[str, float]:
        """Every metric on the whole test (or validation) set (``model.eval()``, no
        gradients)."""
        if part == "test":
            x_all, targets = data.x_test, data.y_test
        elif data.x_val is not None and data.y_val is not None:
            x_all, targets = data.x_val, data.y_val
        else:
            raise ValueError(f"{self.name} has no validation set")
        model.eval()
        pieces: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        with torch.no_grad():
            for x in x_all.split(chunk):
                outputs = model.heads(model.features(x), x)  # type: ignore[operator]
                for t in self.tasks:
                    pieces[t].append(outputs[t])
        joined = {t: torch.cat(p) for t, p in pieces.items()}
        metrics: dict[str, float] = {}
        for task in self.supervised_tasks():
            scale = data.scales.get(task.name, 1.0)
            metrics.update(task_metrics(task, joined[task.name], targets[task.name], scale))
        metrics.update(self.summary_values(joined, targets))
        return {m.name: metrics[m.name] for m in self.metrics}
