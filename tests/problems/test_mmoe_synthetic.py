"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018): generator and runner."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console

from taskbalance.problems import mmoe_synthetic as ms


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_task_weights_have_cosine_exactly_p(p: float) -> None:
    w1, w2 = ms.task_weights(p, seed=4, c=2.5)
    assert w1.dtype == torch.float64 and w1.shape == (100,)
    assert float(w1.norm()) == pytest.approx(2.5, abs=1e-12)
    assert float(w2.norm()) == pytest.approx(2.5, abs=1e-12)
    cosine = float(w1 @ w2 / (w1.norm() * w2.norm()))
    assert cosine == pytest.approx(p, abs=1e-12)


def test_task_weights_depend_on_the_seed_only() -> None:
    a1, _ = ms.task_weights(0.5, seed=1)
    b1, _ = ms.task_weights(0.9, seed=1)
    c1, _ = ms.task_weights(0.5, seed=2)
    assert torch.equal(a1, b1) and not torch.equal(a1, c1)
    with pytest.raises(ValueError, match="p must lie"):
        ms.task_weights(1.5)


def test_labels_follow_the_formula() -> None:
    x, y = ms.make_data(0.9, 2000, seed=3)
    assert x.shape == (2000, 100) and y.shape == (2000, 2)
    k = ms.AUTHORS
    assert (k.c, len(k.alphas), k.alphas[:3], k.betas[:4]) == (1.0, 10, (1, 2, 3), (0, 1, 4, 9))
    for w, target in zip(ms.task_weights(0.9, seed=3), y.T):
        z = x.double() @ w
        clean = z + sum(torch.sin(a * z + b) for a, b in zip(k.alphas, k.betas))
        residual = target.double() - clean
        assert float(residual.std()) == pytest.approx(0.01, rel=0.1)  # the noise
    x2, y2 = ms.make_data(0.9, 2000, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, ms.make_data(0.9, 2000, seed=4)[1])


@pytest.mark.parametrize(
    ("p", "constants"),
    [(1.0, ms.AUTHORS), (0.9, ms.AUTHORS), (0.5, ms.AUTHORS), (0.5, ms.keras_constants(1))],
    ids=["authors-1.0", "authors-0.9", "authors-0.5", "keras-0.5"],
)
def test_exact_label_correlation_matches_the_data(p: float, constants: ms.Constants) -> None:
    _, y = ms.make_data(p, 20_000, seed=0, constants=constants)
    empirical = float(torch.corrcoef(y.T.double())[0, 1])  # standard error below 0.007
    assert ms.label_correlation(p, constants) == pytest.approx(empirical, abs=0.025)
    assert float(y[:, 0].double().var()) == pytest.approx(ms.label_variance(constants), rel=0.05)


def test_documented_label_correlations() -> None:
    got = [round(ms.label_correlation(p), 3) for p in (1.0, 0.9, 0.5)]
    assert got == [1.0, 0.458, 0.218]
    assert ms.label_variance() == pytest.approx(7.057, abs=1e-3)
    keras = ms.keras_constants(0)
    assert keras.c == 0.3 and len(keras.alphas) == len(keras.betas) == 5
    assert round(ms.label_correlation(0.5, keras), 3) == 0.466


def test_models_follow_the_paper() -> None:
    sizes = {m: sum(p.numel() for p in ms.build_model(m).parameters()) for m in ms.MODELS}
    # 113 shared units were chosen to match the MoE models' size
    assert sizes["shared_bottom"] == 101 * 113 + 2 * (114 * 8 + 9)
    assert abs(sizes["shared_bottom"] / sizes["mmoe"] - 1) < 0.15
    mmoe = ms.build_model("mmoe")
    assert mmoe.experts.weights[0].shape == (8, 100, 16)
    with pytest.raises(ValueError, match="unknown model"):
        ms.build_model("cgc")


def test_short_run_table_and_plot(tmp_path) -> None:
    config = ms.Config(steps=30, batch_size=64, n_train=512, n_test=256)
    threads = torch.get_num_threads()
    res = ms.run_mmoe_synthetic((1.0, 0.5), seeds=2, config=config, workers=1, progress=False)
    assert torch.get_num_threads() == threads
    assert len(res.runs) == 2 * 2 * 3
    assert {(r.p, r.model, r.seed) for r in res.runs} == {
        (p, m, s) for p in (1.0, 0.5) for m in ms.MODELS for s in (0, 1)
    }
    assert all(math.isfinite(r.test_loss) and set(r.test_mse) == set(ms.TASKS) for r in res.runs)
    mean, std = res.summary()[(0.5, "mmoe")]
    values = res.losses(0.5, "mmoe")
    assert mean == pytest.approx(sum(values) / 2) and std == pytest.approx(
        abs(values[0] - values[1]) / math.sqrt(2)
    )
    assert ms.gap(res, 0.5) == pytest.approx(res.summary()[(0.5, "shared_bottom")][0] - mean)
    loss = {(r.model, r.seed): r.test_loss for r in res.runs if r.p == 0.5}
    gaps = ms.seed_gaps(res, 0.5)
    assert gaps == [loss[("shared_bottom", s)] - loss[("mmoe", s)] for s in (0, 1)]
    assert ms.seed_gaps(res, 0.5, baseline="omoe") == [
        loss[("omoe", s)] - loss[("mmoe", s)] for s in (0, 1)
    ]
    again = ms.train_one(0.5, "mmoe", 1, config)
    assert again.test_mse == next(
        r.test_mse for r in res.runs if (r.p, r.model, r.seed) == (0.5, "mmoe", 1)
    )
    console = Console(record=True, width=150)
    console.print(ms.results_table(res))
    text = console.export_text()
    assert "0.218" in text and "shared_bottom − mmoe" in text and "±" in text
    png = ms.plot_results(res, tmp_path / "mmoe.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown model"):
        ms.run_mmoe_synthetic(models=("ple",), progress=False)


@pytest.mark.slow
def test_small_run_mmoe_beats_shared_bottom_when_tasks_differ() -> None:
    """The README's claim in CI: at p = 0.5 (label correlation 0.218), seeds 0-2 (those of
    the paper run), ``SMALL`` (3,000 Adam steps of 256 points, else the defaults), MMoE's
    mean test loss is below shared-bottom's and MMoE is better on at least two of the
    three seeds. Measured: shared-bottom 0.940, 0.660, 0.541; MMoE 0.664, 0.566, 0.391
    (gaps +0.276, +0.094, +0.149). Broken MMoEs fail it: gates forced uniform 1.020,
    0.837, 1.007; experts collapsed into one 0.997, 0.765, 0.816; both towers reading one
    gate 0.784, 0.738, 0.661 (mean gap -0.014, one seed of three). ~25 s on one core.
    """
    res = ms.run_mmoe_synthetic(
        (0.5,),
        seeds=3,
        models=("shared_bottom", "mmoe"),
        config=ms.SMALL,
        workers=1,
        progress=False,
    )
    assert (ms.SMALL.steps, ms.SMALL.batch_size, ms.SMALL.n_train) == (3000, 256, 100_000)
    gaps = ms.seed_gaps(res, 0.5)
    report = f"per-seed gaps {gaps}; losses {[(r.model, r.seed, r.test_loss) for r in res.runs]}"
    assert ms.gap(res, 0.5) > 0, report
    assert sum(g > 0 for g in gaps) >= 2, report


@pytest.fixture(scope="module")
def paper_run() -> ms.MMoESyntheticResults:
    """The full default experiment: p in (1, 0.9, 0.5) x seeds 0-2 x the three models."""
    return ms.run_mmoe_synthetic(progress=False)


@pytest.mark.slow
@pytest.mark.reproduction
@pytest.mark.xdist_group("mmoe_paper_run")
def test_mmoe_beats_shared_bottom_when_tasks_differ(paper_run: ms.MMoESyntheticResults) -> None:
    # measured (AUTHORS constants, 3 seeds): shared_bottom 0.357 ± 0.044, mmoe 0.298 ± 0.058
    assert len(paper_run.runs) == 27
    assert ms.gap(paper_run, 0.5) > 0, ms.results_table(paper_run)


@pytest.mark.slow
@pytest.mark.reproduction
@pytest.mark.xdist_group("mmoe_paper_run")
def test_onegate_moe_degrades_more_than_mmoe(paper_run: ms.MMoESyntheticResults) -> None:
    # the paper's Fig. 4: OMoE loses ground as p falls, MMoE barely moves
    s = paper_run.summary()
    omoe = s[(0.5, "omoe")][0] - s[(1.0, "omoe")][0]
    mmoe = s[(0.5, "mmoe")][0] - s[(1.0, "mmoe")][0]
    assert omoe > mmoe, (omoe, mmoe)


@pytest.mark.slow
@pytest.mark.reproduction
@pytest.mark.xdist_group("mmoe_paper_run")
@pytest.mark.xfail(
    strict=True,
    reason="not reproduced with the AUTHORS constants, 4,000 steps, 3 seeds: the gap "
    "shared_bottom - mmoe is +0.059 at p = 0.5 and +0.082 at p = 1.0 (per seed at p = 1: "
    "+0.112, +0.160, -0.026; at p = 0.5: +0.021, +0.085, +0.071); shared-bottom barely "
    "degrades as p falls (0.343, 0.337, 0.357 at p = 1, 0.9, 0.5)",
)
def test_mmoe_advantage_grows_as_correlation_falls(paper_run: ms.MMoESyntheticResults) -> None:
    assert ms.gap(paper_run, 0.5) > ms.gap(paper_run, 1.0), ms.results_table(paper_run)
