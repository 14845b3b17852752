"""``tb.probe`` and ``taskbalance probe``: the verdict rule, the runs, the cost, misuse."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import taskbalance as tb
from taskbalance.cli import app
from taskbalance.errors import BalancerUsageError
from taskbalance.probe import NO_DIFFERENCE, ProbeResult, decide, t_quantile_95
from taskbalance.training.joint import step_budget

runner = CliRunner()
TASKS = ("a", "b")


def flat(output: str) -> str:
    """The output without rich's line wrapping and error box."""
    return " ".join("".join(c for c in output if c not in "│╭╮╰╯─").split())


# --- the spread rule on hand-made per-seed Δm% -------------------------------------------


def test_a_clearly_better_method_is_named_with_its_margin() -> None:
    decision = decide(
        {"equal": [-1.0, 0.0, 1.0], "a": [-10.0, -11.0, -9.0], "b": [-3.0, -2.5, -3.5]},
        rule="spread",
    )
    # a: mean -10, std 1; equal's std 1: 10 - 1 = 9 points beyond the larger spread.
    # b: mean -3, std 0.5: better too, but a has the lower mean.
    assert decision.best == "a"
    assert decision.standing == {"equal": "reference", "a": "better", "b": "better"}
    assert decision.verdict.startswith("a is better than equal weighting at this budget")
    assert "Δm% -10.00 ± 1.00" in decision.verdict
    assert "(equal weighting's spread ± 1.00, 9.00 points beyond the larger seed spread)" in (
        decision.verdict
    )


def test_a_difference_within_the_spread_is_no_difference() -> None:
    decision = decide({"equal": [-1.0, 0.0, 1.0], "a": [-1.5, -0.5, 0.5]}, rule="spread")
    assert decision.verdict == "no method is distinguishable from equal weighting at this budget"
    assert decision.verdict == NO_DIFFERENCE
    assert decision.best is None
    assert decision.standing["a"] == "tie"


def test_the_larger_of_the_two_spreads_decides() -> None:
    # mean -1 beats equal's spread 0.1, not its own: stdev(-5, 0, 2) = sqrt(13) ≈ 3.61
    decision = decide({"equal": [-0.1, 0.0, 0.1], "a": [-5.0, 0.0, 2.0]}, rule="spread")
    assert decision.verdict == NO_DIFFERENCE
    # a margin equal to the spread is not beyond it: mean -1, both stds 1
    assert decide({"equal": [-1.0, 0.0, 1.0], "a": [-2.0, -1.0, 0.0]}, rule="spread").best is None


def test_without_a_seed_spread_rounding_is_no_difference() -> None:
    # a deterministic problem: every seed the same, spreads 0
    same = decide({"equal": [0.0, 0.0, 0.0], "a": [0.004] * 3, "b": [-0.009] * 3}, rule="spread")
    assert same.verdict == NO_DIFFERENCE
    decision = decide({"equal": [0.0, 0.0, 0.0], "a": [-0.5] * 3, "b": [0.02] * 3}, rule="spread")
    assert decision.standing == {"equal": "reference", "a": "better", "b": "worse"}
    assert "0.50 points beyond the larger seed spread" in decision.verdict


def test_small_differences_are_shown_to_two_significant_digits() -> None:
    # Δm% on AUCs near 0.94 is often a few hundredths: two decimals would read "0.00"
    decision = decide({"equal": [-0.003, 0.0, 0.003], "a": [-0.05, -0.04, -0.045]}, rule="spread")
    assert decision.best == "a"
    assert "Δm% -0.045 ± 0.005 (equal weighting's spread ± 0.003, 0.04 points" in (decision.verdict)


def test_when_every_method_is_worse_equal_weighting_is_kept() -> None:
    decision = decide(
        {"equal": [-1.0, 0.0, 1.0], "a": [5.0, 6.0, 7.0], "b": [2.5, 3.0, 3.5]}, rule="spread"
    )
    assert decision.best is None
    assert decision.standing == {"equal": "reference", "a": "worse", "b": "worse"}
    assert decision.verdict == (
        "keep equal weighting: no method beats it at this budget, and these are worse beyond "
        "the seed spread (Δm% against it): b (+3.00), a (+6.00)"
    )


# --- the paired rule (the default) ---------------------------------------------------------


def test_paired_rule_sees_a_steady_difference_that_the_spread_hides() -> None:
    # every seed 1 point below equal weighting's run from the same start; the starts
    # themselves spread by ±3, which hides it from the spread rule
    values = {"equal": [-3.0, 0.0, 3.0], "a": [-4.0, -1.0, 2.0]}
    assert decide(values, rule="spread").verdict == NO_DIFFERENCE
    decision = decide(values)
    assert decision.best == "a" and decision.standing["a"] == "better"
    assert decision.verdict == (
        "a is better than equal weighting at this budget: Δm% -1.00 ± 3.00 (on the same "
        "starts 1.00 ± 0.00 points below it, beyond the one-sided 5% bound 0.00 of a paired "
        "t-test)"
    )


def test_paired_bound_is_a_one_sided_t_test_at_five_percent() -> None:
    # d = (-1, -2, -3): mean -2, sd 1, bound t(0.95, 2) / sqrt(3) = 2.920 / 1.732 = 1.686
    decision = decide({"equal": [0.0, 0.0, 0.0], "a": [-1.0, -2.0, -3.0]})
    assert decision.best == "a"
    assert "2.00 ± 1.00 points below it, beyond the one-sided 5% bound 1.69" in decision.verdict
    # d = (0, -2, -4): mean -2, sd 2, bound 3.37: not significant
    assert decide({"equal": [0.0, 0.0, 0.0], "a": [0.0, -2.0, -4.0]}).best is None
    # the same differences with the reference's own values shifted: only d counts
    assert decide({"equal": [5.0, -1.0, 2.0], "a": [4.0, -3.0, -1.0]}).best == "a"


def test_paired_worse_keeps_equal_weighting() -> None:
    decision = decide({"equal": [0.0, 1.0, 2.0], "b": [3.0, 4.1, 4.9], "c": [0.5, 0.4, 2.2]})
    assert decision.standing == {"equal": "reference", "b": "worse", "c": "tie"}
    assert decision.verdict == (
        "keep equal weighting: no method beats it at this budget, and these are worse on the "
        "same starts (Δm% against it): b (+3.00)"
    )


def test_paired_rule_needs_paired_seeds_and_a_known_rule() -> None:
    with pytest.raises(BalancerUsageError, match=r"not 3 seeds as 'equal'.*rule='spread'"):
        decide({"equal": [0.0, 1.0, 2.0], "a": [1.0, 2.0]})
    assert decide({"equal": [0.0, 1.0, 2.0], "a": [1.0, 2.0]}, rule="spread").best is None
    with pytest.raises(BalancerUsageError, match="unknown rule 'pared'"):
        decide({"equal": [0.0, 1.0], "a": [1.0, 2.0]}, rule="pared")


def test_t_quantiles_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy is not a dependency")
    for df in [*range(1, 41), 60, 120, 1000]:
        assert t_quantile_95(df) == pytest.approx(stats.t.ppf(0.95, df), abs=1.5e-3), df
    with pytest.raises(ValueError, match="at least 1"):
        t_quantile_95(0)


@pytest.mark.parametrize("seeds", [3, 5])
def test_paired_rule_calls_a_null_difference_better_about_five_percent_of_the_time(
    seeds: int,
) -> None:
    """Under no difference (d ~ N(0, 1) per seed, a shared start effect on top) the rule
    says "better" at its stated 5% level, and "worse" as often."""
    gen = torch.Generator().manual_seed(seeds)
    draws = 4000
    start = 10 * torch.randn(draws, seeds, generator=gen, dtype=torch.float64)
    noise = torch.randn(draws, seeds, generator=gen, dtype=torch.float64)
    standings = [
        decide({"equal": start[i].tolist(), "a": (start[i] + noise[i]).tolist()}).standing["a"]
        for i in range(draws)
    ]
    # binomial standard error at 5% over 4000 draws: 0.0034; 3 of them either side
    assert 0.04 < standings.count("better") / draws < 0.06
    assert 0.04 < standings.count("worse") / draws < 0.06


def test_the_rule_needs_two_seeds_and_the_reference() -> None:
    with pytest.raises(BalancerUsageError, match="fewer than 2 seeds"):
        decide({"equal": [0.0, 1.0], "a": [-3.0]})
    with pytest.raises(BalancerUsageError, match="reference 'equal' is missing"):
        decide({"a": [-3.0, -2.0]})


# --- tb.probe on a user's model ------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body if body is not None else nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def make_batches(n: int = 10) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16 * n, 8, generator=gen)
    ys = {t: x @ torch.randn(8, generator=gen) for t in TASKS}
    return [
        (x[i : i + 16], {t: y[i : i + 16] for t, y in ys.items()}) for i in range(0, 16 * n, 16)
    ]


CRITERIA = {t: nn.functional.mse_loss for t in TASKS}


def body_of(model: nn.Module):
    return model.body.parameters()


def by_hand_of(result: ProbeResult) -> dict[str, list[float]]:
    """Δm% by hand: mean over the two held-out losses of the relative change, in %."""
    base = {t: statistics.fmean(run[t] for run in result.metrics["equal"]) for t in TASKS}
    return {
        method: [
            100 * statistics.fmean((run[t] - base[t]) / base[t] for t in TASKS) for run in runs
        ]
        for method, runs in result.metrics.items()
    }


def test_step_budget() -> None:
    assert [step_budget(e, 8) for e in (0.2, 1, 1.5, 2.0, 0.01, 0)] == [2, 8, 12, 16, 1, 0]
    assert step_budget(0.25, 9) == 2  # 2.25 rounds to 2


def test_probe_ranks_every_method_from_the_same_start_and_counts_its_cost() -> None:
    before = torch.random.get_rng_state()
    result = tb.probe(
        Net,
        make_batches(10),
        CRITERIA,
        body_of,
        tasks=TASKS,
        candidates=["upgrad", "static[weights=1,1]"],
        seeds=2,
        every=2,
    )
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG untouched
    assert {row.method for row in result.rows} == {"equal", "upgrad", "static[weights=1,1]"}
    assert [row.delta_m for row in result.rows] == sorted(row.delta_m for row in result.rows)
    # 10 batches, the last 2 held out: 8 steps an epoch; the default budget of 0.2 epochs is
    # round(1.6) = 2 steps a run; 3 methods x 2 seeds x 2 steps
    assert (result.epoch_steps, result.steps, result.cost_epochs) == (8, 12, 1.5)
    assert (
        "cost: 12 training steps = 1.5 epochs (3 methods × 2 seeds × 0.2 epochs; one epoch = "
        "8 steps)" in str(result)
    )
    assert str(result).endswith(
        "no better than keeping equal weighting (docs/diagnostics.md, 'Validation')"
    )
    assert result.delta_m["upgrad"] == pytest.approx(by_hand_of(result)["upgrad"])
    # static weights 1, 1 is equal weighting: the same start and data give the same runs
    assert result.metrics["static[weights=1,1]"] == result.metrics["equal"]
    by_hand = by_hand_of(result)
    row = next(r for r in result.rows if r.method == "upgrad")
    assert row.delta_m == pytest.approx(statistics.fmean(by_hand["upgrad"]))
    assert row.delta_m_std == pytest.approx(statistics.stdev(by_hand["upgrad"]))
    d = [u - e for u, e in zip(by_hand["upgrad"], by_hand["equal"])]
    assert (row.paired, row.paired_std) == (
        pytest.approx(statistics.fmean(d)),
        pytest.approx(statistics.stdev(d)),
    )
    assert 0.0 <= row.conflict_fraction <= 1.0 and row.norm_ratio >= 1.0
    assert result.verdict == decide(by_hand).verdict


def test_probe_with_an_evaluation_of_its_own_trains_on_every_batch() -> None:
    batches = make_batches(4)
    x = torch.cat([b[0] for b in batches])

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = model(x)
        return {"spread_a": float(out["a"].std()), "mean_b": float(out["b"].abs().mean())}

    result = tb.probe(
        Net,
        lambda: iter(batches),
        CRITERIA,
        body_of,
        tasks=TASKS,
        evaluate=evaluate,
        higher_is_better=["spread_a"],
        candidates=["pcgrad"],
        seeds=2,
        epochs=1.5,
    )
    # 4 batches an epoch (counted by a pass over the callable's batches): 1.5 epochs is 6
    # steps a run, 2 methods x 2 seeds
    assert (result.epoch_steps, result.steps) == (4, 24)
    assert set(result.metrics["pcgrad"][0]) == {"spread_a", "mean_b"}


def test_shared_may_be_the_shared_module() -> None:
    by_module = run_probe(shared=lambda m: m.body)
    by_parameters = run_probe()
    assert by_module.metrics == by_parameters.metrics


# --- misuse --------------------------------------------------------------------------------


def run_probe(**overrides: object) -> object:
    args: dict[str, object] = {
        "model_fn": Net,
        "data": make_batches(4),
        "loss_fn": CRITERIA,
        "shared": body_of,
        "tasks": TASKS,
        "candidates": ["upgrad"],
        "seeds": 2,
    }
    args.update(overrides)
    return tb.probe(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"candidates": ["upgradd"]}, "unknown method 'upgradd'; did you mean 'upgrad'"),
        ({"candidates": []}, "no candidate method"),
        ({"candidates": ["equal"]}, "equal weighting is always run as the reference"),
        ({"candidates": ["upgrad", "upgrad"]}, "candidate 'upgrad' is given twice"),
        ({"candidates": ["gradnorm"]}, "gradnorm has a gradient step of its own"),
        ({"candidates": ["mgda_ub"]}, "shared representation only"),
        ({"candidates": ["static"]}, r"static needs weights .*'static\[weights=...\]'"),
        ({"epochs": 0}, "a positive number of epochs, got epochs=0"),
        ({"epochs": -0.5}, "a positive number of epochs, got epochs=-0.5"),
        ({"rule": "t"}, "unknown rule 't'"),
        ({"seeds": 1}, "at least 2 seeds, got seeds=1"),
        ({"every": 0}, "every must be a positive number of steps"),
        ({"holdout": 1.0}, "holdout must be between 0 and 1"),
        ({"data": make_batches(1)}, "there are 1: give at least 2 batches"),
        ({"data": iter(make_batches(4))}, "one-shot iterator"),
        ({"shared": lambda m: m.shared_parameters()}, r"shared\(model\) failed \(AttributeError"),
        ({"model_fn": lambda: Net(nn.Identity())}, r"shared\(model\) returned no parameters"),
        ({"higher_is_better": ["acc"]}, r"higher_is_better names \['acc'\]"),
    ],
)
def test_probe_misuse_is_refused_with_the_fix(overrides: dict, message: str) -> None:
    with pytest.raises(BalancerUsageError, match=message):
        run_probe(**overrides)


# --- taskbalance probe on a reference problem ----------------------------------------------


def test_probe_command_prints_the_table_the_verdict_and_the_cost() -> None:
    args = ["probe", "--problem", "penguins", "--size", "small", "--seeds", "2"]
    result = runner.invoke(app, [*args, "--epochs", "2", "--candidates", "upgrad", "--every", "3"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    header = "| method | Δm% ↓ | vs EW, same start | time ×EW | conflict fraction | norm ratio |"
    assert header in text
    assert "| equal | +0.00 ± " in text and "| reference |" in text
    assert "| upgrad | " in text
    verdicts = (NO_DIFFERENCE, "upgrad is better than equal weighting", "keep equal weighting")
    assert any(v in text for v in verdicts)
    # penguins at size small: 9 steps an epoch (see docs/diagnostics.md); 2 x 2 x 2 epochs
    assert (
        "cost: 72 training steps = 8 epochs (2 methods × 2 seeds × 2 epochs; one epoch = 9 steps)"
        " = 1.6 full trainings" in text  # the small penguins train 5 epochs
    )


def test_probe_command_default_budget_is_a_fifth_of_an_epoch() -> None:
    args = ["probe", "--problem", "penguins", "--size", "small", "--candidates", "pcgrad"]
    result = runner.invoke(app, [*args, "--rule", "spread"])
    assert result.exit_code == 0, result.output
    # 9 steps an epoch: 0.2 epochs is round(1.8) = 2 steps a run; 2 methods x 3 seeds
    assert (
        "cost: 12 training steps = 1.33 epochs (2 methods × 3 seeds × 0.2 epochs; one epoch = "
        "9 steps) = 0.267 full trainings" in flat(result.output)
    )
    assert "note: a short budget shows who is ahead early" in flat(result.output)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--candidates", "nope"], "unknown method 'nope'"),
        (["--epochs", "0"], "a positive number of epochs, got epochs=0.0"),
        (["--rule", "sign"], "unknown rule 'sign'"),
        (["--seeds", "1"], "at least 2 seeds"),
    ],
)
def test_probe_command_refuses_misuse_before_training(extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["probe", "--problem", "penguins", "--size", "small", *extra])
    assert result.exit_code == 2
    assert message in flat(result.output)


def test_probe_command_refuses_an_unknown_problem() -> None:
    result = runner.invoke(app, ["probe", "--problem", "penguinz", "--size", "small"])
    assert result.exit_code == 2
    assert "unknown problem 'penguinz'" in flat(result.output)


def test_probe_on_a_toy_counts_steps_and_refuses_a_fraction_of_one() -> None:
    from taskbalance.compare.options import build_problem
    from taskbalance.probe import TOY_FRACTION, probe_problem

    toy = build_problem("toy_cagrad", size="small")
    with pytest.raises(BalancerUsageError, match=r"epochs are steps.*whole number of steps"):
        probe_problem(toy, epochs=2.5, seeds=2, candidates=["upgrad"])
    result = probe_problem(toy, seeds=2, candidates=["upgrad"])
    steps = max(1, round(TOY_FRACTION * toy.default_epochs))
    # a toy "epoch" is one step; each run is one start's trajectory of `steps` steps
    assert (result.epochs, result.epoch_steps, result.steps) == (steps, 1, 2 * 2 * steps)
    assert result.training_steps == toy.default_epochs
    assert result.cost_line() == (
        f"cost: {4 * steps} training steps from each start (2 methods × 2 seeds × {steps} steps) "
        f"= {4 * steps / toy.default_epochs:.3g} full trainings"
    )
