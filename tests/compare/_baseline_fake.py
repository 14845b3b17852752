"""A comparison problem without training for the baseline rows' tests: each run reads the
weights its balancer gives a unit loss per task and reports metrics computed from them by
a function the test chooses (test and validation split apart)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from taskbalance.compare import ComparisonProblem, Metric, RunResult

#: score(weights, task index, split ("test" or "validation"), seed) -> the task's score
Score = Callable[[Sequence[float], int, str, int], float]


def by_own_weight(weights: Sequence[float], index: int, split: str, seed: int) -> float:
    """A task's score grows with its own weight: 0.5 + 0.1 w_k + 0.01 seed."""
    return 0.5 + 0.1 * weights[index] + 0.01 * seed


def peaked(validation_peak: float, test_peak: float) -> Score:
    """Every task's score is ``1 − (w_1 − peak)²``, with a peak of its own per split."""

    def score(weights: Sequence[float], index: int, split: str, seed: int) -> float:
        peak = validation_peak if split == "validation" else test_peak
        return 1.0 - (weights[0] - peak) ** 2 + 0.001 * index

    return score


class WeightFake(ComparisonProblem):
    """Tasks ``tasks``; metrics ``score_<task>`` (higher is better) and, with ``summary``,
    ``mean_score`` (task ``"all"``: the mean of the scores of the run)."""

    name = "weight_fake"
    description = "metrics computed from the balancer's weights (tests only)"
    default_epochs = 2
    STEP_TIME = 0.002
    STEPS = 5

    def __init__(
        self,
        size: str = "small",
        tasks: Sequence[str] = ("a", "b"),
        score: Score = by_own_weight,
        validation: bool = True,
        reports_validation: bool = True,
        summary: bool = False,
    ) -> None:
        super().__init__(size)  # type: ignore[arg-type]
        self._tasks = tuple(tasks)
        self.score = score
        self.validation = validation
        self.reports_validation = reports_validation
        self.summary = summary
        self.calls: list[tuple[str, tuple[float, ...], int]] = []

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    @property
    def has_validation(self) -> bool:  # type: ignore[override]
        return self.validation

    @property
    def metrics(self) -> tuple[Metric, ...]:
        out = [Metric(f"score_{t}", t, higher_is_better=True) for t in self.tasks]
        if self.summary:
            out.append(Metric("mean_score", "all", higher_is_better=True))
        return tuple(out)

    def _split(self, weights: list[float], split: str, seed: int) -> dict[str, float]:
        values = {
            f"score_{t}": self.score(weights, i, split, seed) for i, t in enumerate(self.tasks)
        }
        if self.summary:
            values["mean_score"] = sum(values.values()) / len(self.tasks)
        return values

    def run(self, make_balancer, *, seed, epochs, progress=False):
        balancer = make_balancer()
        losses = {t: torch.tensor(1.0, requires_grad=True) for t in self.tasks}
        balancer(losses).backward()
        weights = [float(losses[t].grad) for t in self.tasks]
        self.calls.append((balancer.method_name, tuple(round(w, 6) for w in weights), seed))
        extras = {}
        if self.validation and self.reports_validation:
            extras["validation"] = self._split(weights, "validation", seed)
        return RunResult(
            metrics=self._split(weights, "test", seed),
            epoch_losses={t: [w + e for e in range(epochs)] for t, w in zip(self.tasks, weights)},
            step_time=self.STEP_TIME,
            steps=self.STEPS,
            histories={"main": balancer.history},
            extras=extras,
        )
