"""Run every (row, seed) pair of a comparison, caching each finished run on disk.

Layout of ``out``::

    out/runs/<row>/seed<k>/result.json        metrics, loss curves, step time, extras
    out/runs/<row>/seed<k>/history_<label>.csv  the balancer's per-step losses and weights
    out/runs/single_task/<task>/seed<k>/      the single-task network of <task>
    out/runs/tuned_static/tuning/cand<i>/     tuned_static's tuning run of candidate i

A row is a method (``<row>`` is its name) or a variant such as ``cagrad[c=0.2]`` (a safe
directory name of its own, :func:`~taskbalance.compare.options.spec_directory`); the rows
and their options are chosen and checked by
:func:`~taskbalance.compare.options.select_methods` before anything trains. The baseline
rows (:mod:`~taskbalance.compare.baselines`) are static weighting trained several times:
``single_task`` once per task and seed (its record of a seed combines the K runs; it fails
when one of them fails), ``tuned_static`` once per candidate with the tuning seed, then
with the chosen weights once per seed (every seed fails, naming why, when tuning fails).

A run is finished when its ``result.json`` exists (it is written last, atomically) and its
``config`` matches the requested one (the problem's settings, method, seed, epochs, options
and a fingerprint of the code the run depends on, see :mod:`.fingerprint`: an edited method
or engine reruns its runs); rerunning the same command skips finished runs, so an
interrupted comparison resumes where it stopped. A run that raises is recorded as failed
(with the error) and the comparison goes on; it is retried on the next invocation.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

import taskbalance as tb
from taskbalance.compare.baselines import (
    SINGLE_TASK,
    TUNED_STATIC,
    TUNING_SEED,
    Tuning,
    choose_candidate,
    combine_single_task_runs,
    tuning_candidates,
)
from taskbalance.compare.fingerprint import code_fingerprint
from taskbalance.compare.options import (
    BASELINE,
    MethodSpec,
    baseline_runs,
    build_balancer,
    required_arguments,
    select_methods,
    spec_directory,
    static_spec,
)
from taskbalance.compare.problem import BalancerFactory, ComparisonProblem, RunResult
from taskbalance.history import History
from taskbalance.training.joint import make_progress

logger = logging.getLogger("taskbalance")

__all__ = [
    "BASELINE",
    "Comparison",
    "RunRecord",
    "load_run",
    "make_factory",
    "read_history",
    "required_options",
    "resolve_methods",
    "run_comparison",
    "run_dir",
    "save_run",
]


@dataclass
class RunRecord:
    """One (row, seed) run as stored on disk; ``method`` is the row label (``cagrad`` or
    ``cagrad[c=0.2]``)."""

    method: str
    seed: int
    status: str  # "ok" or "failed"
    result: RunResult | None
    error: str = ""
    cached: bool = False
    #: wall-clock seconds of the whole run as stored (a ``single_task`` record: the sum
    #: over its K runs); ``None`` where unknown
    wall_time: float | None = None


@dataclass
class Comparison:
    """Every run of a comparison, by row label then seed (rows in the requested order).

    ``specs`` holds each row's method and options, ``left_out`` the methods ``"all"`` left
    out (-> the arguments they need), ``options`` the options given for every row of a
    method (``{method: {key: value}}``), ``unavailable`` the baseline rows ``"all"`` left
    out (-> why), ``tuning`` how ``tuned_static`` chose its weights (when it is a row).
    """

    problem: ComparisonProblem
    out: Path
    epochs: int
    runs: dict[str, list[RunRecord]] = field(default_factory=dict)
    specs: dict[str, MethodSpec] = field(default_factory=dict)
    left_out: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    tuning: Tuning | None = None
    #: how tables and pictures name the problem (its spec, ``census_income[group=2]``;
    #: empty: the problem's name).
    label: str = ""

    @property
    def title_name(self) -> str:
        """The problem as tables and pictures name it."""
        return self.label or self.problem.name

    def ok(self, method: str) -> list[RunResult]:
        return [r.result for r in self.runs[method] if r.status == "ok" and r.result is not None]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for records in self.runs.values() for r in records if r.status != "ok"]


def required_options(method: str) -> list[str]:
    """Constructor arguments of ``method`` that have no default (besides ``tasks``)."""
    return required_arguments(tb.get(method))


def resolve_methods(
    methods: Sequence[str] | str,
    problem: ComparisonProblem | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """The row labels of a comparison, baseline first, no repeats (see
    :func:`~taskbalance.compare.options.select_methods`, which also checks them).

    ``"all"`` leaves out methods that need an argument that neither the problem
    (:meth:`~taskbalance.compare.problem.ComparisonProblem.method_options`) nor ``options``
    gives (static weighting needs its weights); a method named explicitly without such an
    argument is refused.
    """
    return [spec.label for spec in select_methods(methods, problem, options).specs]


def run_dir(out: Path, label: str, seed: int) -> Path:
    """Where the run of row ``label`` (a method name or a spec) with ``seed`` is stored."""
    return Path(out) / "runs" / spec_directory(label) / f"seed{seed}"


def single_task_dir(out: Path, task: str, seed: int) -> Path:
    """Where the ``single_task`` run of ``task`` with ``seed`` is stored."""
    return Path(out) / "runs" / SINGLE_TASK / spec_directory(task) / f"seed{seed}"


def tuning_dir(out: Path, candidate: int) -> Path:
    """Where the tuning run of ``tuned_static``'s candidate ``candidate`` is stored."""
    return Path(out) / "runs" / TUNED_STATIC / "tuning" / f"cand{candidate}"


def make_factory(
    problem: ComparisonProblem, spec: MethodSpec | str, seed: int
) -> tuple[BalancerFactory, dict[str, Any]]:
    """A factory of fresh balancers of a row (problem settings, then the row's options, and
    ``seed`` if the method takes one), and the arguments it passes."""
    if isinstance(spec, str):
        name = tb.get(spec).method_name
        spec = MethodSpec(name, {}, name)
    _, options = build_balancer(spec, problem, seed)
    cls = tb.get(spec.method)
    return lambda: cls(problem.tasks, **options), options


def _run_config(
    problem: ComparisonProblem, spec: MethodSpec, seed: int, epochs: int, options: dict
) -> dict[str, Any]:
    config = {
        **problem.config(),
        "method": spec.method,
        "seed": seed,
        "epochs": epochs,
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "code": code_fingerprint(tb.get(spec.method), type(problem)),
    }
    if spec.label != spec.method:
        config["label"] = spec.label
    return config


def save_run(directory: Path, config: dict[str, Any], result: RunResult, wall: float) -> None:
    """Write the histories, then ``result.json`` (atomically, last)."""
    directory.mkdir(parents=True, exist_ok=True)
    for label, history in result.histories.items():
        history.to_csv(directory / f"history_{label}.csv")
    payload = {
        "config": config,
        "status": "ok",
        "metrics": result.metrics,
        "epoch_losses": result.epoch_losses,
        "step_time": result.step_time,
        "steps": result.steps,
        "histories": list(result.histories),
        "extras": result.extras,
        "wall_time": wall,
    }
    _write_json(directory / "result.json", payload)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def read_history(path: Path, tasks: Sequence[str]) -> History:
    """A :class:`History` read back from the CSV written by :meth:`History.to_csv`."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    prefixes = dict.fromkeys(k.split("/", 1)[0] for k in (rows[0] if rows else {}) if "/" in k)

    def column(prefix: str) -> torch.Tensor:
        values = [[float(r[f"{prefix}/{t}"]) for t in tasks] for r in rows]
        return torch.tensor(values, dtype=torch.float64).reshape(len(rows), len(tasks))

    history = History(tasks)
    history.load_state_dict(
        {
            "steps": [int(r["step"]) for r in rows],
            "losses": column("loss"),
            "weights": column("weight"),
            "extras": {p: column(p) for p in prefixes if p not in ("loss", "weight")},
        }
    )
    return history


def load_run(directory: Path, tasks: Sequence[str]) -> tuple[dict[str, Any], RunResult] | None:
    """The stored config and result of a finished run, or ``None``."""
    path = directory / "result.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("status") != "ok":
        return None
    histories = {
        label: read_history(directory / f"history_{label}.csv", tasks)
        for label in data["histories"]
    }
    result = RunResult(
        metrics=data["metrics"],
        epoch_losses=data["epoch_losses"],
        step_time=data["step_time"],
        steps=data["steps"],
        histories=histories,
        extras=data["extras"],
    )
    return data["config"], result


def _check(result: RunResult, problem: ComparisonProblem) -> None:
    names = [m.name for m in problem.metrics]
    missing = [n for n in names if n not in result.metrics]
    if missing:
        raise ValueError(f"the run reported no value for {missing}")
    bad = {n: result.metrics[n] for n in names if not math.isfinite(float(result.metrics[n]))}
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}")


def run_comparison(
    problem: ComparisonProblem,
    methods: Sequence[str] | str,
    seeds: int | Sequence[int],
    out: str | Path,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    epochs: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Comparison:
    """Run (or load from ``out``) every row × seed on ``problem``.

    Args:
        methods: ``"all"``, specs such as ``"cagrad"`` or ``"cagrad[c=0.2]"`` (a list, or
            one comma-separated string); see :func:`~taskbalance.compare.options.
            select_methods`. Equal weighting (the Δm% baseline) is always run.
        seeds: a number of seeds (``0..n-1``) or the seeds themselves.
        out: the run directory; finished runs found there with the same config are reused.
        options: constructor arguments for every row of a method,
            ``{"cagrad": {"c": 0.2}}`` (a bracketed value in a spec wins).
        epochs: the length of each run (default: the problem's ``default_epochs``).
        force: rerun even finished runs.

    Raises:
        BalancerUsageError: an unknown method or option, a method missing an argument, a
            value its constructor refuses, ...: raised before any run starts.
    """
    out = Path(out)
    selection = select_methods(methods, problem, options)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    epochs = problem.default_epochs if epochs is None else int(epochs)
    specs = {spec.label: spec for spec in selection.specs}
    comparison = Comparison(
        problem,
        out,
        epochs,
        {label: [] for label in specs},
        specs,
        selection.left_out,
        selection.options,
        selection.unavailable,
    )
    for name, needs in selection.left_out.items():
        logger.info("'all' leaves out %s: it needs %s", name, ", ".join(needs))
    for name, reason in selection.unavailable.items():
        logger.info("'all' leaves out %s: %s", name, reason)
    runs_of = {  # training runs per row
        SINGLE_TASK: len(problem.tasks) * len(seed_list),
        TUNED_STATIC: len(tuning_candidates(len(problem.tasks))) + len(seed_list),
    }
    total = sum(runs_of.get(spec.method, len(seed_list)) for spec in specs.values())
    with make_progress(progress, problem.name) as bar:
        job = bar.add_task(problem.name, total=total, info="")

        def step(info: str) -> None:
            bar.update(job, info=escape(info))  # not markup

        def advance() -> None:
            bar.update(job, advance=1)

        for label, spec in specs.items():
            if spec.method == TUNED_STATIC:
                comparison.tuning = _tune(problem, spec, epochs, out, force, step, advance)
            for seed in seed_list:
                step(f"{label} seed {seed}")
                if spec.method == SINGLE_TASK:
                    record = _single_task(problem, spec, seed, epochs, out, force, step, advance)
                elif spec.method == TUNED_STATIC:
                    record = _tuned_static(
                        problem, comparison.tuning, spec, seed, epochs, out, force
                    )
                    advance()
                else:
                    record = _one_run(problem, spec, seed, epochs, out, force)
                    advance()
                comparison.runs[label].append(record)
    return comparison


def _single_task(
    problem: ComparisonProblem,
    spec: MethodSpec,
    seed: int,
    epochs: int,
    out: Path,
    force: bool,
    step: Callable[[str], None],
    advance: Callable[[], None],
) -> RunRecord:
    """One seed of the ``single_task`` row: K runs (one per task), combined."""
    results: dict[str, RunResult] = {}
    errors: list[str] = []
    cached, wall = True, 0.0
    for task, run in zip(problem.tasks, baseline_runs(spec, problem)):
        step(f"{spec.label} ({task}) seed {seed}")
        record = _one_run(
            problem,
            run,
            seed,
            epochs,
            out,
            force,
            directory=single_task_dir(out, task, seed),
            extra={"baseline": SINGLE_TASK, "task": task},
            name=f"{spec.label} ({task})",
        )
        advance()
        cached = cached and record.cached
        wall += record.wall_time or 0.0
        if record.status == "ok" and record.result is not None:
            results[task] = record.result
        else:
            errors.append(f"task {task}: {record.error}")
    if errors:
        return RunRecord(spec.label, seed, "failed", None, error="; ".join(errors))
    try:
        combined = combine_single_task_runs(problem, results)
        _check(combined, problem)
    except Exception as err:  # a problem's own combine_single_task may raise
        message = f"combining the single-task runs failed: {type(err).__name__}: {err}"
        logger.error("%s seed %d: %s", spec.label, seed, message)
        return RunRecord(spec.label, seed, "failed", None, error=message)
    return RunRecord(spec.label, seed, "ok", combined, cached=cached, wall_time=wall)


def _tune(
    problem: ComparisonProblem,
    spec: MethodSpec,
    epochs: int,
    out: Path,
    force: bool,
    step: Callable[[str], None],
    advance: Callable[[], None],
) -> Tuning:
    """Train every candidate of ``tuned_static`` once (seed :data:`TUNING_SEED`) and
    choose by the validation metrics alone."""
    runs = baseline_runs(spec, problem)
    tuning = Tuning([list(run.options["weights"]) for run in runs])
    validation: list[Mapping[str, float] | None] = []
    for i, run in enumerate(runs):
        step(f"{spec.label}: tuning candidate {i + 1} of {len(runs)}")
        record = _one_run(
            problem,
            run,
            TUNING_SEED,
            epochs,
            out,
            force,
            directory=tuning_dir(out, i),
            extra={"baseline": TUNED_STATIC, "tuning": i},
            name=f"{spec.label} (tuning candidate {i})",
        )
        advance()
        tuning.seconds += record.wall_time or 0.0
        tuning.cached += int(record.cached)
        values = record.result.extras.get("validation") if record.result is not None else None
        if record.status == "ok" and not isinstance(values, Mapping):
            record.error = (
                "the run reported no validation metrics (RunResult.extras['validation']), "
                f"although {type(problem).__name__}.has_validation is true"
            )
            logger.error("%s tuning candidate %d: %s", spec.label, i, record.error)
            values = None
        if values is None:
            tuning.errors[i] = record.error
        validation.append(values)
    try:
        tuning.chosen, tuning.scores = choose_candidate(validation, problem.metrics)
    except ValueError as err:
        reason = f": {tuning.errors[0]}" if 0 in tuning.errors else ""
        tuning.error = f"{err}{reason}"
        logger.error("%s: tuning failed: %s", spec.label, tuning.error)
    else:
        logger.info(
            "%s: candidate %d of %d chosen on the validation split, weights %s",
            spec.label,
            tuning.chosen,
            len(runs),
            tuning.weights,
        )
    return tuning


def _tuned_static(
    problem: ComparisonProblem,
    tuning: Tuning | None,
    spec: MethodSpec,
    seed: int,
    epochs: int,
    out: Path,
    force: bool,
) -> RunRecord:
    """One seed of the ``tuned_static`` row: the chosen weights trained with ``seed``."""
    if tuning is None or tuning.weights is None:
        error = tuning.error if tuning is not None else "not tuned"
        return RunRecord(spec.label, seed, "failed", None, error=f"tuning failed: {error}")
    return _one_run(
        problem,
        static_spec(spec.label, tuning.weights),
        seed,
        epochs,
        out,
        force,
        extra={"baseline": TUNED_STATIC},
    )


def _one_run(
    problem: ComparisonProblem,
    spec: MethodSpec,
    seed: int,
    epochs: int,
    out: Path,
    force: bool,
    *,
    directory: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> RunRecord:
    """Run (or load) one training run of ``spec``; ``directory`` defaults to the row's
    :func:`run_dir`, ``extra`` is added to its configuration, ``name`` names it in logs."""
    factory, options = make_factory(problem, spec, seed)
    config = {**_run_config(problem, spec, seed, epochs, options), **(extra or {})}
    method = spec.label
    name = name or method
    directory = run_dir(out, method, seed) if directory is None else directory
    cached = None if force else load_run(directory, problem.tasks)
    if cached is not None and cached[0] == config:
        wall = _stored_wall_time(directory)
        return RunRecord(method, seed, "ok", cached[1], cached=True, wall_time=wall)
    if cached is not None:
        logger.warning("%s: stored run has another configuration; running again", directory)
    problem.prepare()  # shared data built outside the timed run (once: cached)
    start = time.perf_counter()
    try:
        result = problem.run(factory, seed=seed, epochs=epochs, progress=False)
        _check(result, problem)
    except Exception as err:  # recorded, reported, and retried on the next invocation
        message = f"{type(err).__name__}: {err}"
        logger.error("%s seed %d failed: %s", name, seed, message)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(
            directory / "result.json",
            {
                "config": config,
                "status": "failed",
                "error": message,
                "traceback": traceback.format_exc(),
            },
        )
        return RunRecord(method, seed, "failed", None, error=message)
    wall = time.perf_counter() - start
    save_run(directory, config, result, wall)
    stored = load_run(directory, problem.tasks)[1]  # type: ignore[index]
    return RunRecord(method, seed, "ok", stored, wall_time=wall)


def _stored_wall_time(directory: Path) -> float | None:
    """The wall time stored with a finished run (``None`` when absent)."""
    wall = json.loads((directory / "result.json").read_text()).get("wall_time")
    return float(wall) if isinstance(wall, (int, float)) else None
