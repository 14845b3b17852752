"""Census-Income: labels, inputs and splits (on the real files, fetched from the registry),
and the pure helpers (on small arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance.problems.census_income import (
    COLLEGE,
    CONTINUOUS,
    GROUPS,
    CensusIncome,
    input_columns,
    label_correlation,
    split_test,
    task_labels,
    train_rows,
)
from taskbalance.problems.mmoe_census import PAPER_CORRELATION


def test_split_test_is_disjoint_complete_and_seed_stable() -> None:
    val, test = split_test(11, data_seed=3)
    assert len(val) == 6 and len(test) == 5
    assert not set(val) & set(test)
    assert sorted([*val, *test]) == list(range(11))
    again = split_test(11, data_seed=3)
    assert np.array_equal(again[0], val) and np.array_equal(again[1], test)
    other = split_test(11, data_seed=4)
    assert not np.array_equal(other[0], val)


def test_train_rows_subsample() -> None:
    assert np.array_equal(train_rows(10, None, 0), np.arange(10))
    assert np.array_equal(train_rows(10, 50, 0), np.arange(10))
    rows = train_rows(100, 30, 0)
    assert len(rows) == 30 and len(set(rows)) == 30 and list(rows) == sorted(rows)
    assert np.array_equal(rows, train_rows(100, 30, 0))
    assert not np.array_equal(rows, train_rows(100, 30, 1))


def test_label_correlation_by_hand() -> None:
    a = np.array([1, 1, 0, 0], dtype=np.float32)
    assert label_correlation(a, a) == pytest.approx(1.0)
    assert label_correlation(a, 1 - a) == pytest.approx(1.0)  # absolute value
    # a = (1,1,0,0), b = (1,0,1,0): independent by construction
    assert label_correlation(a, np.array([1, 0, 1, 0])) == pytest.approx(0.0)


def test_input_columns_leave_out_labels_and_the_weight() -> None:
    columns = input_columns()
    assert len(columns) == 38
    for left_out in ("education", "marital_stat", "income", "instance_weight"):
        assert left_out not in columns
    assert set(CONTINUOUS) <= set(columns)


def test_bad_group_and_model_are_refused() -> None:
    with pytest.raises(ValueError, match="group must be 1"):
        CensusIncome(group=3)
    with pytest.raises(ValueError, match="shared_bottom, omoe, mmoe"):
        CensusIncome(model="moe")  # type: ignore[arg-type]


# ------------------------------------------------------------------ on the real files
def _all_rows(census, task: str) -> np.ndarray:
    return np.concatenate([task_labels(p, census, task) for p in (census.train, census.test)])


@pytest.mark.registry
def test_label_definitions_and_rates(census_income) -> None:
    income = task_labels(census_income.train, census_income, "income")
    decoded = census_income.decode("train", "income")
    assert np.array_equal(income == 1, decoded == "50000+.")
    # rates measured on the 199,523 training rows: 6.21 % above 50K, 43.3 % never married
    assert income.mean() == pytest.approx(0.0621, abs=0.001)
    marital = task_labels(census_income.train, census_income, "marital")
    assert np.array_equal(
        marital == 1, census_income.decode("train", "marital_stat") == "Never married"
    )
    education = task_labels(census_income.train, census_income, "education")
    names = census_income.decode("train", "education")
    assert np.array_equal(education == 1, np.isin(names, COLLEGE))
    assert set(COLLEGE) <= set(census_income.categories["education"])


@pytest.mark.registry
@pytest.mark.parametrize("group", [1, 2])
def test_label_correlation_matches_the_paper(census_income, group: int) -> None:
    """The paper's |Pearson r| of each group's labels (over 10,000 random rows, sampling
    spread about 0.009): 0.1768 and 0.2373. Bachelor's-and-up alone as "college" gives
    0.197 for group 2, and fails this test."""
    a, b = (_all_rows(census_income, t) for t in GROUPS[group])
    assert label_correlation(a, b) == pytest.approx(PAPER_CORRELATION[group], abs=0.005)


def _positions(census) -> tuple[list[int], list[tuple[int, int]]]:
    """Input positions of the continuous columns, and the (start, end) span of each nominal
    column's one-hot block, in input order."""
    continuous, nominal, at = [], [], 0
    for column in input_columns():
        if column in CONTINUOUS:
            continuous.append(at)
            at += 1
        else:
            width = len(census.categories[column])
            nominal.append((at, at + width))
            at += width
    return continuous, nominal


@pytest.mark.registry
def test_inputs_splits_and_standardisation(census_income) -> None:
    problem = CensusIncome(size="small", group=2)
    data = problem.data()
    continuous, nominal = _positions(census_income)
    assert data.x_train.shape == (4_000, nominal[-1][1])
    assert len(data.x_val) == 2_000 and len(data.x_test) == 2_000
    assert set(data.y_train) == {"education", "marital"}
    # each nominal column: exactly one 1 per row in its block
    for start, end in nominal:
        block = data.x_train[:, start:end]
        assert torch.equal(block.sum(1), torch.ones(len(block)))
    # continuous columns standardised with the training rows' statistics
    block = data.x_train[:, continuous]
    assert torch.allclose(block.mean(0), torch.zeros(len(CONTINUOUS)), atol=1e-4)
    assert torch.allclose(block.std(0, unbiased=False), torch.ones(len(CONTINUOUS)), atol=1e-3)
    # the labels are those of the chosen rows of each file
    rows = train_rows(census_income.n_train, 4_000, 0)
    expected = task_labels(census_income.train, census_income, "education")[rows]
    assert np.array_equal(data.y_train["education"].numpy(), expected)
    val, test = split_test(census_income.n_test, 0)
    expected = task_labels(census_income.test, census_income, "marital")[val[:2_000]]
    assert np.array_equal(data.y_val["marital"].numpy(), expected)
    assert len(val) + len(test) == census_income.n_test and not set(val) & set(test)


@pytest.mark.registry
def test_a_short_run_learns_both_tasks(census_income) -> None:
    problem = CensusIncome(size="small")
    result = problem.run(lambda: tb.make("equal", problem.tasks), seed=0, epochs=2)
    assert result.metrics["income_auc"] > 0.8
    assert result.metrics["marital_auc"] > 0.9
    assert set(result.extras["validation"]) == set(result.metrics)
