"""GradNorm (Chen et al., ICML 2018, §4) synthetic problem."""

from __future__ import annotations

import pytest
import torch
from rich.table import Table

from taskbalance.problems.gradnorm_synthetic import (
    SIGMAS_2,
    SIGMAS_10,
    Config,
    ToyNet,
    format_table,
    make_data,
    plot,
    run_gradnorm_synthetic,
    spearman,
)


def test_data_shapes_determinism_and_sigma_scaling() -> None:
    x, y = make_data(2000, SIGMAS_10, seed=0)
    assert x.shape == (2000, 250) and y.shape == (2000, 10, 100)
    assert x.abs().max() <= 1.0 and 0.3 < x.var() < 0.37  # U(-1, 1): variance 1/3
    assert torch.equal(make_data(50, SIGMAS_10, seed=0)[1], make_data(50, SIGMAS_10, seed=0)[1])
    assert not torch.equal(make_data(50, SIGMAS_10, 0)[1], make_data(50, SIGMAS_10, 1)[1])
    assert not torch.equal(make_data(50, SIGMAS_10, 0, 1)[0], make_data(50, SIGMAS_10, 0, 2)[0])
    sigma = torch.tensor(SIGMAS_10)
    rms = y.pow(2).mean(dim=(0, 2)).sqrt()
    assert (y.abs().amax(dim=(0, 2)) <= sigma).all()
    # (B + eps) x has std ~97: tanh saturates, so every task's RMS is close to sigma_i
    assert torch.allclose(rms / sigma, torch.full((10,), 0.99), atol=0.02)
    # shared B (corr of the arguments ~0.89) plus task-specific eps: related, not equal
    unit = (y / sigma[:, None]).transpose(0, 1).reshape(10, -1)
    corr = torch.corrcoef(unit)[~torch.eye(10, dtype=torch.bool)]
    assert corr.min() > 0.5 and corr.max() < 0.9
    _, y_unit = make_data(2000, SIGMAS_10, seed=0, unit_norm=True)
    assert (y_unit.pow(2).mean(dim=(0, 2)).sqrt() / sigma).max() < 0.97  # less saturated


def test_model_shape_and_last_shared_layer() -> None:
    net = ToyNet(3)
    out = net(torch.zeros(4, 250))
    assert len(out) == 3 and all(o.shape == (4, 100) for o in out)
    assert net.last_shared.shape == (100, 100)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.trunk) == 4


def test_spearman() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -(a**3)) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_smoke_run_is_finite_deterministic_and_plots(tmp_path) -> None:
    config = Config(steps=30, eval_every=10, n_train=500, n_eval=200)
    methods = ("equal", "gradnorm", "uncertainty")
    res = run_gradnorm_synthetic(SIGMAS_2, (0,), methods, config, workers=1)
    assert res.steps.tolist() == [0, 10, 20, 30]
    for m in methods:
        assert res.ratios[m].shape == res.weights[m].shape == (1, 4, 2)
        assert torch.isfinite(res.ratios[m]).all()
        assert torch.equal(res.ratios[m][:, 0], torch.ones(1, 2))
    assert res.ratios["equal"][0, -1].sum() < 2.0  # something was learned
    assert torch.equal(res.weights["equal"], torch.ones(1, 4, 2))
    w = res.weights["gradnorm"][0]
    assert torch.allclose(w.sum(-1), torch.full((4,), 2.0, dtype=w.dtype))
    assert w[-1, 0] > 1.0 > w[-1, 1]  # the larger gradient (sigma = 100) loses weight
    again = run_gradnorm_synthetic(SIGMAS_2, (0,), methods, config, workers=1)
    assert all(torch.equal(res.ratios[m], again.ratios[m]) for m in methods)
    table = format_table(res)
    assert isinstance(table, Table) and table.row_count == 3 + 2
    png = plot(res, tmp_path / "fig" / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown methods"):
        run_gradnorm_synthetic(SIGMAS_2, 1, ("nope",), config)


def test_result_does_not_depend_on_workers() -> None:
    config = Config(steps=6, eval_every=3, n_train=300, n_eval=100)
    one = run_gradnorm_synthetic(SIGMAS_2, 2, ("equal", "gradnorm"), config, workers=1)
    two = run_gradnorm_synthetic(SIGMAS_2, 2, ("equal", "gradnorm"), config, workers=2)
    assert one.seeds == two.seeds == (0, 1)
    for m in ("equal", "gradnorm"):
        assert torch.equal(one.ratios[m], two.ratios[m])
        assert torch.equal(one.weights[m], two.weights[m])


@pytest.mark.slow
def test_default_run_reproduces_the_papers_claims() -> None:
    """Fig. 2 (T = 10): GradNorm ends below equal weighting on Σ L_i/L_i(0), and its weights
    order inversely to σ_i (roughly ∝ 1/σ_i). ~3 min on 2 free cores."""
    res = run_gradnorm_synthetic()
    equal, gradnorm = res.metric("equal")[:, -1], res.metric("gradnorm")[:, -1]
    assert len(res.seeds) >= 3
    assert gradnorm.mean() < equal.mean()
    assert (gradnorm < equal).all(), f"not on every seed: {gradnorm} vs {equal}"
    sigma = torch.tensor(res.sigmas, dtype=torch.float64)
    for w in res.weights["gradnorm"][:, -1]:
        assert spearman(w, sigma) <= -0.9
    w = res.final_weights()
    assert w[sigma.argmin()] > 1.0 > w[sigma.argmax()]
    product = w * sigma  # constant if w ∝ 1/σ: allow a factor 2 around the geometric mean
    assert (product / product.log().mean().exp()).log().abs().max() < torch.log(torch.tensor(2.0))
