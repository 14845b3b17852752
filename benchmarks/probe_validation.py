"""Validate the probe's verdict against the full comparisons in ``runs/``.

For each reference problem whose full comparison table exists (``table.csv`` written by
``taskbalance compare``), run :func:`taskbalance.probe.probe_problem` (size full, the
default candidates, seeds and budget unless given) and set its verdict beside the full
comparison's:

* **full best**: the balancing method (baseline rows ``single_task`` and ``tuned_static``
  left out) with the lowest mean Δm% against equal weighting in the full table;
* **full separated**: the methods that the probe's own rule (:func:`taskbalance.probe.
  decide`: mean Δm% below equal weighting's by more than the larger of the two seed
  spreads) calls better in the full table; the full comparison "separated something" when
  this is not empty;
* **full pick among the candidates**: the rule applied to the full table restricted to
  equal weighting and the probe's candidates (the best separated candidate, or none).

A **hit** is the probe picking what the full comparison picks among the same candidates
(both "none" counts as a hit); the script prints the table, the hit rate and the probe's
diagnostics (equal weighting's mean conflict fraction and median norm ratio, beside whether the full
comparison separated a gradient method from equal weighting), and writes
everything to ``--out`` as JSON.

Usage::

    python benchmarks/probe_validation.py [--problems penguins,yeast] [--epochs 1]
        [--fraction 0.1] [--seeds 3] [--candidates uncertainty,pcgrad,upgrad]
        [--out runs/probe_validation]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import taskbalance as tb
from taskbalance.compare.options import build_problem
from taskbalance.probe import DEFAULT_CANDIDATES, MIN_DIFFERENCE, REFERENCE, probe_problem

#: problem spec -> the full comparison's table.
TABLES = {
    "multidigits": "runs/multidigits/table.csv",
    "penguins": "runs/penguins/table.csv",
    "yeast": "runs/full/yeast/table.csv",
    "census_income[group=1]": "runs/full/census_incomegroup1/table.csv",
    "census_income[group=2]": "runs/full/census_incomegroup2/table.csv",
}
BASELINE_ROWS = ("single_task", "tuned_static")


def read_table(path: Path) -> dict[str, tuple[float, float]]:
    """method -> (mean Δm%, std over seeds) of the rows with every seed finished."""
    rows: dict[str, tuple[float, float]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["method"] in BASELINE_ROWS or not row["delta_m"] or row["seeds_failed"] != "0":
                continue
            rows[row["method"]] = (float(row["delta_m"]), float(row["delta_m_std"] or 0.0))
    return rows


def separated(table: dict[str, tuple[float, float]], methods: list[str] | None = None) -> list[str]:
    """The methods better than equal weighting by the probe's rule, best first."""
    ref_mean, ref_std = table[REFERENCE]
    better = [
        (mean, method)
        for method, (mean, std) in table.items()
        if method != REFERENCE
        and (methods is None or method in methods)
        and mean - ref_mean < -max(std, ref_std, MIN_DIFFERENCE)
    ]
    return [method for _, method in sorted(better)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default=",".join(TABLES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="instead of --epochs: this fraction of each problem's full epochs (at least 1)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("runs/probe_validation"))
    args = parser.parse_args()
    candidates = [c for c in args.candidates.split(",") if c]
    results = []
    for spec in [p for p in args.problems.split(",") if p]:
        path = Path(TABLES[spec])
        if not path.exists():
            print(f"{spec}: no full comparison at {path}; skipped")
            continue
        full = read_table(path)
        problem = build_problem(spec, size="full")
        epochs = args.epochs
        if args.fraction is not None:
            epochs = max(1, round(args.fraction * problem.default_epochs))
        start = time.perf_counter()
        probe = probe_problem(
            problem, candidates=candidates, seeds=args.seeds, epochs=epochs, every=args.every
        )
        seconds = time.perf_counter() - start
        ew = next(row for row in probe.rows if row.method == REFERENCE)
        among = separated(full, candidates)
        entry = {
            "problem": spec,
            "probe_best": probe.best,
            "probe_verdict": probe.verdict,
            "probe_table": probe.table(),
            "probe_epochs": epochs,
            "full_epochs": problem.default_epochs,
            "probe_cost_epochs": probe.cost_epochs,
            "probe_seconds": seconds,
            "full_best": min((m for m in full if m != REFERENCE), key=lambda m: full[m][0]),
            "full_separated": separated(full),
            "full_gradient_separated": [m for m in separated(full) if tb.get(m).kind != "loss"],
            "full_pick_among_candidates": among[0] if among else None,
            "ew_conflict_fraction": ew.conflict_fraction,
            "ew_norm_ratio": ew.norm_ratio,
        }
        entry["hit"] = entry["probe_best"] == entry["full_pick_among_candidates"]
        results.append(entry)
        print(f"## {spec}: {epochs} of {problem.default_epochs} epochs ({seconds:.0f} s)")
        print(f"\n{probe}\n")
    if not results:
        return
    print(
        "| problem | probe pick | full pick among the candidates | full best (all methods) | "
        "full separated from EW | a gradient method among them | hit | EW conflict | "
        "EW norm ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in results:
        best = e["full_best"]
        print(
            f"| {e['problem']} | {e['probe_best'] or 'none'} | "
            f"{e['full_pick_among_candidates'] or 'none'} | {best} ({full_delta(e, best)}) | "
            f"{', '.join(e['full_separated']) or 'nothing'} | "
            f"{'yes' if e['full_gradient_separated'] else 'no'} | {'yes' if e['hit'] else 'no'} | "
            f"{e['ew_conflict_fraction']:.2f} | {e['ew_norm_ratio']:.2f} |"
        )
    hits = sum(e["hit"] for e in results)
    print(f"\nhit rate: {hits} of {len(results)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {args.out / 'results.json'}")


def full_delta(entry: dict, method: str) -> str:
    table = read_table(Path(TABLES[entry["problem"]]))
    mean, std = table[method]
    return f"Δm% {mean:+.3f} ± {std:.3f}"


if __name__ == "__main__":
    main()
