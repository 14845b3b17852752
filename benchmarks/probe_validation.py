"""Validate the probe's verdict against the full comparisons in ``runs/``.

For each reference problem whose full comparison exists (the run directories written by
``taskbalance compare --out DIR``), run :func:`taskbalance.probe.probe_problem` (size full,
the default candidates and seeds) at each budget, and judge the full comparison's per-seed
Δm% with the same rule (:func:`taskbalance.probe.decide`; every method starts from the
same model for a seed there too, so its runs pair up as the probe's do):

* **full pick among the candidates**: the rule applied to the full comparison restricted to
  equal weighting and the probe's candidates (the best better candidate, or none);
* **full best**: the balancing method with the lowest mean Δm% in the full comparison
  (baseline rows ``single_task`` and ``tuned_static`` left out);
* **full separated**: every method the rule calls better in the full comparison.

A **hit** is the probe picking what the full comparison picks among the same candidates
(both "none" counts as a hit). Both rules (``paired``, the default, and ``spread``) are
reported: the probe's runs are judged by each, without training again. The script also
prints equal weighting's diagnostics in the probe (mean conflict fraction, median norm
ratio) beside whether the full comparison separated a gradient method from equal
weighting, and writes everything to ``--out`` as JSON.

Budgets: ``--budgets`` in epochs for the problems with data (default ``0.2,1``: the probe's
default and one epoch a run); ``--toy-fractions`` of the steps of a full run for the toys,
which have no data (default ``0.02,0.1``: the probe's default and a tenth).

Usage::

    python benchmarks/probe_validation.py [--problems penguins,yeast] [--budgets 0.2,1]
        [--toy-fractions 0.02,0.1] [--seeds 3] [--out runs/probe_validation]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import taskbalance as tb
from taskbalance.compare.metrics import delta_m
from taskbalance.compare.options import build_problem
from taskbalance.probe import DEFAULT_CANDIDATES, REFERENCE, RULES, decide, probe_problem
from taskbalance.problems._supervised import SupervisedProblem

#: problem spec -> the directory of its full comparison (``taskbalance compare --out``).
COMPARISONS = {
    "multidigits": "runs/multidigits",
    "penguins": "runs/penguins",
    "yeast": "runs/full/yeast",
    "census_income[group=1]": "runs/full/census_incomegroup1",
    "census_income[group=2]": "runs/full/census_incomegroup2",
    "mmoe_pair": "runs/full/mmoe_pair",
    "toy_cagrad": "runs/full/toy_cagrad",
    "toy_nashmtl": "runs/full/toy_nashmtl",
}
BASELINE_ROWS = ("single_task", "tuned_static")


def full_deltas(directory: Path, problem: Any) -> dict[str, list[float]]:
    """method -> per-seed Δm% against equal weighting's mean over seeds, for the rows
    whose every seed finished (seeds in the same order for every method)."""
    runs: dict[str, list[dict[str, float]]] = {}
    for row in sorted((directory / "runs").iterdir()):
        if row.name in BASELINE_ROWS or not row.is_dir():
            continue
        results = [json.loads(p.read_text()) for p in sorted(row.glob("seed*/result.json"))]
        if results and all(r["status"] == "ok" for r in results):
            runs[row.name] = [r["metrics"] for r in results]
    seeds = len(runs[REFERENCE])
    runs = {m: r for m, r in runs.items() if len(r) == seeds}
    base = {
        m.name: statistics.fmean(run[m.name] for run in runs[REFERENCE]) for m in problem.metrics
    }
    return {m: [delta_m(run, base, problem.metrics) for run in r] for m, r in runs.items()}


def judged(deltas: dict[str, list[float]], rule: str, among: list[str] | None = None) -> Any:
    """:func:`decide` on equal weighting and ``among`` (every method when ``None``)."""
    keep = {m: v for m, v in deltas.items() if among is None or m in among or m == REFERENCE}
    return decide(keep, rule=rule)


def validate(spec: str, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    """One probe of ``spec`` at ``budget`` beside its full comparison, under both rules."""
    problem = build_problem(spec, size="full")
    full = full_deltas(Path(COMPARISONS[spec]), problem)
    candidates = [c for c in args.candidates.split(",") if c]
    toy = not isinstance(problem, SupervisedProblem)
    epochs = max(1, round(budget * problem.default_epochs)) if toy else budget
    start = time.perf_counter()
    result = probe_problem(problem, candidates=candidates, seeds=args.seeds, epochs=epochs)
    seconds = time.perf_counter() - start
    ew = next(row for row in result.rows if row.method == REFERENCE)
    means = {m: statistics.fmean(v) for m, v in full.items() if m != REFERENCE}
    entry: dict[str, Any] = {
        "problem": spec,
        "budget": budget,
        "budget_unit": "fraction of the steps" if toy else "epochs",
        "probe_epochs": epochs,
        "full_epochs": problem.default_epochs,
        "probe_cost_epochs": result.cost_epochs,
        "probe_cost_trainings": result.steps / result.training_steps,
        "probe_seconds": seconds,
        "probe_table": result.table(),
        "probe_delta_m": result.delta_m,
        "full_methods": len(full) - 1,
        "full_best": min(means, key=means.__getitem__),
        "full_best_delta_m": min(means.values()),
        "ew_conflict_fraction": ew.conflict_fraction,
        "ew_norm_ratio": ew.norm_ratio,
    }
    for rule in RULES:
        probe_pick = decide(result.delta_m, rule=rule)
        full_all = judged(full, rule)
        full_pick = judged(full, rule, candidates)
        separated = sorted(
            (m for m, s in full_all.standing.items() if s == "better"), key=means.__getitem__
        )
        entry[rule] = {
            "probe_pick": probe_pick.best,
            "probe_verdict": probe_pick.verdict,
            "full_pick_among_candidates": full_pick.best,
            "full_separated": separated,
            "full_gradient_separated": [m for m in separated if tb.get(m).kind != "loss"],
            "hit": probe_pick.best == full_pick.best,
        }
    print(f"## {spec}: probe {epochs:g} of {problem.default_epochs} ({seconds:.0f} s)")
    print(f"\n{result}\n")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default=",".join(COMPARISONS))
    parser.add_argument("--budgets", default="0.2,1")
    parser.add_argument("--toy-fractions", default="0.02,0.1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("runs/probe_validation"))
    args = parser.parse_args()
    results = []
    for spec in [p for p in args.problems.split(",") if p]:
        if not (Path(COMPARISONS[spec]) / "runs").is_dir():
            print(f"{spec}: no full comparison in {COMPARISONS[spec]}; skipped")
            continue
        toy = not isinstance(build_problem(spec, size="small"), SupervisedProblem)
        budgets = args.toy_fractions if toy else args.budgets
        for budget in [float(b) for b in budgets.split(",") if b]:
            results.append(validate(spec, budget, args))
    if not results:
        return
    print(
        "| problem | budget | probe pick (paired) | full pick (paired) | probe pick (spread) "
        "| full pick (spread) | full best (of N) | full separated (paired) | EW conflict | "
        "EW norm ratio | cost (epochs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in results:
        p, s = e["paired"], e["spread"]
        print(
            f"| {e['problem']} | {e['probe_epochs']:g} | {p['probe_pick'] or 'none'} | "
            f"{p['full_pick_among_candidates'] or 'none'} | {s['probe_pick'] or 'none'} | "
            f"{s['full_pick_among_candidates'] or 'none'} | {e['full_best']} "
            f"({e['full_best_delta_m']:+.3f}, of {e['full_methods']}) | "
            f"{', '.join(p['full_separated']) or 'nothing'} | "
            f"{e['ew_conflict_fraction']:.2f} | {e['ew_norm_ratio']:.2f} | "
            f"{e['probe_cost_epochs']:.3g} |"
        )
    for rule in RULES:
        for budget in sorted({(e["budget_unit"], e["budget"]) for e in results}):
            chosen = [e for e in results if (e["budget_unit"], e["budget"]) == budget]
            hits = sum(e[rule]["hit"] for e in chosen)
            print(f"{rule}, budget {budget[1]:g} {budget[0]}: {hits} of {len(chosen)} hits")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
