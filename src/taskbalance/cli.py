"""The ``taskbalance`` command line.

* ``taskbalance list``: the registered balancing methods and the reference problems.
* ``taskbalance diagnose --problem NAME``: one training run of a method with gradient
  diagnostics on (:mod:`taskbalance.diagnostics`), writing its history CSV and figure and
  printing a summary (conflict fraction, norm ratio, the tasks the updates hurt).
* ``taskbalance probe --problem NAME``: equal weighting and a few candidates for a short
  budget over a few seeds (:mod:`taskbalance.probe`): a ranked table and a verdict.
* ``taskbalance demo kendall``: the uncertainty-weighting toy of Kendall et al. (CVPR 2018),
  printing the learned sigmas against the true noise and the published values, whether
  each of the two claims reproduced (the rule: ``taskbalance.problems.kendall.claims``),
  and writing a figure and the per-step history CSV.

``demo`` is a sub-command group: each reference problem adds one command to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="taskbalance",
    help="Multi-task loss balancing for PyTorch: methods, demos and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
)
demo_app = typer.Typer(
    help="Reproduce reference problems with known answers.",
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")

console = Console()


def _first_line(doc: str | None) -> str:
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@app.command("list")
def list_command() -> None:
    """List the registered balancing methods and the reference problems."""
    import taskbalance
    from taskbalance.problems import PROBLEMS

    methods = Table(title="methods")
    methods.add_column("name", style="bold")
    methods.add_column("kind")
    methods.add_column("description")
    for name in taskbalance.list_methods():
        cls = taskbalance.get(name)
        methods.add_row(name, cls.kind, _first_line(cls.__doc__))
    console.print(methods)
    problems = Table(title="problems (taskbalance demo <name>)")
    problems.add_column("name", style="bold")
    problems.add_column("description")
    for name, text in PROBLEMS.items():
        problems.add_row(name, text)
    console.print(problems)
    from taskbalance.compare import list_problems

    compared = Table(title="comparison problems (taskbalance compare --problem <name>)")
    compared.add_column("name", style="bold")
    compared.add_column("description")
    for name, text in list_problems().items():
        compared.add_row(name, text)
    console.print(compared)


@app.command("compare")
def compare_command(
    problem: Annotated[
        str,
        typer.Option(
            help="Problem name (see `taskbalance list`), optionally with constructor options: "
            "NAME[KEY=VALUE,...], e.g. 'penguins[data_seed=1]'."
        ),
    ],
    methods: Annotated[
        str,
        typer.Option(
            help="'all' or comma-separated method specs: NAME or NAME[KEY=VALUE,...], e.g. "
            "'mgda,cagrad,cagrad[c=0.2]' (each spec is a row); the baseline rows "
            "single_task and tuned_static run where named ('all' adds the problem's own).",
        ),
    ] = "all",
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="METHOD.KEY=VALUE for every row of a method, e.g. cagrad.c=0.2 or "
            "static.weights=1,2,3 (repeatable; a bracketed value wins).",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1 per method.")] = 3,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs (steps for the toys); default: problem's.")
    ] = None,
    size: Annotated[
        str, typer.Option(help="'full' (documented) or 'small' (a smoke test, seconds).")
    ] = "full",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder (default runs/<problem>, a safe name for a problem with "
            "options); finished runs are reused."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun finished runs.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run every method x seed on one problem; write a Markdown/CSV table and PNGs."""
    from taskbalance.compare import compare
    from taskbalance.compare.options import (
        parse_options,
        spec_directory,
    )
    from taskbalance.errors import BalancerUsageError

    label, built = _cli_problem(problem, size)
    try:  # every mistake in the methods or options is refused here, before any training
        report = compare(
            built,
            methods,
            seeds,
            out if out is not None else Path("runs") / spec_directory(label),
            options=parse_options(option or []),
            epochs=epochs,
            progress=progress,
            force=force,
            label=label,
        )
    except BalancerUsageError as err:
        typer.echo(f"taskbalance compare: {err}", err=True)
        raise typer.Exit(code=2) from None
    _print_comparison(report)
    if report.comparison.failed:
        raise typer.Exit(code=1)


@app.command("diagnose")
def diagnose_command(
    problem: Annotated[
        str,
        typer.Option(
            help="Problem name (see `taskbalance list`, comparison problems), optionally "
            "with options: NAME[KEY=VALUE,...]."
        ),
    ],
    method: Annotated[
        str,
        typer.Option(help="Method spec: NAME or NAME[KEY=VALUE,...], e.g. 'upgrad'."),
    ] = "equal",
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs (steps for the toys); default: problem's.")
    ] = None,
    every: Annotated[
        int, typer.Option(min=1, help="Diagnose every n-th training step (1: every step).")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the run (as in compare).")] = 0,
    size: Annotated[
        str, typer.Option(help="'full' (documented) or 'small' (a smoke test, seconds).")
    ] = "full",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the CSV and the figure (default runs/diagnose/<problem>)."),
    ] = None,
) -> None:
    """Train one method on a reference problem with diagnostics on; write the history CSV
    and the diagnostics figure, and print a summary of the conflict between the tasks."""
    from rich.markup import escape

    from taskbalance.compare.options import (
        MethodSpec,
        _parse_spec,
        spec_directory,
    )
    from taskbalance.compare.runner import make_factory
    from taskbalance.diagnostics import plot_diagnostics, summarize
    from taskbalance.errors import BalancerUsageError

    label, built = _cli_problem(problem, size)
    try:
        cls, bracketed = _parse_spec(method)
        if not cls.supports_diagnostics():
            raise BalancerUsageError(
                f"{cls.method_name} has a gradient step of its own and records no "
                "diagnostics; pick another method (see `taskbalance list`)"
            )
        spec = MethodSpec(cls.method_name, {**bracketed, "diagnostics": every}, method)
        factory, _ = make_factory(built, spec, seed)
    except (KeyError, BalancerUsageError, TypeError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise typer.BadParameter(str(message), param_hint="--method") from None
    if hasattr(built, "lean"):
        built.lean = False  # the toys' fast path skips the engine, hence the diagnostics
    folder = out if out is not None else Path("runs") / "diagnose" / spec_directory(label)
    built.prepare()
    result = built.run(factory, seed=seed, epochs=epochs or built.default_epochs)
    console.print(escape(f"{cls.method_name} on {label}, seed {seed}: {result.steps} steps"))
    for name, history in result.histories.items():
        suffix = "" if len(result.histories) == 1 else f"_{name}"
        csv_path = history.to_csv(folder / f"history{suffix}.csv")
        picture = plot_diagnostics(history, folder / f"diagnostics{suffix}.png")
        facts = summarize(history)
        head = f"{name}: " if suffix else ""
        console.print(
            escape(
                f"{head}{facts['diagnosed']} diagnosed steps; mean conflict fraction "
                f"{facts['mean_conflict_fraction']:.3f}; median norm ratio "
                f"{facts['median_norm_ratio']:.3f}"
            )
        )
        hurt = [
            f"{t} ({n} of {facts['diagnosed']})"
            for t, n in facts["negative_alignment"].items()
            if n
        ]
        console.print(
            escape(
                "alignment < 0 most often: " + ", ".join(hurt[:3])
                if hurt
                else "no task's alignment with the update went negative"
            )
        )
        console.print(escape(f"history: {csv_path}  figure: {picture}"))


@app.command("probe")
def probe_command(
    problem: Annotated[
        str,
        typer.Option(
            help="Problem name (see `taskbalance list`, comparison problems), optionally "
            "with options: NAME[KEY=VALUE,...]."
        ),
    ],
    candidates: Annotated[
        str,
        typer.Option(help="Comma-separated method specs tried against equal weighting."),
    ] = "uncertainty,pcgrad,upgrad",
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 per method (at least 2).")] = 3,
    epochs: Annotated[
        float | None,
        typer.Option(
            help="Epochs of every run, fractions allowed (steps for the toys): the budget. "
            "Default: 0.2 (2% of the steps on the toys)."
        ),
    ] = None,
    every: Annotated[int, typer.Option(help="Diagnose every n-th training step.")] = 5,
    size: Annotated[
        str, typer.Option(help="'full' (documented) or 'small' (a smoke test, seconds).")
    ] = "full",
    rule: Annotated[
        str,
        typer.Option(
            help="Verdict rule: 'paired' (a paired t-test on the same starts) or 'spread' "
            "(beyond the larger seed spread)."
        ),
    ] = "paired",
) -> None:
    """Should this problem be balanced, and with what? Equal weighting and a few candidates
    for a short budget over a few seeds: a ranked table and a verdict."""
    from rich.markup import escape

    from taskbalance.errors import BalancerUsageError
    from taskbalance.probe import CAVEAT, probe_problem

    _, built = _cli_problem(problem, size)
    try:
        result = probe_problem(
            built,
            candidates=[c for c in candidates.split(",") if c.strip()],
            seeds=seeds,
            epochs=epochs,
            every=every,
            rule=rule,
        )
    except BalancerUsageError as err:
        typer.echo(f"taskbalance probe: {err}", err=True)
        raise typer.Exit(code=2) from None
    console.print(escape(result.table()), soft_wrap=True)
    console.print(escape(result.verdict), soft_wrap=True)
    console.print(escape(result.cost_line()), soft_wrap=True)
    console.print(escape(CAVEAT), soft_wrap=True, style="dim")


def _print_comparison(report) -> None:
    """The console summary of ``taskbalance compare``: as many columns as fit the terminal
    (``COLUMNS``), the method names whole, then the options, files and failures."""
    from rich.markup import escape

    from taskbalance.compare.options import format_value
    from taskbalance.compare.report import baseline_notes, console_table, title

    comparison = report.comparison
    out = Console()  # reads COLUMNS now
    table, hidden = console_table(comparison, report.rows, out.width)
    out.print(escape(title(comparison)), style="bold")
    out.print(table)
    if comparison.options:
        given = " ".join(
            f"{method}.{key}={format_value(value)}"
            for method, values in comparison.options.items()
            for key, value in values.items()
        )
        out.print(escape(f"options for every row of their method: {given}"))
    for method, needs in comparison.left_out.items():
        flags = " ".join(f"--option {method}.{n}=..." for n in needs)
        out.print(escape(f"'all' left out {method}: it needs {', '.join(needs)} ({flags})"))
    for name, reason in comparison.unavailable.items():
        out.print(escape(f"'all' left out {name}: {reason}"))
    for line in baseline_notes(comparison):
        out.print(escape(line.replace("`", "")))
    if hidden:
        out.print(escape(f"not shown here: {', '.join(hidden)} (see table.md)"))
    out.print(escape(f"table: {report.table_md}  {report.table_csv}"))
    for picture in report.pictures:
        out.print(escape(f"figure: {picture}"))
    for record in comparison.failed:
        out.print(
            f"[red]failed[/red] {escape(f'{record.method} seed {record.seed}: {record.error}')}"
        )


@demo_app.command("kendall")
def kendall_command(
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Mini-batch size.")] = 20,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the data, model and shuffling.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for the figure and the CSV.")] = Path(
        "runs/kendall"
    ),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Kendall et al. (CVPR 2018) toy: uncertainty weighting learns each task's noise."""
    from taskbalance.problems.kendall import (
        PUBLISHED_SIGMA,
        TASKS,
        TRUE_SIGMA,
        claims,
        plot_sigma,
        run_kendall,
    )

    if not lr > 0:
        raise typer.BadParameter("must be positive", param_hint="--lr")
    result = run_kendall(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    table = Table(title=f"Kendall toy: learned sigma after {epochs} epochs")
    table.add_column("task", style="bold")
    table.add_column("learned sigma", justify="right")
    table.add_column("true noise", justify="right")
    table.add_column("published", justify="right")
    for i, task in enumerate(TASKS):
        table.add_row(
            task, f"{result.sigma[i]:.3f}", f"{TRUE_SIGMA[i]:g}", f"{PUBLISHED_SIGMA[i]:g}"
        )
    console.print(table)
    for claim in claims(result.sigma):
        console.print(claim.line(), markup=False, soft_wrap=True)
    if epochs < 2000:
        console.print(f"({epochs} epochs, the paper's 2000: sigma has not reached its end value)")
    figure = plot_sigma(result, out / "sigma.png")
    csv = None
    if result.history is not None:
        csv = result.history.to_csv(out / "history.csv")
    console.print(f"training time {result.seconds:.1f} s")
    console.print(f"figure: {figure}")
    if csv is not None:
        console.print(f"history: {csv}")


@demo_app.command("mmoe")
def mmoe_command(
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per (p, model).")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per run.")] = 4000,
    correlations: Annotated[
        str, typer.Option(help="Comma-separated task correlations p.")
    ] = "1.0,0.9,0.5",
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes.")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for the figure.")] = Path("runs/mmoe"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Ma et al. (KDD 2018) synthetic data: shared-bottom vs OMoE vs MMoE as p falls."""
    from taskbalance.problems.mmoe_synthetic import (
        Config,
        gap,
        plot_results,
        results_table,
        run_mmoe_synthetic,
    )

    try:
        ps = tuple(float(v) for v in correlations.split(","))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--correlations") from err
    results = run_mmoe_synthetic(
        correlations=ps,
        seeds=seeds,
        config=Config(steps=steps),
        workers=workers,
        progress=progress,
    )
    console.print(results_table(results))
    for p in ps:
        console.print(f"p = {p:g}: shared-bottom minus MMoE test loss = {gap(results, p):+.4f}")
    low, high = min(ps), max(ps)
    if low < high:
        grows = gap(results, low) > gap(results, high)
        verdict = "reproduced" if grows else "NOT reproduced here"
        console.print(
            f"paper's claim 'MMoE's advantage grows as p falls' (p={high:g} -> {low:g}): {verdict}"
        )
    console.print(f"figure: {plot_results(results, out / 'mmoe.png')}")


@demo_app.command("mmoe_census")
def mmoe_census_command(
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per (group, model).")] = 3,
    groups: Annotated[str, typer.Option(help="Comma-separated groups (1, 2).")] = "1,2",
    size: Annotated[str, typer.Option(help="'full' or 'small' (a quick smoke run).")] = "full",
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs per run; default: the problem's.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Cache of the fetched data (default: user cache).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the table and the figure.")] = Path(
        "runs/mmoe_census"
    ),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Ma et al. (KDD 2018) Census-Income: single-task, shared-bottom, OMoE and MMoE AUCs
    next to the paper's Tables 1-2."""
    from taskbalance.problems.mmoe_census import (
        PAPER_CORRELATION,
        claims,
        plot_results,
        results_markdown,
        run_mmoe_census,
        save_results,
    )

    if size not in ("small", "full"):
        raise typer.BadParameter("must be 'small' or 'full'", param_hint="--size")
    try:
        chosen = tuple(int(g) for g in groups.split(","))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--groups") from err
    if not set(chosen) <= {1, 2}:
        raise typer.BadParameter("groups are 1 and 2", param_hint="--groups")
    results = run_mmoe_census(
        groups=chosen,
        seeds=seeds,
        size=size,  # type: ignore[arg-type]
        epochs=epochs,
        progress=progress,
        data_dir=None if data_dir is None else str(data_dir),
    )
    table = results_markdown(results)
    console.print(table, markup=False, soft_wrap=True)
    for group, value in results.correlation.items():
        console.print(
            f"group {group}: label correlation {value:.4f} here, {PAPER_CORRELATION[group]} "
            "in the paper"
        )
    for claim in claims(results):
        console.print(claim.line(), markup=False, soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    console.print(f"training time {results.seconds:.0f} s")
    console.print(f"table: {out / 'table.md'}")
    console.print(f"results: {save_results(results, out / 'results.json')}")
    console.print(f"figure: {plot_results(results, out / 'mmoe_census.png')}")


@demo_app.command("gradnorm")
def gradnorm_command(
    tasks: Annotated[
        int | None, typer.Option(help="Number of tasks: 10 (default, wide sigmas) or 2.")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method.")] = 3,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Training steps per run (default 10000; 1000 with --rates)."),
    ] = None,
    uncertainty: Annotated[bool, typer.Option(help="Also run uncertainty weighting.")] = False,
    rates: Annotated[
        bool,
        typer.Option(
            help="Run the rate-balancing variant instead: 2 tasks of equal scale and "
            "different complexity; equal weighting, GradNorm with alpha=0 and alpha=1.5."
        ),
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes.")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for the figure.")] = Path("runs/gradnorm"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Chen et al. (ICML 2018) synthetic tasks: GradNorm vs equal weighting."""
    from dataclasses import replace

    import torch

    from taskbalance.problems.gradnorm_synthetic import (
        RATE_VARIANTS,
        RATES_CONFIG,
        SIGMAS_2,
        SIGMAS_10,
        Config,
        format_rate_table,
        format_table,
        plot,
        run_gradnorm_synthetic,
        run_rate_balance,
        spearman,
    )

    if rates:
        if tasks is not None or uncertainty:
            raise typer.BadParameter(
                "--rates runs its own 2 tasks with equal weighting and GradNorm only: "
                "drop --tasks and --uncertainty",
                param_hint="--rates",
            )
        steps = steps or RATES_CONFIG.steps
        config = replace(RATES_CONFIG, steps=steps, eval_every=min(RATES_CONFIG.eval_every, steps))
        result = run_rate_balance(seeds, config, workers, progress)
        console.print(format_rate_table(result))
        spread = [float(result.final_spread(label).mean()) for label in RATE_VARIANTS]
        narrower = "reproduced" if spread[2] < 0.9 * min(spread[:2]) else "NOT reproduced here"
        console.print(
            f"paper's claim 'alpha pulls the tasks towards a common training rate' (spread "
            f"{spread[2]:.3f} vs {spread[1]:.3f} at alpha=0 and {spread[0]:.3f} equal; "
            f"reproduced if below 0.9x both): {narrower}"
        )
        console.print(f"figure: {plot(result, out / 'gradnorm_rates.png')}")
        return
    sigmas = {10: SIGMAS_10, 2: SIGMAS_2}.get(10 if tasks is None else tasks)
    if sigmas is None:
        raise typer.BadParameter("must be 10 or 2", param_hint="--tasks")
    steps = steps or Config().steps
    config = replace(Config(), steps=steps, eval_every=min(Config().eval_every, steps))
    methods = ("equal", "gradnorm", "uncertainty") if uncertainty else ("equal", "gradnorm")
    result = run_gradnorm_synthetic(
        sigmas=sigmas,
        seeds=seeds,
        methods=methods,
        config=config,
        workers=workers,
        progress=progress,
    )
    console.print(format_table(result))
    equal, gradnorm = result.final_metric("equal")[0], result.final_metric("gradnorm")[0]
    rho = spearman(result.final_weights(), torch.tensor(sigmas))
    below = "reproduced" if gradnorm < equal else "NOT reproduced here"
    inverse = "reproduced" if rho < 0 else "NOT reproduced here"
    console.print(f"paper's claim 'GradNorm ends below equal weighting': {below}")
    console.print(
        f"paper's claim 'weights order inversely to sigma' (Spearman {rho:+.2f}): {inverse}"
    )
    console.print(f"figure: {plot(result, out / 'gradnorm.png')}")


def _cli_problem(problem: str, size: str) -> tuple[str, Any]:
    """``(label, problem object)`` from ``--problem`` and ``--size``, or a usage error."""
    from taskbalance.compare.options import build_problem, parse_problem
    from taskbalance.errors import BalancerUsageError

    if size not in ("full", "small"):
        raise typer.BadParameter("must be 'full' or 'small'", param_hint="--size")
    try:
        label = parse_problem(problem)[2]
        return label, build_problem(problem, size=size)  # type: ignore[arg-type]
    except KeyError as err:
        raise typer.BadParameter(str(err.args[0]), param_hint="--problem") from None
    except BalancerUsageError as err:
        raise typer.BadParameter(str(err), param_hint="--problem") from None


if __name__ == "__main__":
    app()
