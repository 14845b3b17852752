"""The baseline rows of a comparison: single-task networks and tuned static weights.

Next to equal weighting (``equal``, the reference of the table's Δm%), two rows make a
comparison credible:

``single_task``
    One network per task, the reference of the literature's Δm% (Maninis et al., CVPR 2019;
    Liu et al., CAGrad and Nash-MTL). For each task ``k`` the problem is run once with
    static weights 1 on ``k`` and 0 elsewhere: the shared body is trained by task ``k``
    alone (the other heads get zero gradients and stay as initialised), and the metrics of
    task ``k`` are taken from that run. Metrics of no single task (a mean over tasks) come
    from :meth:`~taskbalance.compare.problem.ComparisonProblem.combine_single_task`. The
    row's step time is the *sum* of the K runs' step times (K networks cost K times one),
    its steps the sum of their steps, its loss curve of task ``k`` run ``k``'s.

``tuned_static``
    Static weights tuned on the validation split: the honest baseline of Xin et al.
    (NeurIPS 2022) and Royer et al. (NeurIPS 2023), for whom a tuned scalarization is hard
    to beat. Each of :func:`tuning_candidates` is trained once with seed
    :data:`TUNING_SEED` for the comparison's epochs and scored *only* on its validation
    metrics (``RunResult.extras["validation"]``) by Δm% against candidate 0 (equal
    weighting); the lowest score wins, a tie goes to the lower index
    (:func:`choose_candidate`). The chosen weights are then trained with every seed of the
    comparison and those runs' test metrics are the row. The tuning runs are cached like
    any run and their total wall time is reported with the table, also as a multiple of
    one equal-weighting run. Needs a problem with a validation split
    (:attr:`~taskbalance.compare.problem.ComparisonProblem.has_validation`).

The runner (:mod:`taskbalance.compare.runner`) executes these rows; this module holds what
they are: the names, the weight vectors and the selection rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from taskbalance.compare.metrics import delta_m
from taskbalance.compare.problem import ComparisonProblem, Metric, RunResult

SINGLE_TASK = "single_task"
TUNED_STATIC = "tuned_static"
#: the baseline rows, in table order (after equal weighting, before the methods).
BASELINE_ROWS = (SINGLE_TASK, TUNED_STATIC)
#: the seed of every tuning run of ``tuned_static`` (and of its candidates' Dirichlet draws).
TUNING_SEED = 0
#: the number of candidate weight vectors of ``tuned_static`` for more than two tasks.
TUNING_CANDIDATES = 8


def single_task_weights(tasks: Sequence[str], task: str) -> list[float]:
    """Static weights that train ``task`` alone: 1 on it, 0 on every other task."""
    if task not in tasks:
        raise ValueError(f"task {task!r} is not one of {list(tasks)}")
    return [1.0 if t == task else 0.0 for t in tasks]


def tuning_candidates(
    k: int, n: int = TUNING_CANDIDATES, seed: int = TUNING_SEED
) -> list[list[float]]:
    """The static weight vectors ``tuned_static`` tries, each summing to ``k``.

    Candidate 0 is always equal weighting (all ones). For ``k == 2`` the grid
    ``w_1 ∈ {0.1, 0.2, ..., 0.9} · 2`` (``w_2 = 2 − w_1``): 9 vectors with equal weighting,
    whatever ``n``. For ``k > 2``: equal weighting and ``n − 1`` vectors ``k · Dirichlet(1)``
    (uniform on the simplex, scaled), drawn from ``numpy.random.default_rng(seed)``. For
    ``k == 1``: ``[[1.0]]``.

    Raises:
        ValueError: ``k`` or ``n`` is smaller than 1.
    """
    if k < 1:
        raise ValueError(f"the number of tasks must be at least 1, got {k}")
    if n < 1:
        raise ValueError(f"the number of candidates must be at least 1, got {n}")
    equal = [1.0] * k
    if k == 1:
        return [equal]
    if k == 2:
        return [equal] + [[i / 5, 2.0 - i / 5] for i in (1, 2, 3, 4, 6, 7, 8, 9)]
    draws = np.random.default_rng(seed).dirichlet(np.ones(k), size=n - 1) * k
    return [equal] + [[float(w) for w in row] for row in draws]


def choose_candidate(
    validation: Sequence[Mapping[str, float] | None], metrics: Sequence[Metric]
) -> tuple[int, list[float | None]]:
    """The index of the best candidate and every candidate's score.

    ``validation[i]`` is candidate ``i``'s metrics on the validation split (``None``: its
    run failed). A score is the Δm% of a candidate against candidate 0 (equal weighting)
    over the metrics counted in Δm%; the lowest wins, and of equal scores the lower index.

    Raises:
        ValueError: candidate 0 has no validation metrics (it is the reference), or a
            metric counted in Δm% is missing or undefined (see :func:`.metrics.delta_m`).
    """
    if not validation or validation[0] is None:
        raise ValueError("candidate 0 (equal weighting), the reference of the scores, failed")
    reference = validation[0]
    scores: list[float | None] = []
    for values in validation:
        score = None if values is None else delta_m(values, reference, metrics)
        scores.append(score if score is None or math.isfinite(score) else None)
    return min((s, i) for i, s in enumerate(scores) if s is not None)[1], scores


@dataclass
class Tuning:
    """How ``tuned_static`` chose its weights.

    Attributes:
        candidates: the weight vectors tried (:func:`tuning_candidates`).
        scores: each candidate's validation Δm% against candidate 0 (``None``: it failed).
        chosen: the index of the chosen candidate (``None``: tuning failed, see ``error``).
        seconds: the wall time of all tuning runs, as measured when each ran.
        cached: how many tuning runs were read back from earlier invocations.
        error: why no candidate was chosen.
        errors: the failures of single candidates (their index -> message).
    """

    candidates: list[list[float]]
    scores: list[float | None] = field(default_factory=list)
    chosen: int | None = None
    seconds: float = 0.0
    cached: int = 0
    error: str = ""
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def weights(self) -> list[float] | None:
        """The chosen weights (``None`` when tuning failed)."""
        return None if self.chosen is None else self.candidates[self.chosen]


def combine_single_task_runs(
    problem: ComparisonProblem, results_by_task: Mapping[str, RunResult]
) -> RunResult:
    """The ``single_task`` row's result of one seed from its K runs (task -> run).

    Metrics: :meth:`~taskbalance.compare.problem.ComparisonProblem.combine_single_task`;
    loss curve of task ``k``: run ``k``'s; step time and steps: the sums over the runs (K
    networks cost K times one); no histories (the weights are fixed one-hot vectors).
    """
    runs = [results_by_task[task] for task in problem.tasks]
    return RunResult(
        metrics=problem.combine_single_task(results_by_task),
        epoch_losses={t: list(r.epoch_losses[t]) for t, r in zip(problem.tasks, runs)},
        step_time=sum(r.step_time for r in runs),
        steps=sum(r.steps for r in runs),
    )
