"""Kendall et al. (CVPR 2018) uncertainty toy."""

from __future__ import annotations

import pytest
import torch

from taskbalance.problems import KendallNet, make_data, plot_sigma, run_kendall
from taskbalance.problems.kendall import ShuffledBatches


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


@pytest.mark.slow
def test_default_recipe_recovers_the_noise_levels() -> None:
    res = run_kendall()
    assert 7.0 <= res.sigma[0] <= 13.0
    assert 0.7 <= res.sigma[1] <= 1.3
