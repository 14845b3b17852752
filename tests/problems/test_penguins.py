"""Penguins: species, sex and body mass from the palmerpenguins measurements."""

from __future__ import annotations

import math

import pytest
import torch

import taskbalance as tb
from taskbalance.compare.problem import make_problem
from taskbalance.problems import penguins as pg
from taskbalance.problems._supervised import MIN_KPI, SupervisedTask, task_kpi, task_metrics

pytest.importorskip("palmerpenguins")


def test_table_has_no_missing_values() -> None:
    table = pg.load_penguin_table()
    assert len(table) == 333  # 344 birds, 11 with a missing value
    assert not table.isna().any().any()
    assert list(table.index) == list(range(333))


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    table = pg.load_penguin_table()
    train, test = pg.split_rows(table, 0)
    again_train, again_test = pg.split_rows(table, 0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(333))
    held_out = table.iloc[test.numpy()]
    for species in pg.SPECIES:
        for sex in pg.SEXES:
            n_group = int(((table.species == species) & (table.sex == sex)).sum())
            n_test = int(((held_out.species == species) & (held_out.sex == sex)).sum())
            assert n_test == round(0.2 * n_group)
    other_train, _ = pg.split_rows(table, 1)
    assert not torch.equal(train, other_train)


def test_features_and_targets_use_training_statistics_only() -> None:
    table = pg.load_penguin_table()
    data = pg.make_penguins(0)
    assert data.x_train.shape == (len(data.train_rows), 6)
    assert data.x_test.shape == (len(data.test_rows), 6)
    for x in (data.x_train, data.x_test):
        assert torch.isfinite(x).all()
    train = table.iloc[data.train_rows.numpy()]
    for c in ("bill_length_mm", "flipper_length_mm", "body_mass_g"):
        assert data.mean[c] == pytest.approx(float(train[c].mean()))
        assert data.mean[c] != pytest.approx(float(table[c].mean()), rel=1e-6)
    # standardised training columns: mean 0, population std 1
    numeric = data.x_train[:, :3].double()
    assert numeric.mean(0).abs().max() < 1e-5
    assert numeric.std(0, unbiased=False).sub(1).abs().max() < 1e-5
    # one test bird by hand
    row = table.iloc[int(data.test_rows[0])]
    bill = (row.bill_length_mm - data.mean["bill_length_mm"]) / data.std["bill_length_mm"]
    assert float(data.x_test[0, 0]) == pytest.approx(bill, rel=1e-5)
    island = [row.island == name for name in pg.ISLANDS]
    assert data.x_test[0, 3:].tolist() == [float(v) for v in island]
    assert data.y_test["species"][0] == pg.SPECIES.index(row.species)
    assert data.y_test["sex"][0] == pg.SEXES.index(row.sex)
    grams = data.y_test["body_mass"][0] * data.std["body_mass_g"] + data.mean["body_mass_g"]
    assert float(grams) == pytest.approx(row.body_mass_g, rel=1e-5)
    assert data.scales == {"body_mass": data.std["body_mass_g"]}
    # every island is one-hot
    assert torch.equal(data.x_train[:, 3:].sum(1), torch.ones(len(data.x_train)))


def test_data_do_not_depend_on_the_training_seed_only_on_data_seed() -> None:
    a, b, c = pg.make_penguins(0), pg.make_penguins(0), pg.make_penguins(2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test["sex"], b.y_test["sex"])
    assert not torch.equal(a.train_rows, c.train_rows)


def test_regression_kpi_and_mae_in_grams() -> None:
    task = SupervisedTask("body_mass", "regression", unit="g")
    out = torch.tensor([[0.0], [1.0], [3.0]])
    target = torch.tensor([1.0, 1.0, 1.0])
    # MAE on the standardised target = (1 + 0 + 2) / 3 = 1
    assert task_kpi(task, out, target) == pytest.approx(math.exp(-1.0))
    assert task_kpi(task, out + 100.0, target) == MIN_KPI
    assert task_kpi(task, target.unsqueeze(1), target) == 1.0
    metrics = task_metrics(task, out, target, scale=800.0)
    assert metrics["body_mass_mae"] == pytest.approx(800.0)
    assert metrics["body_mass_loss"] == pytest.approx((1 + 0 + 4) / 3)


def test_problem_is_registered() -> None:
    problem = make_problem("penguins", size="small")
    assert isinstance(problem, pg.Penguins)
    assert problem.tasks == ("species", "sex", "body_mass")
    metrics = {m.name: m for m in problem.metrics}
    assert metrics["species_acc"].higher_is_better and metrics["sex_acc"].higher_is_better
    assert not metrics["body_mass_mae"].higher_is_better
    assert not metrics["body_mass_loss"].in_delta_m
    assert problem.default_epochs == 5


@pytest.mark.parametrize("method", ["equal", "mgda", "dtp", "uncertainty"])
def test_small_run(method: str) -> None:
    problem = make_problem("penguins", size="small")
    result = problem.run(lambda: tb.make(method, problem.tasks), seed=1, epochs=3)
    n_train = len(problem.data().x_train)
    steps_per_epoch = -(-n_train // 32)
    assert result.steps == 3 * steps_per_epoch
    assert len(result.histories["main"]) == result.steps
    assert set(result.metrics) == {m.name for m in problem.metrics}
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert 0 < result.metrics["body_mass_mae"] < 2000  # grams; the masses span ~2700-6300
    assert {t: len(v) for t, v in result.epoch_losses.items()} == dict.fromkeys(problem.tasks, 3)


@pytest.mark.slow
def test_full_run_learns_every_task() -> None:
    problem = make_problem("penguins", size="full")
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=50)
    assert result.metrics["species_acc"] > 0.95
    assert result.metrics["sex_acc"] > 0.8
    # predicting the training mean mass is ~650 g off on average
    assert result.metrics["body_mass_mae"] < 350
