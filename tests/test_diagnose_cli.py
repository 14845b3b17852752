"""``taskbalance diagnose``: one diagnosed training run of a reference problem."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from typer.testing import CliRunner

from taskbalance.cli import app

runner = CliRunner()


def flat(output: str) -> str:
    """The output without rich's line wrapping and error box."""
    return " ".join("".join(c for c in output if c not in "│╭╮╰╯─").split())


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def expected_summary(rows: list[dict[str, str]]) -> tuple[int, float, float]:
    """(diagnosed rows, mean conflict fraction, lower median norm ratio) from the CSV."""
    kept = [r for r in rows if not math.isnan(float(r["diag/norm_ratio"]))]
    conflict = sum(float(r["diag/conflict_fraction"]) for r in kept) / len(kept)
    ratios = sorted(float(r["diag/norm_ratio"]) for r in kept)
    return len(kept), conflict, ratios[(len(ratios) - 1) // 2]


def test_diagnose_writes_the_csv_and_figure_and_prints_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["diagnose", "--problem", "toy_cagrad", "--size", "small", "--epochs", "12"]
    result = runner.invoke(app, [*args, "--every", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)  # rich wraps long lines
    for start in ("start1", "start2", "start3"):  # one training run per start point
        png = out / f"diagnostics_{start}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = read_rows(out / f"history_{start}.csv")
        assert len(rows) == 12
        assert {"diag/cos/L1-L2", "diag/align/L2", "weight/L1"} <= set(rows[0])
        diagnosed, conflict, ratio = expected_summary(rows)
        assert diagnosed == 4  # steps 0, 3, 6, 9
        assert (
            f"{start}: 4 diagnosed steps; mean conflict fraction {conflict:.3f}; "
            f"median norm ratio {ratio:.3f}"
        ) in text
    assert "equal on toy_cagrad, seed 0" in text


def test_diagnose_names_the_task_the_updates_hurt_most_often(tmp_path: Path) -> None:
    """Equal weighting on Penguins (one epoch, small, a loss method diagnosed through the
    engine): the summary's numbers and the hurt tasks are those of the CSV."""
    out = tmp_path / "p"
    args = ["diagnose", "--problem", "penguins", "--size", "small", "--epochs", "1"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_rows(out / "history.csv")
    tasks = [c.removeprefix("diag/align/") for c in rows[0] if c.startswith("diag/align/")]
    diagnosed, conflict, ratio = expected_summary(rows)
    assert diagnosed == len(rows) > 1
    assert (
        f"{diagnosed} diagnosed steps; mean conflict fraction {conflict:.3f}; "
        f"median norm ratio {ratio:.3f}"
    ) in text
    counts = {t: sum(float(r[f"diag/align/{t}"]) < 0 for r in rows) for t in tasks}
    hurt = sorted((t for t in tasks if counts[t]), key=lambda t: (-counts[t], tasks.index(t)))
    assert hurt, "this run has a step that hurts a task"
    listed = ", ".join(f"{t} ({counts[t]} of {diagnosed})" for t in hurt[:3])
    assert f"alignment < 0 most often: {listed}" in text


def test_diagnose_refuses_a_method_without_diagnostics(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["diagnose", "--problem", "toy_cagrad", "--method", "modo", "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "records no diagnostics" in flat(result.output)
    assert not list(tmp_path.iterdir())


def test_diagnose_refuses_an_unknown_problem(tmp_path: Path) -> None:
    result = runner.invoke(app, ["diagnose", "--problem", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown problem 'nope'" in flat(result.output)
