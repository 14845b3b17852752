"""The MMoE paper on Census-Income: shared-bottom, OMoE and MMoE, next to its Tables 1 and 2.

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, §6.3 and Tables 1–2 (p. 1937): the test AUC of
both tasks of both groups of :mod:`taskbalance.problems.census_income`, for single-task
networks, the shared-bottom network, OMoE and MMoE. The paper tunes every model with a
Gaussian-process tuner (thousands of trials) and reports the mean over 400 trainings of
the tuned model; here every model has the same fixed set-up (Adam, lr 1e-3, batch 1024, the
problem's epochs; 128 hidden units in the shared layer or 8 experts × 16 units, towers of 8)
and equal task weights, over a few seeds — a check of the paper's ordering, not of its
tuning. The single-task row trains the shared-bottom network with weight 1 on the task and
0 on the other (one network per task).

Claims checked (:func:`claims`), on the main task (income, education; marital status is
the auxiliary task in the paper):

1. MMoE ≥ OMoE ≥ shared-bottom in mean AUC, in each group;
2. MMoE's gain over the shared-bottom network is larger in group 1, whose labels are less
   correlated (0.1768 against 0.2373 in the paper).
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import taskbalance as tb
from taskbalance.compare.problem import Size
from taskbalance.problems.census_income import GROUPS, CensusIncome, label_correlation, task_labels
from taskbalance.training.joint import make_progress

MODELS = ("single_task", "shared_bottom", "omoe", "mmoe")
#: the paper's mean test AUC over 400 runs (Tables 1 and 2, p. 1937): (group, model) ->
#: (main task, marital status).
PAPER_MEAN: dict[tuple[int, str], tuple[float, float]] = {
    (1, "single_task"): (0.9337, 0.9922),
    (1, "shared_bottom"): (0.9295, 0.9921),
    (1, "omoe"): (0.9319, 0.9923),
    (1, "mmoe"): (0.9359, 0.9927),
    (2, "single_task"): (0.8792, 0.9922),
    (2, "shared_bottom"): (0.8813, 0.9917),
    (2, "omoe"): (0.8813, 0.9912),
    (2, "mmoe"): (0.8826, 0.9924),
}
#: the absolute Pearson correlation of each group's labels the paper reports (§6.3.1,
#: over 10,000 random rows).
PAPER_CORRELATION = {1: 0.1768, 2: 0.2373}


@dataclass
class CensusMMoEResults:
    """Test AUCs by (group, model): one ``{task: auc}`` per seed; label correlations by group."""

    aucs: dict[tuple[int, str], list[dict[str, float]]] = field(default_factory=dict)
    correlation: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, group: int, model: str, task: str) -> float:
        return statistics.fmean(run[task] for run in self.aucs[(group, model)])

    def std(self, group: int, model: str, task: str) -> float:
        values = [run[task] for run in self.aucs[(group, model)]]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def gap(self, group: int, better: str, worse: str, task: str) -> tuple[float, float]:
        """Mean AUC of ``better`` minus that of ``worse``, and the standard error of that
        difference (the two seed sets taken as independent samples)."""
        diff = self.mean(group, better, task) - self.mean(group, worse, task)
        var = sum(
            self.std(group, m, task) ** 2 / len(self.aucs[(group, m)]) for m in (better, worse)
        )
        return diff, var**0.5


def measured_correlation(problem: CensusIncome) -> float:
    """The absolute Pearson correlation of the group's two labels over all rows of both files."""
    census = problem.census()
    a, b = (
        np.concatenate([task_labels(part, census, t) for part in (census.train, census.test)])
        for t in GROUPS[problem.group]
    )
    return label_correlation(a, b)


def _one_hot(tasks: Sequence[str], task: str) -> list[float]:
    return [1.0 if t == task else 0.0 for t in tasks]


def run_mmoe_census(
    groups: Sequence[int] = (1, 2),
    seeds: int = 3,
    size: Size = "full",
    epochs: int | None = None,
    progress: bool = True,
    data_dir: str | None = None,
) -> CensusMMoEResults:
    """Train every model of :data:`MODELS` on each group for ``seeds`` seeds (equal weights)."""
    results = CensusMMoEResults()
    runs = len(groups) * seeds * (len(MODELS) + 1)  # single-task: one network per task
    with make_progress(progress, "mmoe_census") as bar:
        job = bar.add_task("mmoe_census", total=runs, info="")
        for group in groups:
            for model in MODELS:
                arch = "shared_bottom" if model == "single_task" else model
                problem = CensusIncome(size, group=group, model=arch, data_dir=data_dir)  # type: ignore[arg-type]
                if group not in results.correlation:  # the same labels for every model
                    results.correlation[group] = measured_correlation(problem)
                n = problem.default_epochs if epochs is None else epochs
                per_seed: list[dict[str, float]] = []
                for seed in range(seeds):
                    bar.update(job, info=f"group {group} {model} seed {seed}")
                    if model == "single_task":
                        auc: dict[str, float] = {}
                        for task in problem.tasks:
                            weights = _one_hot(problem.tasks, task)
                            make = functools.partial(
                                tb.make, "static", problem.tasks, weights=weights
                            )
                            result = problem.run(make, seed=seed, epochs=n)
                            results.seconds += result.step_time * result.steps
                            auc[task] = result.metrics[f"{task}_auc"]
                            bar.update(job, advance=1)
                    else:
                        make = functools.partial(tb.make, "equal", problem.tasks)
                        result = problem.run(make, seed=seed, epochs=n)
                        results.seconds += result.step_time * result.steps
                        auc = {t: result.metrics[f"{t}_auc"] for t in problem.tasks}
                        bar.update(job, advance=1)
                    per_seed.append(auc)
                results.aucs[(group, model)] = per_seed
    return results


def save_results(results: CensusMMoEResults, path: str | Path) -> Path:
    """Write every run's test AUCs and the label correlations as JSON (re-read by
    :func:`load_results`, e.g. to redraw the figure without training again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "aucs": [{"group": g, "model": m, "runs": runs} for (g, m), runs in results.aucs.items()],
        "correlation": {str(g): r for g, r in results.correlation.items()},
        "seconds": results.seconds,
    }
    path.write_text(json.dumps(payload, indent=1))
    return path


def load_results(path: str | Path) -> CensusMMoEResults:
    """The results :func:`save_results` wrote."""
    payload = json.loads(Path(path).read_text())
    return CensusMMoEResults(
        aucs={(int(e["group"]), e["model"]): e["runs"] for e in payload["aucs"]},
        correlation={int(g): float(r) for g, r in payload["correlation"].items()},
        seconds=float(payload["seconds"]),
    )


@dataclass(frozen=True)
class Claim:
    """One claim of the paper checked on the measured means."""

    text: str
    reproduced: bool
    evidence: str

    def line(self) -> str:
        verdict = "reproduced" if self.reproduced else "NOT reproduced here"
        return f"paper's claim '{self.text}': {verdict} ({self.evidence})"


def claims(results: CensusMMoEResults) -> list[Claim]:
    """The two claims of the module docstring, on the main task's mean test AUC."""
    out = []
    for group in sorted({g for g, _ in results.aucs}):
        main = GROUPS[group][0]
        means = {m: results.mean(group, m, main) for m in ("mmoe", "omoe", "shared_bottom")}
        ordered = means["mmoe"] >= means["omoe"] >= means["shared_bottom"]
        gaps = [
            (pair, *results.gap(group, *pair, main))
            for pair in (("mmoe", "omoe"), ("omoe", "shared_bottom"))
        ]
        evidence = ", ".join(f"{m} {v:.4f}" for m, v in means.items())
        evidence += "; " + ", ".join(
            f"{a} - {b} = {d:+.4f} ± {se:.4f} (s.e.)" for (a, b), d, se in gaps
        )
        out.append(
            Claim(f"group {group}: MMoE >= OMoE >= shared-bottom on {main}", ordered, evidence)
        )
    if {1, 2} <= {g for g, _ in results.aucs}:
        gains = {g: results.gap(g, "mmoe", "shared_bottom", GROUPS[g][0]) for g in (1, 2)}
        out.append(
            Claim(
                "MMoE gains more over shared-bottom on the less correlated group 1",
                gains[1][0] > gains[2][0],
                ", ".join(
                    f"gain group {g} {d:+.4f} ± {se:.4f} (s.e.)" for g, (d, se) in gains.items()
                ),
            )
        )
    return out


def results_markdown(results: CensusMMoEResults) -> str:
    """A Markdown table: measured mean ± std test AUC next to the paper's mean, per row."""
    lines = [
        "| group | model | main task | AUC here | paper | marital AUC here | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for (group, model), _ in results.aucs.items():
        main = GROUPS[group][0]
        paper = PAPER_MEAN[(group, model)]
        cells = [
            f"{results.mean(group, model, t):.4f} ± {results.std(group, model, t):.4f}"
            for t in (main, "marital")
        ]
        lines.append(
            f"| {group} | {model} | {main} | {cells[0]} | {paper[0]:.4f} | {cells[1]} | "
            f"{paper[1]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: CensusMMoEResults, path: str | Path) -> Path:
    """Save a PNG: per group and task, each model's mean test AUC (std error bars) next to
    the paper's mean (a hollow marker)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = sorted({g for g, _ in results.aucs})
    fig = Figure(figsize=(9, 3.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    x = np.arange(len(MODELS))
    for row, group in enumerate(groups):
        for col, task in enumerate(GROUPS[group]):
            ax = axes[row, col]
            means = [results.mean(group, m, task) for m in MODELS]
            stds = [results.std(group, m, task) for m in MODELS]
            ax.errorbar(x - 0.1, means, yerr=stds, fmt="o", capsize=4, label="here")
            paper = [PAPER_MEAN[(group, m)][col] for m in MODELS]
            ax.plot(x + 0.1, paper, "s", mfc="none", color="black", label="paper (tuned)")
            ax.set_xticks(x, [m.replace("_", "-") for m in MODELS])
            ax.set_title(f"group {group}: {task} (r = {results.correlation[group]:.3f})")
            ax.set_ylabel("test AUC")
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9
    )
    fig.suptitle("MMoE paper, Census-Income (Ma et al., KDD 2018, Tables 1-2)")
    fig.savefig(path, dpi=100)
    return path
