"""What a problem must provide to be compared by ``taskbalance compare``.

A :class:`ComparisonProblem` trains one balancer on a fixed piece of work and returns a
:class:`RunResult`: final metrics (one or more per task), per-epoch training losses, the
balancer histories and the mean wall time of a training step. The runner
(:mod:`taskbalance.compare.runner`) does the rest: every (method, seed) pair, caching,
tables and pictures.

Problems register themselves with :func:`register_problem` and are built by name with
:func:`make_problem`; ``size="small"`` is a configuration that runs in seconds (for tests
and CI), ``size="full"`` the documented one. For the baseline rows
(:mod:`~taskbalance.compare.baselines`) a problem may declare :attr:`~ComparisonProblem.
baselines`, report validation metrics (:attr:`~ComparisonProblem.has_validation`) and
override :meth:`~ComparisonProblem.combine_single_task`.
"""

from __future__ import annotations

import importlib
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses
from taskbalance.history import History

Size = Literal["small", "full"]
BalancerFactory = Callable[[], Balancer]


@dataclass(frozen=True)
class Metric:
    """One reported number of a run.

    Args:
        name: column name, unique within the problem (e.g. ``"left_acc"``).
        task: the task it measures.
        higher_is_better: direction, used by Δm% and ranks.
        in_delta_m: counted in Δm% (set ``False`` for diagnostics such as "front reached").
    """

    name: str
    task: str
    higher_is_better: bool
    in_delta_m: bool = True


@dataclass
class RunResult:
    """What one run of one method with one seed produced.

    Attributes:
        metrics: final metric values by :attr:`Metric.name` (all finite, or the run failed).
        epoch_losses: mean training loss per task, one value per epoch (loss curves).
        step_time: mean wall-clock seconds of one training step (forward, balancer,
            backward, optimizer step), measured by the problem around its loop body.
        steps: number of training steps taken.
        histories: the balancers' :class:`History` by label (``"main"`` for a single
            training run; one label per start point for the Pareto toy, ...).
        extras: anything JSON-serialisable the problem wants to plot (e.g. trajectories).
    """

    metrics: dict[str, float]
    epoch_losses: dict[str, list[float]]
    step_time: float
    steps: int
    histories: dict[str, History] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class ComparisonProblem(ABC):
    """A fixed piece of multi-task work on which balancers are compared."""

    #: registry name (``taskbalance compare --problem NAME``).
    name: ClassVar[str] = ""
    #: one line for ``taskbalance list``.
    description: ClassVar[str] = ""
    #: the baseline rows ``--methods all`` adds for this problem, from
    #: :data:`~taskbalance.compare.baselines.BASELINE_ROWS` (``"single_task"``,
    #: ``"tuned_static"``); a baseline named explicitly runs on any problem.
    baselines: ClassVar[tuple[str, ...]] = ()
    #: whether every run reports its metrics on a validation split as
    #: ``RunResult.extras["validation"]`` (metric name -> value); the ``tuned_static``
    #: baseline selects its weights on them and is refused where this is ``False``.
    #: A subclass may make it a property (e.g. when a constructor option removes the split).
    has_validation: bool = False

    def __init__(self, size: Size = "full") -> None:
        if size not in ("small", "full"):
            raise ValueError(f"size must be 'small' or 'full', got {size!r}")
        self.size: Size = size

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Task names, in the order the balancer sees them."""

    @property
    @abstractmethod
    def metrics(self) -> tuple[Metric, ...]:
        """The reported metrics, in table order."""

    @property
    @abstractmethod
    def default_epochs(self) -> int:
        """Epochs (or iterations, for problems without data) of a run at this size."""

    def method_options(self, method: str) -> dict[str, Any]:
        """Constructor keyword arguments for ``method`` on this problem (paper settings)."""
        return {}

    @abstractmethod
    def run(
        self, make_balancer: BalancerFactory, *, seed: int, epochs: int, progress: bool = False
    ) -> RunResult:
        """Train with balancers from ``make_balancer`` (one per independent training run)."""

    def plot_comparison(self, results: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
        """Problem-specific pictures over all methods (``results``: method -> runs by seed).

        Called by the runner after the generic plots; returns the files written. The Pareto
        toy draws every method's trajectories here. Default: none.
        """
        return []

    def prepare(self) -> None:
        """Load or build whatever every run shares (data), before any run is timed, so that
        the first run's wall time does not include it. Nothing by default."""
        return None

    def config(self) -> dict[str, Any]:
        """What identifies this problem's work (part of the cache key of a run)."""
        return {"problem": self.name, "size": self.size}

    def combine_single_task(self, results_by_task: Mapping[str, RunResult]) -> dict[str, float]:
        """The metrics of the ``single_task`` baseline from its K runs (task -> the run of
        the network trained on that task alone).

        Default: a metric of task ``k`` (:attr:`Metric.task`) is taken from run ``k``; any
        other metric (a summary such as a mean AUC over tasks, with ``task="all"``) is the
        mean of its values over the K runs. Override this where such a metric can be
        recomputed from the per-task ones (a mean AUC is the mean of each task's AUC, each
        from its own run), which the default cannot know.
        """
        combined: dict[str, float] = {}
        for metric in self.metrics:
            if metric.task in results_by_task:
                combined[metric.name] = float(results_by_task[metric.task].metrics[metric.name])
            else:
                values = [float(r.metrics[metric.name]) for r in results_by_task.values()]
                combined[metric.name] = statistics.fmean(values)
        return combined


def balanced_backward(
    balancer: Balancer,
    losses: Losses,
    shared: Iterable[Tensor],
    features: Tensor | None = None,
    kpi: Callable[[], dict[str, float]] | None = None,
) -> Tensor | None:
    """One ``balancer.backward`` call in the mode the method is defined in.

    Gradient methods defined in exact mode get ``shared=`` (the shared parameters); methods
    defined only on the shared representation (MGDA-UB) get ``features=`` (which must then
    be given); loss-weighting methods ignore both. ``kpi`` is called only for methods that
    use KPIs (DTP) and must return each task's KPI in (0, 1] on this batch.
    """
    context: dict[str, Any] = {}
    if balancer.uses_kpi:
        if kpi is None:
            raise ValueError(f"{balancer.method_name} needs per-task KPIs (kpi=)")
        context["kpi"] = kpi()
    modes = getattr(balancer, "modes", ("exact",))
    if "exact" not in modes:
        if features is None:
            raise ValueError(f"{balancer.method_name} needs the shared features")
        return balancer.backward(losses, shared=shared, features=features, **context)
    return balancer.backward(losses, shared=list(shared), **context)


def after_step(balancer: Balancer, recompute: Callable[[], Losses]) -> None:
    """Give methods that learn from the loss change of a step (FAMO) the losses after it.

    Call after ``optimizer.step()``; ``recompute()`` evaluates the same batch's losses at
    the new parameters (run under ``torch.no_grad()`` here). Other methods: a no-op.
    """
    update = getattr(balancer, "update", None)
    if callable(update) and not balancer.last_step_skipped:
        with torch.no_grad():
            update(recompute())


_PROBLEMS: dict[str, type[ComparisonProblem]] = {}


def register_problem(cls: type[ComparisonProblem]) -> type[ComparisonProblem]:
    """Class decorator: make ``cls`` available to :func:`make_problem` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _PROBLEMS[cls.name] = cls
    return cls


#: modules that register the built-in comparison problems (imported on first use, so that
#: ``import taskbalance`` loads no data package).
BUILTIN_PROBLEM_MODULES = (
    "taskbalance.problems.pareto_toy",
    "taskbalance.problems.multidigits",
    "taskbalance.problems.penguins",
    "taskbalance.problems.census_income",
    "taskbalance.problems.yeast",
    "taskbalance.problems.mmoe_pair",
)


def _load_builtin() -> None:
    for module in BUILTIN_PROBLEM_MODULES:
        importlib.import_module(module)


def problem_class(name: str) -> type[ComparisonProblem]:
    """The class registered as ``name``.

    Raises:
        KeyError: no problem of that name (the message lists the known ones).
    """
    _load_builtin()
    if name not in _PROBLEMS:
        raise KeyError(f"unknown problem {name!r}; known problems: {', '.join(sorted(_PROBLEMS))}")
    return _PROBLEMS[name]


def make_problem(name: str, size: Size = "full", **kwargs: Any) -> ComparisonProblem:
    """Build the comparison problem registered as ``name`` (``kwargs``: its constructor's
    options; a spec with options in brackets is read by
    :func:`~taskbalance.compare.options.build_problem`)."""
    return problem_class(name)(size=size, **kwargs)


def list_problems() -> dict[str, str]:
    """Registered comparison problems: name -> description."""
    _load_builtin()
    return {name: cls.description for name, cls in sorted(_PROBLEMS.items())}
