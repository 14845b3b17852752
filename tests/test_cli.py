"""The ``taskbalance`` command line."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from taskbalance.cli import app
from taskbalance.problems import run_kendall

runner = CliRunner()


def test_demo_kendall_writes_figure_and_csv(tmp_path) -> None:
    out = tmp_path / "k"
    result = runner.invoke(
        app, ["demo", "kendall", "--epochs", "5", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    png = out / "sigma.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 25
    assert {"loss/y1", "weight/y2", "sigma/y1", "sigma/y2"} <= set(rows[0])
    expected = run_kendall(epochs=5, seed=0).sigma
    assert f"{expected[0]:.3f}" in result.output
    assert f"{expected[1]:.3f}" in result.output
    assert "8.59" in result.output and "0.92" in result.output


def test_demo_kendall_with_progress_bar(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "kendall", "--epochs", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sigma.png").exists()


def test_demo_rejects_bad_options(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "kendall", "--epochs", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0
    result = runner.invoke(app, ["demo", "kendall", "--lr", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert not (tmp_path / "sigma.png").exists()


def test_list_shows_methods_and_problems() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for word in ("dwa", "uncertainty", "equal", "kendall", "Dynamic Weight Averaging"):
        assert word in result.output


def test_demo_is_a_command_group() -> None:
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "kendall" in result.output


def test_demo_mmoe_small_run_prints_table_and_writes_figure(tmp_path) -> None:
    args = ["demo", "mmoe", "--seeds", "1", "--steps", "20", "--correlations", "1.0,0.5"]
    args += ["--workers", "1", "--no-progress", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mmoe" in result.output and "shared_bottom" in result.output
    assert "p = 0.5: shared-bottom minus MMoE" in result.output
    assert "MMoE's advantage grows as p falls" in result.output
    assert (tmp_path / "mmoe.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_mmoe_rejects_bad_correlations(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "mmoe", "--correlations", "one", "--out", str(tmp_path)])
    assert result.exit_code != 0


def test_demo_gradnorm_small_run_prints_table_and_writes_figure(tmp_path) -> None:
    args = ["demo", "gradnorm", "--tasks", "2", "--seeds", "1", "--steps", "20"]
    args += ["--workers", "1", "--no-progress", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gradnorm" in result.output and "equal" in result.output
    assert "ends below equal weighting" in result.output
    assert (tmp_path / "gradnorm.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_gradnorm_rejects_other_task_counts(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "gradnorm", "--tasks", "3", "--out", str(tmp_path)])
    assert result.exit_code != 0


def test_module_entry_point_defines_every_command_before_running() -> None:
    """``python -m taskbalance.cli`` runs the app at the end of the module: every helper
    must be defined by then (a helper after it raised NameError there)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "taskbalance.cli", "compare", "--problem", "penguinz"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "unknown problem" in done.stderr and "NameError" not in done.stderr
