"""Run every (method, seed) pair of a comparison, caching each finished run on disk.

Layout of ``out``::

    out/runs/<method>/seed<k>/result.json        metrics, loss curves, step time, extras
    out/runs/<method>/seed<k>/history_<label>.csv  the balancer's per-step losses and weights

A run is finished when its ``result.json`` exists (it is written last, atomically) and its
``config`` matches the requested one (the problem's settings, method, seed, epochs, options
and a fingerprint of the code the run depends on, see :mod:`.fingerprint`: an edited method
or engine reruns its runs); rerunning the same command skips finished runs, so an
interrupted comparison resumes where it stopped. A run that raises is recorded as failed
(with the error) and the comparison goes on; it is retried on the next invocation.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import taskbalance as tb
from taskbalance.compare.fingerprint import code_fingerprint
from taskbalance.compare.problem import ComparisonProblem, RunResult
from taskbalance.history import History
from taskbalance.training.joint import make_progress

logger = logging.getLogger("taskbalance")

BASELINE = "equal"


@dataclass
class RunRecord:
    """One (method, seed) run as stored on disk."""

    method: str
    seed: int
    status: str  # "ok" or "failed"
    result: RunResult | None
    error: str = ""
    cached: bool = False


@dataclass
class Comparison:
    """Every run of a comparison, by method then seed (methods in the requested order)."""

    problem: ComparisonProblem
    out: Path
    epochs: int
    runs: dict[str, list[RunRecord]] = field(default_factory=dict)

    def ok(self, method: str) -> list[RunResult]:
        return [r.result for r in self.runs[method] if r.status == "ok" and r.result is not None]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for records in self.runs.values() for r in records if r.status != "ok"]


def required_options(method: str) -> list[str]:
    """Constructor arguments of ``method`` that have no default (besides ``tasks``)."""
    params = list(inspect.signature(tb.get(method).__init__).parameters.values())[2:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def resolve_methods(
    methods: Sequence[str] | str, problem: ComparisonProblem | None = None
) -> list[str]:
    """``"all"`` or names (aliases allowed) -> registered names, baseline first, no repeats.

    ``"all"`` leaves out methods that need an argument the problem does not give in
    :meth:`~taskbalance.compare.problem.ComparisonProblem.method_options` (static weighting
    needs its weights); a method named explicitly is always kept (and fails if unbuildable).
    """
    if methods == "all":
        names = []
        for name in tb.list_methods():
            given = problem.method_options(name) if problem is not None else {}
            missing = [o for o in required_options(name) if o not in given]
            if missing:
                logger.info("'all' leaves out %s: it needs %s", name, ", ".join(missing))
            else:
                names.append(name)
    else:
        names = [tb.get(m).method_name for m in methods]
    ordered = [BASELINE] + [m for m in names if m != BASELINE]
    return list(dict.fromkeys(ordered))


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def make_factory(problem: ComparisonProblem, method: str, seed: int):
    """A factory of fresh balancers with the problem's settings (and ``seed`` if accepted)."""
    options = dict(problem.method_options(method))
    cls = tb.get(method)
    if "seed" in inspect.signature(cls.__init__).parameters and "seed" not in options:
        options["seed"] = seed
    return lambda: cls(problem.tasks, **options), options


def _run_config(problem: ComparisonProblem, method: str, seed: int, epochs: int, options: dict):
    return {
        **problem.config(),
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "code": code_fingerprint(tb.get(method), type(problem)),
    }


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
    epochs: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Comparison:
    """Run (or load from ``out``) every method × seed on ``problem``.

    Args:
        methods: ``"all"`` or method names (see :func:`resolve_methods`); equal weighting
            (the Δm% baseline) is always run.
        seeds: a number of seeds (``0..n-1``) or the seeds themselves.
        out: the run directory; finished runs found there with the same config are reused.
        epochs: the length of each run (default: the problem's ``default_epochs``).
        force: rerun even finished runs.
    """
    out = Path(out)
    names = resolve_methods(methods, problem)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    epochs = problem.default_epochs if epochs is None else int(epochs)
    comparison = Comparison(problem, out, epochs, {m: [] for m in names})
    with make_progress(progress, problem.name) as bar:
        job = bar.add_task(problem.name, total=len(names) * len(seed_list), info="")
        for method in names:
            for seed in seed_list:
                bar.update(job, info=f"{method} seed {seed}")
                record = _one_run(problem, method, seed, epochs, out, force)
                comparison.runs[method].append(record)
                bar.update(job, advance=1)
    return comparison


def _one_run(
    problem: ComparisonProblem, method: str, seed: int, epochs: int, out: Path, force: bool
) -> RunRecord:
    factory, options = make_factory(problem, method, seed)
    config = _run_config(problem, method, seed, epochs, options)
    directory = run_dir(out, method, seed)
    cached = None if force else load_run(directory, problem.tasks)
    if cached is not None and cached[0] == config:
        return RunRecord(method, seed, "ok", cached[1], cached=True)
    if cached is not None:
        logger.warning("%s: stored run has another configuration; running again", directory)
    start = time.perf_counter()
    try:
        result = problem.run(factory, seed=seed, epochs=epochs, progress=False)
        _check(result, problem)
    except Exception as err:  # recorded, reported, and retried on the next invocation
        message = f"{type(err).__name__}: {err}"
        logger.error("%s seed %d failed: %s", method, seed, message)
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
    save_run(directory, config, result, time.perf_counter() - start)
    return RunRecord(method, seed, "ok", load_run(directory, problem.tasks)[1])  # type: ignore[index]
