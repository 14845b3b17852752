"""The MMoE-paper census demo: its claims on hand-made results, and a small run."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from taskbalance.cli import app
from taskbalance.problems.mmoe_census import (
    MODELS,
    PAPER_MEAN,
    CensusMMoEResults,
    claims,
    results_markdown,
)


def _results(main: dict[tuple[int, str], float]) -> CensusMMoEResults:
    results = CensusMMoEResults(correlation={1: 0.18, 2: 0.24})
    for (group, model), value in main.items():
        task = "income" if group == 1 else "education"
        results.aucs[(group, model)] = [
            {task: value - 0.001, "marital": 0.99},
            {task: value + 0.001, "marital": 0.99},
        ]
    return results


def _paper_like(gain1: float, gain2: float) -> dict[tuple[int, str], float]:
    return {
        (1, "single_task"): 0.93,
        (1, "shared_bottom"): 0.93,
        (1, "omoe"): 0.93 + gain1 / 2,
        (1, "mmoe"): 0.93 + gain1,
        (2, "single_task"): 0.88,
        (2, "shared_bottom"): 0.88,
        (2, "omoe"): 0.88 + gain2 / 2,
        (2, "mmoe"): 0.88 + gain2,
    }


def test_claims_hold_on_the_papers_pattern() -> None:
    verdicts = [c.reproduced for c in claims(_results(_paper_like(0.006, 0.001)))]
    assert verdicts == [True, True, True]


def test_claims_fail_when_the_order_or_the_gap_is_wrong() -> None:
    # MMoE below the shared bottom in group 1; the larger gain in group 2
    results = _results(_paper_like(-0.002, 0.004))
    verdicts = [c.reproduced for c in claims(results)]
    assert verdicts == [False, True, False]
    assert "mmoe 0.9280" in claims(results)[0].line()
    assert "NOT reproduced" in claims(results)[2].line()


def test_markdown_puts_the_papers_mean_next_to_each_row() -> None:
    table = results_markdown(_results(_paper_like(0.006, 0.001)))
    for model in MODELS:
        assert f"| 1 | {model} | income |" in table
        assert f"{PAPER_MEAN[(1, model)][0]:.4f}" in table
    assert "0.9360 ± 0.0014" in table  # mmoe group 1: mean of 0.935 and 0.937, sample std


@pytest.mark.registry
def test_demo_small_writes_table_and_figure(census_income, tmp_path) -> None:
    out = tmp_path / "mc"
    result = CliRunner().invoke(
        app,
        ["demo", "mmoe_census", "--size", "small", "--seeds", "1", "--groups", "1",
         "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "label correlation" in result.output and "0.1768 in the paper" in result.output
    assert (out / "table.md").read_text().count("| 1 |") == len(MODELS)
    assert (out / "mmoe_census.png").stat().st_size > 10_000


def test_demo_refuses_an_unknown_group() -> None:
    result = CliRunner().invoke(app, ["demo", "mmoe_census", "--groups", "3"])
    assert result.exit_code != 0
    assert "groups are 1 and 2" in result.output


def test_gap_and_its_standard_error_by_hand() -> None:
    results = _results(_paper_like(0.006, 0.001))
    diff, se = results.gap(1, "mmoe", "shared_bottom", "income")
    assert diff == pytest.approx(0.006)
    # each model: 2 seeds at mean ± 0.001, sample std √2·0.001; se = √(2 · std² / 2)
    assert se == pytest.approx(2**0.5 * 0.001)
    assert "± 0.0014 (s.e.)" in claims(results)[0].line()


def test_results_round_trip_through_json(tmp_path) -> None:
    from taskbalance.problems.mmoe_census import load_results, save_results

    results = _results(_paper_like(0.006, 0.001))
    results.seconds = 12.5
    back = load_results(save_results(results, tmp_path / "r.json"))
    assert back.aucs == results.aucs
    assert back.correlation == results.correlation and back.seconds == 12.5
