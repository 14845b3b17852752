"""The probe: "should I balance, and with what?", answered by a short, fixed budget.

:func:`probe` trains the user's model a few times for a short budget: equal weighting and a
small set of candidate methods, from the same initialisations (seed ``s`` builds the same
model for every method), over a few seeds, with the gradient diagnostics on
(:mod:`taskbalance.diagnostics`, every ``every``-th step). It returns a
:class:`ProbeResult`: a table ranked by Δm% against equal weighting (with the seed spread),
the training time relative to equal weighting's, the mean conflict fraction and the median
gradient-norm ratio, and a plain verdict. :func:`probe_problem` does the same on a
reference problem of ``taskbalance compare`` (its problem and balancer factory, not a loop
of its own): ``taskbalance probe --problem NAME``.

Default candidates (:data:`DEFAULT_CANDIDATES`): ``uncertainty`` (uncertainty weighting, a
loss-weighting method: no extra backward pass, the cheapest kind of balancing, and it acts
from the first step; DWA, the other usual pick, keeps equal weights for its first two
epochs, so at a budget of one or two epochs it *is* equal weighting), ``pcgrad`` (a cheap
gradient method: pairwise projections of the K task gradients, the most used one) and
``upgrad`` (a strong gradient method: the update never conflicts with any task, and it
has no hyper-parameter to tune). Nash-MTL is left out of the default: it solves an
optimisation problem every step and is the slowest of the well-known ones.

The verdict rule (:func:`decide`). Per seed, Δm% of a method against equal weighting's
mean over the seeds (as in ``taskbalance compare``; lower is better). A method is
**better** when its mean Δm% is below equal weighting's by more than the larger of the two
seed spreads (the standard deviations over seeds of the method's and of equal weighting's
Δm%), **worse** when it is above by more than that, and **indistinguishable** otherwise
(also when the difference is below :data:`MIN_DIFFERENCE`, 0.01 points).
With 3 seeds a paired t-test has 2 degrees of freedom and a sign test cannot go below
p = 0.125, so neither could separate anything at the default budget; the spread rule is
what the table shows, and it is conservative. The verdict names the better method with the
lowest mean Δm% and its margin (how far beyond the spread it is); if no method is better
and none is worse it is exactly :data:`NO_DIFFERENCE`; if none is better and some are
worse it says to keep equal weighting and names them.

Cost (:attr:`ProbeResult.cost_epochs`): the training steps of every run together, divided
by the steps of one epoch of the training data. With the defaults (equal weighting and 3
candidates, 3 seeds, 1 epoch) that is 12 epochs, plus one evaluation pass per run; the
diagnostics add K backward passes on every ``every``-th step of a loss-weighting run
(equal weighting included), nothing to a gradient method's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.errors import BalancerUsageError

#: the reference every Δm% is measured against.
REFERENCE = "equal"
#: the default candidates: one loss-weighting, one cheap and one strong gradient method.
DEFAULT_CANDIDATES: tuple[str, ...] = ("uncertainty", "pcgrad", "upgrad")
#: the smallest difference in Δm% points the verdict counts (a relative change of 1e-4 in
#: the metrics): on a problem whose seeds do not vary (a deterministic toy), a difference
#: in the last digits is no difference.
MIN_DIFFERENCE = 0.01
#: the verdict when no candidate is told apart from equal weighting.
NO_DIFFERENCE = "no method is distinguishable from equal weighting at this budget"

__all__ = [
    "DEFAULT_CANDIDATES",
    "MIN_DIFFERENCE",
    "NO_DIFFERENCE",
    "Decision",
    "ProbeResult",
    "ProbeRow",
    "decide",
    "probe",
    "probe_problem",
]


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concludes: the verdict, the chosen method (``None``: keep equal
    weighting), and each method's standing: ``"reference"``, ``"better"``, ``"worse"`` or
    ``"tie"`` (within the spread)."""

    verdict: str
    best: str | None
    standing: dict[str, str]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def decide(delta_m: Mapping[str, Sequence[float]], reference: str = REFERENCE) -> Decision:
    """The verdict rule on per-seed Δm% values (method -> one value per seed, ``reference``
    among them; lower is better).

    A method is better when ``mean_m - mean_ref < -max(std_m, std_ref)``, worse when
    ``mean_m - mean_ref > max(std_m, std_ref)`` (standard deviations over seeds), a tie
    otherwise; a difference below :data:`MIN_DIFFERENCE` is always a tie. See the module
    docstring for why this rule.

    Raises:
        BalancerUsageError: ``reference`` is missing, or a method has fewer than 2 seeds
            (no spread to judge by).
    """
    if reference not in delta_m:
        raise BalancerUsageError(
            f"the Δm% of the reference {reference!r} is missing: give its per-seed values too"
        )
    short = [m for m, values in delta_m.items() if len(values) < 2]
    if short:
        raise BalancerUsageError(
            f"{', '.join(short)}: fewer than 2 seeds, so no seed spread to judge by; run at "
            "least 2 seeds (3 by default)"
        )
    ref_mean, ref_std = _mean_std(delta_m[reference])
    standing = {reference: "reference"}
    better: list[tuple[float, str, float, float]] = []
    worse: list[tuple[str, float]] = []
    for method, values in delta_m.items():
        if method == reference:
            continue
        mean, std = _mean_std(values)
        spread = max(std, ref_std)
        diff = mean - ref_mean
        if diff < -max(spread, MIN_DIFFERENCE):
            standing[method] = "better"
            better.append((mean, method, std, -diff - spread))
        elif diff > max(spread, MIN_DIFFERENCE):
            standing[method] = "worse"
            worse.append((method, diff))
        else:
            standing[method] = "tie"
    if better:
        mean, method, std, margin = min(better)
        return Decision(
            f"{method} is better than equal weighting at this budget: Δm% {_num(mean, '+')} ± "
            f"{_num(std)} (equal weighting's spread ± {_num(ref_std)}), {_num(margin)} points "
            "beyond the larger seed spread",
            method,
            standing,
        )
    if worse:
        named = ", ".join(f"{m} ({_num(d, '+')})" for m, d in sorted(worse, key=lambda x: x[1]))
        return Decision(
            "keep equal weighting: no method beats it at this budget, and these are worse "
            f"beyond the seed spread (Δm% against it): {named}",
            None,
            standing,
        )
    return Decision(NO_DIFFERENCE, None, standing)


@dataclass(frozen=True)
class ProbeRow:
    """One method of a probe: Δm% against equal weighting (mean and standard deviation
    over seeds, lower is better), its training time per step / equal weighting's, the mean
    conflict fraction and the median gradient-norm ratio over every diagnosed step of its
    runs (NaN when none was diagnosed), and its standing (see :class:`Decision`)."""

    method: str
    delta_m: float
    delta_m_std: float
    time_ratio: float
    conflict_fraction: float
    norm_ratio: float
    standing: str


@dataclass
class ProbeResult:
    """What :func:`probe` returns.

    Attributes:
        rows: every method, equal weighting included, ranked by mean Δm% (best first).
        verdict: one plain sentence (see :func:`decide`).
        best: the method the verdict picks, or ``None`` (keep equal weighting).
        seeds: seeds per method.
        epochs: epochs per run.
        steps: training steps of all runs together.
        epoch_steps: training steps of one epoch of the data.
        metrics: the per-seed metrics of every run (method -> one mapping per seed).
    """

    rows: list[ProbeRow]
    verdict: str
    best: str | None
    seeds: int
    epochs: int
    steps: int
    epoch_steps: int
    metrics: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def cost_epochs(self) -> float:
        """The probe's training cost as a multiple of one training epoch."""
        return self.steps / self.epoch_steps

    def table(self) -> str:
        """The ranked table as GitHub Markdown."""
        lines = [
            "| method | Δm% ↓ | time ×EW | conflict fraction | norm ratio | standing |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.method} | {_num(row.delta_m, '+')} ± {_num(row.delta_m_std)} | "
                f"{row.time_ratio:.2f} | {row.conflict_fraction:.2f} | "
                f"{row.norm_ratio:.2f} | {row.standing} |"
            )
        return "\n".join(lines) + "\n"

    def cost_line(self) -> str:
        """One line: the budget and the cost as a multiple of one epoch."""
        return (
            f"cost: {self.steps} training steps = {self.cost_epochs:.3g} epochs "
            f"({len(self.rows)} methods × {self.seeds} seeds × {self.epochs} epoch"
            f"{'s' if self.epochs != 1 else ''}; one epoch = {self.epoch_steps} step"
            f"{'s' if self.epoch_steps != 1 else ''})"
        )

    def __str__(self) -> str:
        return f"{self.table()}\n{self.verdict}\n{self.cost_line()}"


def _num(value: float, sign: str = "") -> str:
    """Two decimals; two significant digits below 0.1 (Δm% on AUCs is often that small);
    ``0.00`` below 1e-9 (no ``-0.00`` for equal weighting's own mean)."""
    if abs(value) < 1e-9:
        return f"{0.0:{sign}.2f}"
    return f"{value:{sign}.2f}" if abs(value) >= 0.1 else f"{value:{sign}.2g}"


def _diagnostic_numbers(histories: Iterable[Any]) -> tuple[float, float]:
    """Mean conflict fraction and median norm ratio over every diagnosed row."""
    conflict: list[Tensor] = []
    ratio: list[Tensor] = []
    for history in histories:
        if "diag/norm_ratio" not in history.extra_names:
            continue
        r = history.extra("diag/norm_ratio")[:, 0]
        keep = ~torch.isnan(r)
        ratio.append(r[keep])
        conflict.append(history.extra("diag/conflict_fraction")[keep, 0])
    if not ratio or sum(t.numel() for t in ratio) == 0:
        return math.nan, math.nan
    return float(torch.cat(conflict).mean()), float(torch.cat(ratio).median())


def _assemble(
    metrics: Mapping[str, list[dict[str, float]]],
    metric_defs: Sequence[Any],
    step_times: Mapping[str, list[float]],
    histories: Mapping[str, list[Any]],
    *,
    seeds: int,
    epochs: int,
    steps: int,
    epoch_steps: int,
) -> ProbeResult:
    """Δm% per seed against equal weighting's mean, the verdict, and the ranked rows."""
    from taskbalance.compare.metrics import delta_m

    names = [m.name for m in metric_defs]
    base = {n: statistics.fmean(run[n] for run in metrics[REFERENCE]) for n in names}
    deltas = {
        method: [delta_m(run, base, metric_defs) for run in runs]
        for method, runs in metrics.items()
    }
    decision = decide(deltas)
    ref_time = statistics.fmean(step_times[REFERENCE])
    rows = []
    for method, values in deltas.items():
        mean, std = _mean_std(values)
        conflict, ratio = _diagnostic_numbers(histories[method])
        rows.append(
            ProbeRow(
                method,
                mean,
                std,
                statistics.fmean(step_times[method]) / ref_time,
                conflict,
                ratio,
                decision.standing[method],
            )
        )
    rows.sort(key=lambda row: row.delta_m)
    return ProbeResult(
        rows,
        decision.verdict,
        decision.best,
        seeds,
        epochs,
        steps,
        epoch_steps,
        {m: list(runs) for m, runs in metrics.items()},
    )


def _candidate_specs(candidates: Sequence[str]) -> list[tuple[str, type, dict[str, Any]]]:
    """``(label, class, bracketed options)`` per candidate spec, equal weighting first;
    every misuse refused before anything trains."""
    from taskbalance.compare.options import _parse_spec, required_arguments

    if isinstance(candidates, str):
        candidates = [c for c in candidates.split(",") if c.strip()]
    if not candidates:
        raise BalancerUsageError(
            f"no candidate method: give at least one, e.g. candidates={list(DEFAULT_CANDIDATES)}"
        )
    specs = [(REFERENCE, *_parse_spec(REFERENCE))]
    for text in candidates:
        cls, options = _parse_spec(text.strip())
        if cls.method_name == REFERENCE and not options:
            raise BalancerUsageError(
                "equal weighting is always run as the reference: leave 'equal' out of the "
                "candidates"
            )
        if not cls.supports_diagnostics():
            raise BalancerUsageError(
                f"{cls.method_name} has a gradient step of its own and records no "
                "diagnostics, so it cannot be probed; pick another method (tb.list_methods())"
            )
        if "exact" not in getattr(cls, "modes", ("exact",)):
            raise BalancerUsageError(
                f"{cls.method_name} works on the shared representation only (features=), "
                "which the probe does not pass; pick a method defined on the shared "
                "parameters"
            )
        missing = [a for a in required_arguments(cls) if a not in options]
        if missing:
            given = ",".join(f"{m}=..." for m in missing)
            raise BalancerUsageError(
                f"{cls.method_name} needs {', '.join(missing)} (no default): give it in "
                f"brackets, '{cls.method_name}[{given}]'"
            )
        label = text.strip()
        if any(label == s[0] for s in specs):
            raise BalancerUsageError(f"candidate {label!r} is given twice: name it once")
        specs.append((label, cls, options))
    return specs


def _check_budget(seeds: int, epochs: int, every: int) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise BalancerUsageError(
            f"the budget must be at least one epoch, got epochs={epochs!r}: pass epochs=1 "
            "(the default) or more"
        )
    if not isinstance(seeds, int) or seeds < 2:
        raise BalancerUsageError(
            f"the verdict needs a seed spread, so at least 2 seeds, got seeds={seeds!r}: pass "
            "seeds=3 (the default)"
        )
    if not isinstance(every, int) or every < 1:
        raise BalancerUsageError(
            f"every must be a positive number of steps, got every={every!r}: 1 diagnoses every step"
        )


class _Fresh:
    """A re-iterable over ``make()``'s batches: one call per pass."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return iter(self.make())


def _shared_parameters(model: nn.Module, shared: Callable[[nn.Module], Any]) -> list[Tensor]:
    try:
        found = shared(model)
        params = list(found.parameters() if isinstance(found, nn.Module) else found)
    except (AttributeError, TypeError) as err:
        raise BalancerUsageError(
            f"shared(model) failed ({type(err).__name__}: {err}): give shared= a function "
            "that returns the model's shared parameters, e.g. "
            "shared=lambda m: m.body.parameters()"
        ) from None
    if not params:
        raise BalancerUsageError(
            "shared(model) returned no parameters: the model factory must build a model with "
            "a shared part, and shared= must return its parameters (e.g. "
            "shared=lambda m: m.body.parameters())"
        )
    if not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise BalancerUsageError(
            "shared(model) must return tensors that require grad (the shared parameters)"
        )
    return params


def _mean_losses(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Any,
    tasks: Sequence[str],
    split: Callable[[Any], tuple[Any, Any]],
) -> dict[str, float]:
    """The mean per-task training loss on ``batches`` (no gradients, ``model.eval()``)."""
    from taskbalance.training.joint import criteria_losses, stack_detached

    was_training = model.training
    model.eval()
    total = torch.zeros(len(tasks), dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            inputs, targets = split(batch)
            outputs = model(inputs)
            if isinstance(loss_fn, Mapping):
                losses = criteria_losses(loss_fn, tasks, outputs, targets)
            else:
                losses = loss_fn(outputs, batch)
            total += stack_detached(losses, tasks).cpu()
    model.train(was_training)
    return {t: float(v) / len(batches) for t, v in zip(tasks, total)}


def probe(
    model_fn: Callable[[], nn.Module],
    data: Iterable[Any] | Callable[[], Iterable[Any]],
    loss_fn: Any,
    shared: Callable[[nn.Module], Iterable[Tensor]],
    *,
    tasks: Sequence[str],
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    higher_is_better: Collection[str] = (),
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    seeds: int = 3,
    epochs: int = 1,
    every: int = 5,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    holdout: float = 0.2,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
) -> ProbeResult:
    """Should you balance, and with what? Train equal weighting and a few candidates
    briefly from the same initialisations over a few seeds, and compare them.

    Each run (method ``m``, seed ``s``): ``torch.manual_seed(s)`` (the caller's random
    state is left as it was), ``model = model_fn()``, the balancer (``diagnostics=every``,
    ``seed=s`` if it takes one), ``optimizer(model.parameters())``, then
    :func:`taskbalance.train_joint` for ``epochs`` epochs with
    ``shared_parameters=shared(model)``, then the evaluation. Every method sees the same
    initial model for a seed, and the data in the same order.

    Args:
        model_fn: builds a fresh model; called once per run.
        data: the training batches: a re-iterable (a list, a DataLoader) or a callable that
            returns one epoch's batches. Batches are cut into ``(inputs, targets)`` as
            :func:`taskbalance.train_joint` does (``split``).
        loss_fn: the per-task losses, as for :func:`taskbalance.train_joint`: criteria
            ``{task: criterion(output, target)}`` or ``loss_fn(outputs, batch)``.
        shared: returns the model's shared parameters, e.g.
            ``lambda m: m.body.parameters()`` (or the shared module, ``lambda m: m.body``).
        tasks: the task names, in the order of the losses.
        evaluate: ``evaluate(model) -> {metric: value}`` after each run (lower is better
            unless named in ``higher_is_better``). Default: the mean training loss of each
            task on a held-out part of the batches (the last ``holdout`` fraction, at least
            one batch), which are then not trained on; the batches are read once and kept
            in memory (pass ``evaluate`` for data that does not fit).
        higher_is_better: the metrics of ``evaluate`` for which higher is better.
        candidates: method specs (``"dwa"``, ``"cagrad[c=0.2]"``); default
            :data:`DEFAULT_CANDIDATES`. Equal weighting is always run as the reference.
        seeds: seeds ``0..seeds-1`` per method (at least 2: the verdict needs a spread).
        epochs: the budget of every run, in passes over the training batches.
        every: diagnose every n-th step (1: every step).
        optimizer: ``optimizer(params)``; default ``torch.optim.Adam(params, lr=1e-3)``.
        holdout: the fraction of the batches held out by the default evaluation.
        split: ``batch -> (inputs, targets)`` (default
            :func:`taskbalance.training.joint.split_batch`).

    Raises:
        BalancerUsageError: an unknown or unusable candidate, a budget below one epoch,
            fewer than 2 seeds, one-shot data (a generator), too few batches to hold one
            out, or ``shared`` returning no parameters, before any training.
    """
    import taskbalance as tb
    from taskbalance.compare.problem import Metric
    from taskbalance.registry import constructor_parameters
    from taskbalance.training.joint import split_batch

    _check_budget(seeds, epochs, every)
    specs = _candidate_specs(candidates)
    tasks = list(tasks)
    split = split or split_batch
    make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
    if not callable(data) and iter(data) is data:  # type: ignore[arg-type]
        raise BalancerUsageError(
            "data is a one-shot iterator (a generator?): the probe needs a pass per epoch "
            "and run; give a list of batches, a DataLoader, or a function returning the "
            "batches"
        )
    held_out: list[Any] = []
    if evaluate is None:
        if not 0.0 < holdout < 1.0:
            raise BalancerUsageError(f"holdout must be between 0 and 1, got {holdout!r}")
        batches = list(data() if callable(data) else data)  # type: ignore[operator]
        if len(batches) < 2:
            raise BalancerUsageError(
                f"the default evaluation holds out part of the batches, but there are "
                f"{len(batches)}: give at least 2 batches, or evaluate="
            )
        cut = len(batches) - max(1, round(holdout * len(batches)))
        train_data: Iterable[Any] = batches[:cut]
        held_out = batches[cut:]
    else:
        train_data = _Fresh(data) if callable(data) else data  # type: ignore[arg-type]

    metrics: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in specs}
    step_times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    histories: dict[str, list[Any]] = {label: [] for label, _, _ in specs}
    steps = 0
    epoch_steps = 0
    for seed in range(seeds):
        for label, cls, options in specs:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = model_fn()
                params = _shared_parameters(model, shared)
                kwargs = {**options, "diagnostics": every}
                if "seed" in constructor_parameters(cls) and "seed" not in kwargs:
                    kwargs["seed"] = seed
                balancer = cls(tasks, **kwargs)
                opt = make_optimizer(model.parameters())
                start = time.perf_counter()
                run = tb.train_joint(
                    model,
                    train_data,
                    loss_fn,
                    opt,
                    balancer,
                    epochs=epochs,
                    split=split,
                    shared_parameters=params,
                    progress=False,
                )
                wall = time.perf_counter() - start
            if run.steps == 0:
                raise BalancerUsageError("the data gave no batch: nothing was trained")
            steps += run.steps
            epoch_steps = epoch_steps or run.steps // epochs
            step_times[label].append(wall / run.steps)
            histories[label].append(balancer.history)
            if evaluate is None:
                values = _mean_losses(model, held_out, loss_fn, tasks, split)
            else:
                values = {k: float(v) for k, v in evaluate(model).items()}
            metrics[label].append(values)
    names = list(metrics[REFERENCE][0])
    unknown = sorted(set(higher_is_better) - set(names))
    if unknown:
        raise BalancerUsageError(
            f"higher_is_better names {unknown}, which the evaluation does not report "
            f"(it reports {names})"
        )
    defs = [Metric(n, n, n in higher_is_better) for n in names]
    return _assemble(
        metrics,
        defs,
        step_times,
        histories,
        seeds=seeds,
        epochs=epochs,
        steps=steps,
        epoch_steps=max(epoch_steps, 1),
    )


def probe_problem(
    problem: Any,
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    seeds: int = 3,
    epochs: int = 1,
    every: int = 5,
    size: str = "full",
) -> ProbeResult:
    """:func:`probe` on a reference problem of ``taskbalance compare`` (a name, optionally
    with options in brackets, or a :class:`~taskbalance.compare.problem.ComparisonProblem`).

    Each run is the problem's own ``run`` with a balancer from compare's factory
    (:func:`~taskbalance.compare.runner.make_factory`: the problem's method settings, the
    seed), ``diagnostics=every``; the metrics are the problem's (those of
    ``taskbalance compare``'s table, on its test split). For the toys an epoch is a step.

    Raises:
        BalancerUsageError: an unknown problem or candidate, a budget below one epoch or
            fewer than 2 seeds, before any training.
    """
    from taskbalance.compare.options import MethodSpec, build_problem
    from taskbalance.compare.runner import make_factory

    _check_budget(seeds, epochs, every)
    specs = _candidate_specs(candidates)
    if isinstance(problem, str):
        try:
            problem = build_problem(problem, size=size)  # type: ignore[arg-type]
        except KeyError as err:
            raise BalancerUsageError(str(err.args[0])) from None
    if hasattr(problem, "lean"):
        problem.lean = False  # the toys' fast path skips the engine, hence the diagnostics
    problem.prepare()
    metrics: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in specs}
    step_times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    histories: dict[str, list[Any]] = {label: [] for label, _, _ in specs}
    steps = 0
    epoch_steps = 0
    for seed in range(seeds):
        for label, cls, options in specs:
            spec = MethodSpec(cls.method_name, {**options, "diagnostics": every}, label)
            factory, _ = make_factory(problem, spec, seed)
            result = problem.run(factory, seed=seed, epochs=epochs, progress=False)
            steps += result.steps
            epoch_steps = epoch_steps or result.steps // epochs
            step_times[label].append(result.step_time)
            histories[label].extend(result.histories.values())
            metrics[label].append({k: float(v) for k, v in result.metrics.items()})
    return _assemble(
        metrics,
        problem.metrics,
        step_times,
        histories,
        seeds=seeds,
        epochs=epochs,
        steps=steps,
        epoch_steps=max(epoch_steps, 1),
    )
