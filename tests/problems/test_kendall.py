"""Kendall et al. (CVPR 2018) uncertainty toy."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from taskbalance.cli import app
from taskbalance.problems import KendallNet, make_data, plot_sigma, run_kendall
from taskbalance.problems.kendall import (
    PUBLISHED_SIGMA,
    SEED_STD,
    ShuffledBatches,
    claims,
    mean_tolerance,
    run_kendall_seeds,
)


def test_data_follows_the_recipe() -> None:
    x, y1, y2 = make_data(n=20_000, seed=3)
    assert x.shape == y1.shape == y2.shape == (20_000, 1)
    design = torch.cat([x, torch.ones_like(x)], dim=1).double()
    for y, slope, intercept, noise in ((y1, 2.0, 8.0, 10.0), (y2, 3.0, 3.0, 1.0)):
        coef = torch.linalg.lstsq(design, y.double()).solution.flatten()
        resid = y.double() - design @ coef.unsqueeze(1)
        assert coef[0].item() == pytest.approx(slope, abs=5 * noise / 20_000**0.5)
        assert coef[1].item() == pytest.approx(intercept, abs=5 * noise / 20_000**0.5)
        assert resid.std().item() == pytest.approx(noise, rel=0.03)
    assert torch.equal(make_data(seed=3)[1], make_data(seed=3)[1])
    assert not torch.equal(make_data(seed=3)[1], make_data(seed=4)[1])


def test_model_shape() -> None:
    model = KendallNet()
    assert model.body[0].out_features == 1024
    out = model(torch.zeros(5, 1))
    assert set(out) == {"y1", "y2"}
    assert out["y1"].shape == out["y2"].shape == (5, 1)


def test_batches_cover_every_point_once_and_reshuffle() -> None:
    x = torch.arange(10.0).unsqueeze(1)
    data = ShuffledBatches(x, {"y1": x * 2}, batch_size=4, seed=0)
    assert len(data) == 3
    passes = []
    for _ in range(2):
        got = list(data)
        assert [len(b[0]) for b in got] == [4, 4, 2]
        xs = torch.cat([b[0] for b in got]).flatten()
        assert sorted(xs.tolist()) == list(range(10))
        assert all(torch.equal(b[1]["y1"], b[0] * 2) for b in got)
        passes.append(xs)
    assert not torch.equal(passes[0], passes[1])


def test_few_epochs_outputs(tmp_path) -> None:
    threads = torch.get_num_threads()
    res = run_kendall(epochs=5, seed=1)
    assert torch.get_num_threads() == threads
    assert res.sigma_history.shape == (5, 2)
    assert list(res.sigma_history[-1]) == pytest.approx(list(res.sigma))
    assert len(res.history) == 25  # 100 points / batch 20 = 5 steps per epoch
    assert res.history.extra("sigma").shape == (25, 2)
    assert {t: len(v) for t, v in res.epoch_losses.items()} == {"y1": 5, "y2": 5}
    # the y1 loss (noise 10) is far above 1, so its log-variance must have grown
    assert res.sigma[0] > 1.0
    assert res.sigma_history[0, 0] < res.sigma_history[-1, 0]
    again = run_kendall(epochs=5, seed=1)
    assert again.sigma == res.sigma
    png = plot_sigma(res, tmp_path / "fig" / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_side_by_side_are_the_single_runs() -> None:
    """run_kendall_seeds trains each seed as run_kendall(seed=s) does: same data, initial
    weights, batch order and updates (up to float rounding)."""
    threads = torch.get_num_threads()
    both = run_kendall_seeds([3, 0], epochs=10)
    assert torch.get_num_threads() == threads
    assert both.seeds == (3, 0) and both.sigma.shape == (2, 2) and both.epochs == 10
    for row, seed in enumerate((3, 0)):
        alone = run_kendall(epochs=10, seed=seed)
        assert both.sigma[row].tolist() == pytest.approx(list(alone.sigma), rel=1e-5, abs=0)
    # ten epochs (50 steps) moved sigma well away from its start (1, 1), and the seeds differ
    assert (both.sigma[:, 0] > 1.02).all()
    assert both.sigma[0, 1].item() != pytest.approx(both.sigma[1, 1].item(), rel=1e-4)
    assert both.mean == pytest.approx(tuple(both.sigma.mean(0).tolist()))
    assert both.std == pytest.approx(tuple(both.sigma.std(0).tolist()))
    assert run_kendall_seeds([5], epochs=1).std == (0.0, 0.0)


@pytest.mark.parametrize(
    ("seeds", "epochs", "match"),
    [
        ([], 1, r"seeds must be one or more distinct integers such as range\(10\), got \[\]"),
        ([1, 2, 1], 1, r"distinct integers such as range\(10\), got \[1, 2, 1\]"),
        ([0], -1, "epochs must be non-negative, got -1"),
    ],
)
def test_seeds_run_refuses_bad_arguments(seeds: list[int], epochs: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_kendall_seeds(seeds, epochs=epochs)


def test_mean_tolerance_is_three_standard_errors() -> None:
    # SEED_STD (0.33, 0.083), measured over seeds 0-19: 3 * 0.33 / sqrt(10) / 8.59 = 3.64%
    assert SEED_STD == (0.33, 0.083)
    assert mean_tolerance(10) == pytest.approx((0.03645, 0.08558), abs=1e-4)
    assert mean_tolerance(1) == pytest.approx((0.99 / 8.59, 0.249 / 0.92))
    assert mean_tolerance(40) == pytest.approx(tuple(t / 2 for t in mean_tolerance(10)))
    with pytest.raises(ValueError, match="n_seeds must be at least 1"):
        mean_tolerance(0)


@pytest.mark.slow
def test_mean_sigma_over_ten_seeds_matches_the_published_run() -> None:
    """The mean learned sigma over seeds 0-9 (full recipe, 2000 epochs) is within three
    standard errors of the published (8.59, 0.92): 3 * SEED_STD / sqrt(10), i.e. 3.6% (y1)
    and 8.6% (y2), SEED_STD (0.33, 0.083) being one run's standard deviation over seeds
    0-19. Measured: (8.48, 0.947), -1.3% and +2.9%. A regulariser scaled by 0.8 gives
    (8.96, 1.060), +4.3% and +15.2%, and by 0.7 (9.21, 1.134), +7.2% and +23.3%: both
    fail (``src/taskbalance/problems/kendall.py`` has the table). ~15 s on one core.
    """
    res = run_kendall_seeds(range(10))
    offsets = [m / p - 1 for m, p in zip(res.mean, PUBLISHED_SIGMA)]
    report = f"mean sigma {res.mean}, offsets {offsets}, per seed {res.sigma.tolist()}"
    for offset, tolerance in zip(offsets, mean_tolerance(10)):
        assert abs(offset) <= tolerance, report
    # the tolerance holds only if the spread is the measured one (a 10-run sample standard
    # deviation falls within 0.5-2 times the true one with probability > 0.99)
    for std, measured in zip(res.std, SEED_STD):
        assert 0.5 * measured <= std <= 2.0 * measured, report
    # seed 0 is `make demo`'s run: both of its printed claims reproduced
    assert [c.reproduced for c in claims(res.sigma[0].tolist())] == [True, True], report


def test_claims_on_the_published_and_the_true_values() -> None:
    on_published, on_true = claims((8.59, 0.92)), claims((10.0, 1.0))
    assert [c.reproduced for c in on_published] == [True, True]
    assert [c.reproduced for c in on_true] == [True, True]  # 10/8.59 = +16%, 1/0.92 = +9%
    assert on_published[1].offsets == (0.0, 0.0)
    assert on_true[1].offsets == pytest.approx((10 / 8.59 - 1, 1 / 0.92 - 1))


def test_claims_far_off_are_not_reproduced() -> None:
    noise, published = claims((1.0, 1.0))  # sigma1 never grew: 90% and 88% short
    assert not noise.reproduced and not published.reproduced
    assert "NOT reproduced" in noise.line() and "NOT reproduced" in published.line()
    assert "-90.0%" in noise.line() and "+0.0%" in noise.line()
    noise, published = claims((9.0, 3.0))  # y2's sigma three times its noise
    assert not noise.reproduced and not published.reproduced


def test_claims_tolerances_are_the_documented_ones() -> None:
    """30% of the true noise (10, 1), 20% of the published run (8.59, 0.92)."""
    # y1: 7.1 is -29% of 10 and -17.3% of 8.59; 6.9 is -31% and -19.7%
    assert [c.reproduced for c in claims((7.1, 1.0))] == [True, True]
    assert [c.reproduced for c in claims((6.9, 1.0))] == [False, True]
    # y2: 1.29 is +29% of 1 and +40% of 0.92; 0.72 is -28% and -21.7%; 0.74: -26%, -19.6%
    assert [c.reproduced for c in claims((10.0, 1.29))] == [True, False]
    assert [c.reproduced for c in claims((10.0, 0.72))] == [True, False]
    assert [c.reproduced for c in claims((10.0, 0.74))] == [True, True]
    assert claims((6.9, 1.0), true_tolerance=0.32)[0].reproduced
    line = claims((8.0, 1.0))[0].line()
    assert "within 30% of it" in line and "here -20.0%, +0.0%" in line
    assert ": reproduced (rule" in line and "NOT" not in line


@pytest.mark.parametrize(
    "sigma", [(8.0,), (8.0, 1.0, 1.0), (8.0, 0.0), (-8.0, 1.0), (float("nan"), 1.0)]
)
def test_claims_refuse_what_is_not_two_positive_sigmas(sigma: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"2 finite positive numbers \(y1, y2\).*KendallResult"):
        claims(sigma)


def test_claims_refuse_a_non_positive_tolerance() -> None:
    with pytest.raises(ValueError, match="tolerances must be positive fractions"):
        claims((8.0, 1.0), published_tolerance=0.0)


def test_demo_prints_a_verdict_per_claim(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "kendall", "--epochs", "2", "--out", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("paper's claim")]
    assert len(lines) == 2
    # two epochs leave sigma1 near 1, far from 10 and from 8.59
    assert "'sigma learns each task's noise (10, 1)': NOT reproduced here" in lines[0]
    assert "'sigma matches the published run (8.59, 0.92)': NOT reproduced here" in lines[1]
    assert "the paper's 2000" in result.output
