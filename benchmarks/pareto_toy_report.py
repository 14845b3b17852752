"""Reproduce the Pareto toy of CAGrad / Nash-MTL for many methods and write the report parts.

Runs go through the comparison runner (``taskbalance.compare.runner.run_comparison``), so
they are cached exactly as ``taskbalance compare`` caches them: ``OUT/<setup>/runs/<method>/
seed0/result.json``; an interrupted run resumes. The toy is deterministic, so one seed.

Usage::

    python benchmarks/pareto_toy_report.py run --setup toy_cagrad --methods equal,mgda
    python benchmarks/pareto_toy_report.py report          # tables (Markdown) + PNGs
    python benchmarks/pareto_toy_report.py timing          # ms/step of every method

``run`` logs one line per method (wall time, step time, final point of every start);
``timing`` measures the step time of every method over the first 2 000 steps per start
(``--engine``: every step through ``balancer.backward``, the toy's path before its lean one);
``report`` prints the per-start tables of every stored run and draws the trajectory
figures into ``docs/img/pareto_toy_<setup>*.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from taskbalance.compare.problem import RunResult, make_problem
from taskbalance.compare.runner import load_run, run_comparison, run_dir
from taskbalance.problems import pareto_toy  # noqa: F401  (registers the problems)

SETUPS = ("toy_cagrad", "toy_nashmtl")
PRIORITY = (
    "equal", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo", "upgrad", "imtl", "dwa",
    "uncertainty",
)  # fmt: skip
REST = (
    "aligned_mtl", "db_mtl", "graddrop", "gradvac", "imtl_l", "mgda_ub", "rlw", "gls",
    "gradnorm", "dtp",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def run(setups: list[str], methods: list[str], out: Path, size: str, epochs: int | None) -> None:
    torch.set_num_threads(1)
    for setup in setups:
        problem = make_problem(setup, size=size)  # type: ignore[arg-type]
        for method in methods:
            begin = time.perf_counter()
            comparison = run_comparison(
                problem, [method], [0], out / setup, epochs=epochs, progress=False
            )
            record = comparison.runs[method][0]
            wall = time.perf_counter() - begin
            if record.status != "ok" or record.result is None:
                print(f"[{setup}] {method}: FAILED after {wall:.0f} s: {record.error}", flush=True)
                continue
            result = record.result
            ends = "; ".join(
                f"{label} θ=({s['theta'][0]:.3f}, {s['theta'][1]:.3f}) "
                f"front={'yes' if s['front_reached'] else 'no'}"
                for label, s in result.extras["starts"].items()
            )
            print(
                f"[{setup}] {method}: {'cached' if record.cached else f'{wall:.0f} s'}, "
                f"{1e3 * result.step_time:.3f} ms/step; {ends}",
                flush=True,
            )


def _stored(out: Path, setup: str, methods: list[str]) -> dict[str, RunResult | str]:
    found: dict[str, RunResult | str] = {}
    for method in methods:
        directory = run_dir(out / setup, method, 0)
        path = directory / "result.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if data.get("status") != "ok":
            found[method] = data.get("error", "failed").splitlines()[0]
            continue
        loaded = load_run(directory, ("L1", "L2"))
        if loaded is not None:
            found[method] = loaded[1]
    return found


def report(setups: list[str], out: Path, methods: list[str], img: Path) -> None:
    for setup in setups:
        problem = make_problem(setup)
        stored = _stored(out, setup, methods)
        print(f"\n### {setup}\n")
        print("| method | start | final θ | L1 | L2 | front | dist. to (0, −8.355) |")
        print("|---|---|---|---|---|---|---|")
        for method, result in stored.items():
            if isinstance(result, str):
                print(f"| {method} | all | failed: {result} | | | | |")
                continue
            for s in result.extras["starts"].values():
                theta = f"({s['theta'][0]:.3f}, {s['theta'][1]:.3f})"
                start = f"({s['start'][0]:g}, {s['start'][1]:g})"
                front = "yes" if s["front_reached"] else "no"
                l1, l2 = s["losses"]
                print(
                    f"| {method} | {start} | {theta} | {l1:.3f} | {l2:.3f} | {front} | "
                    f"{s['dist_balanced']:.3f} |"
                )
        print("\n| method | starts on front | mean L1 | mean L2 | ms/step | full run (s) |")
        print("|---|---|---|---|---|---|")
        for method, result in stored.items():
            if isinstance(result, str):
                continue
            m = result.metrics
            total = result.step_time * result.steps * len(result.extras["starts"])
            print(
                f"| {method} | {m['front_reached']:.0f}/{len(result.extras['starts'])} | "
                f"{m['L1_final']:.3f} | {m['L2_final']:.3f} | {1e3 * result.step_time:.3f} | "
                f"{total:.0f} |"
            )
        ok = {m: [r] for m, r in stored.items() if not isinstance(r, str)}
        for path in problem.plot_comparison(ok, img):
            print(f"\nwrote {path}")


def timing(setups: list[str], methods: list[str], steps: int, lean: bool = True) -> None:
    """Mean step time of each method over the first ``steps`` steps from every start.

    Two numbers per cell: the wall time of a step measured by the problem (what a run
    reports) and this process's CPU time per step (less disturbed by other jobs on a
    shared machine). ``lean=False`` sends every step through the engine
    (``balancer.backward``), as before the toy's lean path: the before/after comparison.
    """
    import taskbalance as tb

    torch.set_num_threads(1)
    path = "lean path where it applies" if lean else "engine path"
    print(f"{steps} steps per start, {path}; wall / CPU ms per step\n")
    print("| method | " + " | ".join(f"{s} ms/step" for s in setups) + " |")
    print("|---|" + "---:|" * len(setups))
    for method in methods:
        cells = []
        for setup in setups:
            problem = make_problem(setup)
            problem.lean = lean  # type: ignore[attr-defined]
            options = problem.method_options(method)
            try:
                begin = time.process_time()
                result = problem.run(
                    lambda p=problem, o=options, m=method: tb.make(m, p.tasks, **o),
                    seed=0,
                    epochs=steps,
                )
                cpu = (time.process_time() - begin) / steps / len(result.extras["starts"])
                cells.append(f"{1e3 * result.step_time:.3f} / {1e3 * cpu:.3f}")
            except Exception as err:  # the toy's negative losses, GradNorm's missing matrix
                cells.append(f"fails ({type(err).__name__})")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "report", "timing"])
    parser.add_argument("--setup", default="both", choices=[*SETUPS, "both"])
    parser.add_argument("--methods", default=",".join(PRIORITY + REST))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pareto_toy")
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--epochs", type=int, default=None, help="steps (default: published)")
    parser.add_argument(
        "--engine", action="store_true", help="timing: every step through balancer.backward"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # near the front Nash-MTL's system has no solution and CAGrad's solver may stop early:
    # both log a warning per step, thousands per start; failures are still logged (ERROR)
    logging.getLogger("taskbalance").setLevel(logging.ERROR)
    setups = list(SETUPS) if args.setup == "both" else [args.setup]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.action == "run":
        run(setups, methods, args.out, args.size, args.epochs)
    elif args.action == "timing":
        timing(setups, methods, args.epochs or 2000, lean=not args.engine)
    else:
        report(setups, args.out, methods, args.img)


if __name__ == "__main__":
    main()
