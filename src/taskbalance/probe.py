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

The verdict rule (:func:`decide`, ``rule="paired"`` by default). Per seed, Δm% of a
method against equal weighting's mean over the seeds (as in ``taskbalance compare``; lower
is better). Every method starts from the same model and sees the same batches for a seed,
so the runs pair up: per seed, the difference ``d_s`` between the method's Δm% and equal
weighting's. A method is **better** when the mean difference is below zero by more than
``t · sd(d) / √n`` (n seeds, ``t`` the one-sided 95% quantile of Student's t with n − 1
degrees of freedom: a one-sided paired t-test at 5%), **worse** when above by more than
that, and **indistinguishable** otherwise (also when the mean difference is below
:data:`MIN_DIFFERENCE`, 0.01 points). Pairing removes what every method shares for a
seed (the initialisation, the batch order), which is most of the spread at a short
budget. Each candidate is tested at 5%; with the 3 default candidates the chance that a
method is called better when none differs is at most 1 − 0.95³ ≈ 14%.
``rule="spread"`` is the conservative rule that ignores the pairing: better when the mean
Δm% is below equal weighting's by more than the larger of the two seed standard
deviations. The verdict names the better method with the lowest mean Δm% and its margin;
if no method is better and none is worse it is exactly :data:`NO_DIFFERENCE`; if none is
better and some are worse it says to keep equal weighting and names them.

Validated against the full comparisons of the eight reference problems
(``benchmarks/probe_validation.py``, docs/diagnostics.md): at the default budget and at one
epoch a run, the probe's pick matched the full training's among the same candidates in 2
and 3 of 8, no better than always keeping equal weighting (4 of 8): a short budget shows
who is ahead early, which on these problems was often not who is ahead at the end.

Cost (:attr:`ProbeResult.cost_epochs`): the training steps of every run together, divided
by the steps of one epoch of the training data. The default budget is
:data:`DEFAULT_EPOCHS` = 0.2 of an epoch per run, so equal weighting and the 3 default
candidates over 3 seeds cost 12 × 0.2 = 2.4 epochs, plus one evaluation pass per run; the
diagnostics add K backward passes on every ``every``-th step of a loss-weighting run
(equal weighting included), nothing to a gradient method's.
"""

from __future__ import annotations

import itertools
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
#: printed under every probe's verdict: what the validation found (docs/diagnostics.md).
CAVEAT = (
    "note: a short budget shows who is ahead early; on the 8 reference problems that "
    "matched the full training's pick in 2-3 of 8, no better than keeping equal weighting "
    "(docs/diagnostics.md, 'Validation')"
)
#: the default budget of every run, in epochs of the training data (12 runs: 2.4 epochs).
DEFAULT_EPOCHS = 0.2
#: the probe's budget on the toys, whose epochs are steps: this fraction of their steps.
TOY_FRACTION = 0.02
#: the verdict rules of :func:`decide`.
RULES = ("paired", "spread")
#: one-sided 95% quantiles of Student's t with 1..30 degrees of freedom.
_T95 = (
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
    1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
    1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
)  # fmt: skip

__all__ = [
    "CAVEAT",
    "DEFAULT_CANDIDATES",
    "DEFAULT_EPOCHS",
    "MIN_DIFFERENCE",
    "NO_DIFFERENCE",
    "Decision",
    "ProbeResult",
    "ProbeRow",
    "decide",
    "probe",
    "probe_problem",
    "t_quantile_95",
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


def t_quantile_95(df: int) -> float:
    """The one-sided 95% quantile of Student's t with ``df`` degrees of freedom: a table
    up to 30, then the Cornish–Fisher expansion around the normal quantile 1.6449 (within
    1e-3 of the exact value there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.6448536269514722
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_differences(
    delta_m: Mapping[str, Sequence[float]], method: str, reference: str = REFERENCE
) -> list[float]:
    """Per seed, ``method``'s Δm% minus the reference's (seeds paired by position)."""
    return [m - r for m, r in zip(delta_m[method], delta_m[reference], strict=True)]


def decide(
    delta_m: Mapping[str, Sequence[float]], reference: str = REFERENCE, rule: str = "paired"
) -> Decision:
    """The verdict rule on per-seed Δm% values (method -> one value per seed, ``reference``
    among them, seeds in the same order for every method; lower is better).

    ``rule="paired"``: with ``d`` the per-seed differences to the reference, better when
    ``mean(d) < -max(t · sd(d) / √n, MIN_DIFFERENCE)`` (``t`` = :func:`t_quantile_95` of
    n − 1), worse when ``mean(d)`` is above the same bound, a tie otherwise.
    ``rule="spread"``: better when ``mean_m - mean_ref < -max(std_m, std_ref,
    MIN_DIFFERENCE)`` (standard deviations over seeds), worse when above it. See the
    module docstring for both.

    Raises:
        BalancerUsageError: ``reference`` is missing, a method has fewer than 2 seeds (no
            spread to judge by), the paired rule gets unequal numbers of seeds, or an
            unknown rule.
    """
    if rule not in RULES:
        raise BalancerUsageError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
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
    n = len(delta_m[reference])
    unpaired = [m for m, values in delta_m.items() if len(values) != n]
    if rule == "paired" and unpaired:
        raise BalancerUsageError(
            f"{', '.join(unpaired)}: not {n} seeds as {reference!r}, so the runs do not pair "
            "up; give every method the same seeds, or rule='spread'"
        )
    ref_mean, ref_std = _mean_std(delta_m[reference])
    standing = {reference: "reference"}
    better: list[tuple[float, str, str]] = []
    worse: list[tuple[str, float]] = []
    for method, values in delta_m.items():
        if method == reference:
            continue
        mean, std = _mean_std(values)
        if rule == "paired":
            d_mean, d_std = _mean_std(paired_differences(delta_m, method, reference))
            bound = t_quantile_95(n - 1) * d_std / math.sqrt(n)
            diff, why = (
                d_mean,
                (
                    f"on the same starts {_num(-d_mean)} ± {_num(d_std)} points below it, beyond "
                    f"the one-sided 5% bound {_num(bound)} of a paired t-test"
                ),
            )
        else:
            bound, diff = max(std, ref_std), mean - ref_mean
            why = (
                f"equal weighting's spread ± {_num(ref_std)}, {_num(-diff - bound)} points "
                "beyond the larger seed spread"
            )
        if diff < -max(bound, MIN_DIFFERENCE):
            standing[method] = "better"
            better.append((mean, method, f"Δm% {_num(mean, '+')} ± {_num(std)} ({why})"))
        elif diff > max(bound, MIN_DIFFERENCE):
            standing[method] = "worse"
            worse.append((method, diff))
        else:
            standing[method] = "tie"
    if better:
        _, method, detail = min(better)
        return Decision(
            f"{method} is better than equal weighting at this budget: {detail}",
            method,
            standing,
        )
    if worse:
        named = ", ".join(f"{m} ({_num(d, '+')})" for m, d in sorted(worse, key=lambda x: x[1]))
        basis = "on the same starts" if rule == "paired" else "beyond the seed spread"
        return Decision(
            "keep equal weighting: no method beats it at this budget, and these are worse "
            f"{basis} (Δm% against it): {named}",
            None,
            standing,
        )
    return Decision(NO_DIFFERENCE, None, standing)


@dataclass(frozen=True)
class ProbeRow:
    """One method of a probe: Δm% against equal weighting (mean and standard deviation
    over seeds, lower is better), the paired difference to equal weighting (mean and
    standard deviation over seeds of its Δm% minus equal weighting's from the same start),
    its training time per step / equal weighting's, the mean conflict fraction and the
    median gradient-norm ratio over every diagnosed step of its runs (NaN when none was
    diagnosed), and its standing (see :class:`Decision`)."""

    method: str
    delta_m: float
    delta_m_std: float
    paired: float
    paired_std: float
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
        epochs: the budget of every run, in epochs (steps for the toys).
        steps: training steps of all runs together.
        epoch_steps: training steps of one epoch of the data.
        rule: the verdict rule (``"paired"`` or ``"spread"``).
        training_steps: the steps of one full training of a reference problem at its
            default length (:func:`probe_problem`), ``None`` for :func:`probe`.
        metrics: the per-seed metrics of every run (method -> one mapping per seed).
        delta_m: the per-seed Δm% of every method, as :func:`decide` judged them.
        toy: a problem without data, whose epochs are steps (the cost is not in epochs).
    """

    rows: list[ProbeRow]
    verdict: str
    best: str | None
    seeds: int
    epochs: float
    steps: int
    epoch_steps: int
    rule: str = "paired"
    training_steps: int | None = None
    metrics: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    delta_m: dict[str, list[float]] = field(default_factory=dict)
    toy: bool = False

    @property
    def cost_epochs(self) -> float:
        """The probe's training cost as a multiple of one training epoch."""
        return self.steps / self.epoch_steps

    def table(self) -> str:
        """The ranked table as GitHub Markdown."""
        lines = [
            "| method | Δm% ↓ | vs EW, same start | time ×EW | conflict fraction | "
            "norm ratio | standing |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.method} | {_num(row.delta_m, '+')} ± {_num(row.delta_m_std)} | "
                f"{_num(row.paired, '+')} ± {_num(row.paired_std)} | "
                f"{row.time_ratio:.2f} | {row.conflict_fraction:.2f} | "
                f"{row.norm_ratio:.2f} | {row.standing} |"
            )
        return "\n".join(lines) + "\n"

    def cost_line(self) -> str:
        """One line: the budget and the cost as a multiple of one epoch (and of one full
        training, for a reference problem; a toy, without data, counts steps only)."""
        runs = f"{len(self.rows)} methods × {self.seeds} seeds × {self.epochs:g}"
        if self.toy:
            line = f"cost: {self.steps} training steps from each start ({runs} steps)"
        else:
            line = (
                f"cost: {self.steps} training steps = {self.cost_epochs:.3g} epochs ({runs} "
                f"epoch{'s' if self.epochs != 1 else ''}; one epoch = {self.epoch_steps} step"
                f"{'s' if self.epoch_steps != 1 else ''})"
            )
        if self.training_steps:
            line += f" = {self.steps / self.training_steps:.3g} full trainings"
        return line

    def __str__(self) -> str:
        return f"{self.table()}\n{self.verdict}\n{self.cost_line()}\n{CAVEAT}"


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


@dataclass
class _Runs:
    """What the runs of a probe gave, by method label: metrics, training time per step and
    histories per seed, and the training steps of all runs together."""

    metrics: dict[str, list[dict[str, float]]]
    step_times: dict[str, list[float]]
    histories: dict[str, list[Any]]
    steps: int = 0

    @classmethod
    def of(cls, labels: Iterable[str]) -> _Runs:
        labels = list(labels)
        return cls({m: [] for m in labels}, {m: [] for m in labels}, {m: [] for m in labels})

    def add(
        self,
        label: str,
        metrics: Mapping[str, Any],
        steps: int,
        step_time: float,
        histories: Iterable[Any],
    ) -> None:
        self.metrics[label].append({k: float(v) for k, v in metrics.items()})
        self.steps += steps
        self.step_times[label].append(step_time)
        self.histories[label].extend(histories)


def _assemble(
    runs: _Runs,
    metric_defs: Sequence[Any],
    *,
    seeds: int,
    epochs: float,
    epoch_steps: int,
    rule: str,
    training_steps: int | None = None,
    toy: bool = False,
) -> ProbeResult:
    """Δm% per seed against equal weighting's mean, the verdict, and the ranked rows."""
    from taskbalance.compare.metrics import delta_m

    metrics, step_times, histories = runs.metrics, runs.step_times, runs.histories

    names = [m.name for m in metric_defs]
    base = {n: statistics.fmean(run[n] for run in metrics[REFERENCE]) for n in names}
    deltas = {
        method: [delta_m(run, base, metric_defs) for run in runs]
        for method, runs in metrics.items()
    }
    decision = decide(deltas, rule=rule)
    ref_time = statistics.fmean(step_times[REFERENCE])
    rows = []
    for method, values in deltas.items():
        mean, std = _mean_std(values)
        paired, paired_std = _mean_std(paired_differences(deltas, method))
        conflict, ratio = _diagnostic_numbers(histories[method])
        rows.append(
            ProbeRow(
                method,
                mean,
                std,
                paired,
                paired_std,
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
        runs.steps,
        epoch_steps,
        rule,
        training_steps,
        {m: list(runs) for m, runs in metrics.items()},
        deltas,
        toy,
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


def _check_budget(seeds: int, epochs: float, every: int, rule: str) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
        raise BalancerUsageError(
            f"the budget must be a positive number of epochs, got epochs={epochs!r}: pass "
            f"epochs={DEFAULT_EPOCHS} (the default) or more"
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
    if rule not in RULES:
        raise BalancerUsageError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")


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
    epochs: float = DEFAULT_EPOCHS,
    every: int = 5,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    holdout: float = 0.2,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
    rule: str = "paired",
) -> ProbeResult:
    """Should you balance, and with what? Train equal weighting and a few candidates
    briefly from the same initialisations over a few seeds, and compare them.

    Each run (method ``m``, seed ``s``): ``torch.manual_seed(s)`` (the caller's random
    state is left as it was), ``model = model_fn()``, the balancer (``diagnostics=every``,
    ``seed=s`` if it takes one), ``optimizer(model.parameters())``, then
    :func:`taskbalance.train_joint` for ``epochs`` epochs with
    ``shared_parameters=shared(model)`` (a fractional budget ends with the first batches
    of the next pass: ``round(epochs × B)`` steps in all, B the batches of one epoch), then
    the evaluation. Every method sees the same initial model for a seed, and the data in
    the same order.

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
        epochs: the budget of every run, in passes over the training batches (fractions
            allowed; default :data:`DEFAULT_EPOCHS`, 0.2: 2.4 epochs in all with the
            default candidates and seeds).
        every: diagnose every n-th step (1: every step).
        optimizer: ``optimizer(params)``; default ``torch.optim.Adam(params, lr=1e-3)``.
        holdout: the fraction of the batches held out by the default evaluation.
        split: ``batch -> (inputs, targets)`` (default
            :func:`taskbalance.training.joint.split_batch`).
        rule: the verdict rule, ``"paired"`` (default) or ``"spread"`` (:func:`decide`).

    Raises:
        BalancerUsageError: an unknown or unusable candidate, a budget that is not a
            positive number of epochs, fewer than 2 seeds, an unknown rule, one-shot data
            (a generator), too few batches to hold one out, or ``shared`` returning no
            parameters, before any training.
    """
    import taskbalance as tb
    from taskbalance.compare.problem import Metric
    from taskbalance.registry import constructor_parameters
    from taskbalance.training.joint import split_batch, step_budget

    _check_budget(seeds, epochs, every, rule)
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
    epoch_steps = _count_batches(train_data)
    if epoch_steps == 0:
        raise BalancerUsageError("the data gave no batch: nothing would be trained")
    budget = step_budget(epochs, epoch_steps)

    runs = _Runs.of(label for label, _, _ in specs)
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
                run_steps = 0
                # whole passes, then the first batches of the next one (a fractional budget)
                whole, rest = divmod(budget, epoch_steps)
                passes = [(train_data, whole), (_first(train_data, rest), 1 if rest else 0)]
                for part, count in passes:
                    if count:
                        run_steps += tb.train_joint(
                            model,
                            part,
                            loss_fn,
                            opt,
                            balancer,
                            epochs=count,
                            split=split,
                            shared_parameters=params,
                            progress=False,
                        ).steps
                wall = time.perf_counter() - start
            if evaluate is None:
                values = _mean_losses(model, held_out, loss_fn, tasks, split)
            else:
                values = evaluate(model)
            runs.add(label, values, run_steps, wall / run_steps, [balancer.history])
    names = list(runs.metrics[REFERENCE][0])
    unknown = sorted(set(higher_is_better) - set(names))
    if unknown:
        raise BalancerUsageError(
            f"higher_is_better names {unknown}, which the evaluation does not report "
            f"(it reports {names})"
        )
    defs = [Metric(n, n, n in higher_is_better) for n in names]
    return _assemble(runs, defs, seeds=seeds, epochs=epochs, epoch_steps=epoch_steps, rule=rule)


def _count_batches(data: Iterable[Any]) -> int:
    """The batches of one pass: ``len(data)`` where it has one, else counted by a pass."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


def _first(data: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches of a pass over ``data`` (nothing read for 0)."""
    return list(itertools.islice(iter(data), count)) if count else []


def probe_problem(
    problem: Any,
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    seeds: int = 3,
    epochs: float | None = None,
    every: int = 5,
    size: str = "full",
    rule: str = "paired",
) -> ProbeResult:
    """:func:`probe` on a reference problem of ``taskbalance compare`` (a name, optionally
    with options in brackets, or a :class:`~taskbalance.compare.problem.ComparisonProblem`).

    Each run is the problem's own ``run`` with a balancer from compare's factory
    (:func:`~taskbalance.compare.runner.make_factory`: the problem's method settings, the
    seed), ``diagnostics=every``; the metrics are the problem's (those of
    ``taskbalance compare``'s table, on its test split). ``epochs`` defaults to
    :data:`DEFAULT_EPOCHS` of an epoch; for the toys, which have no data and whose epochs
    are steps, to :data:`TOY_FRACTION` of the problem's steps (a whole number of steps).

    Raises:
        BalancerUsageError: an unknown problem or candidate, a budget that is not positive
            (or not a whole number of steps on a toy), fewer than 2 seeds or an unknown
            rule, before any training.
    """
    from taskbalance.compare.options import MethodSpec, build_problem
    from taskbalance.compare.runner import make_factory
    from taskbalance.problems._supervised import SupervisedProblem

    if isinstance(problem, str):
        try:
            problem = build_problem(problem, size=size)  # type: ignore[arg-type]
        except KeyError as err:
            raise BalancerUsageError(str(err.args[0])) from None
    supervised = isinstance(problem, SupervisedProblem)
    if epochs is None:
        epochs = (
            DEFAULT_EPOCHS if supervised else max(1, round(TOY_FRACTION * problem.default_epochs))
        )
    _check_budget(seeds, epochs, every, rule)
    if not supervised and not float(epochs).is_integer():
        raise BalancerUsageError(
            f"{problem.name} has no data: its epochs are steps, so the budget must be a whole "
            f"number of steps, got epochs={epochs!r}"
        )
    specs = _candidate_specs(candidates)
    if hasattr(problem, "lean"):
        problem.lean = False  # the toys' fast path skips the engine, hence the diagnostics
    problem.prepare()
    # one epoch in steps: the batches of the training data; a step on a toy
    epoch_steps = problem.epoch_steps() if supervised else 1
    runs = _Runs.of(label for label, _, _ in specs)
    for seed in range(seeds):
        for label, cls, options in specs:
            spec = MethodSpec(cls.method_name, {**options, "diagnostics": every}, label)
            factory, _ = make_factory(problem, spec, seed)
            result = problem.run(factory, seed=seed, epochs=epochs, progress=False)
            runs.add(
                label, result.metrics, result.steps, result.step_time, result.histories.values()
            )
    return _assemble(
        runs,
        problem.metrics,
        seeds=seeds,
        epochs=epochs,
        epoch_steps=epoch_steps,
        rule=rule,
        training_steps=problem.default_epochs * epoch_steps,
        toy=not supervised,
    )
