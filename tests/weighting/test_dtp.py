"""Dynamic Task Prioritization (Guo et al., ECCV 2018), task-level weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import const, save_load


def focal(kpi: float, gamma: float) -> float:
    return -((1.0 - kpi) ** gamma) * math.log(kpi)


def test_hand_computed_single_kpi() -> None:
    bal = tb.DTP(["a"], gamma=1.0)
    total = bal(const(2.0), kpi=[0.5])
    expected = -0.5 * math.log(0.5)
    assert bal.last_weights.item() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(2.0 * expected, rel=1e-6)


def test_hand_computed_two_tasks_per_task_gamma() -> None:
    bal = tb.DTP(["seg", "depth", "normal"], gamma=[0.0, 2.0, 1.0])
    losses = const(1.0, 3.0, 2.0, requires_grad=True)
    total = bal(losses, kpi={"seg": 0.25, "depth": 0.5, "normal": 1.0})
    w = [-math.log(0.25), -(0.5**2) * math.log(0.5), 0.0]
    assert bal.last_weights.tolist() == pytest.approx(w, rel=1e-6, abs=1e-12)
    assert total.item() == pytest.approx(1.0 * w[0] + 3.0 * w[1], rel=1e-6)
    total.backward()
    assert [loss.grad.item() for loss in losses] == pytest.approx(w, rel=1e-6, abs=1e-12)


def test_solved_task_gets_zero_weight() -> None:
    bal = tb.DTP(2, gamma=2.0)
    bal(const(1.0, 1.0), kpi=[1.0, 0.9])
    assert bal.last_weights[0].item() == 0.0
    assert bal.last_weights[1].item() > 0.0


def test_weight_rises_as_kpi_falls() -> None:
    kpis = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.01]
    weights = []
    for kpi in kpis:
        bal = tb.DTP(1, gamma=2.0)
        bal(const(1.0), kpi=[kpi])
        weights.append(bal.last_weights.item())
        assert weights[-1] == pytest.approx(focal(kpi, 2.0), rel=1e-6, abs=1e-12)
    assert all(a < b for a, b in itertools.pairwise(weights))


@settings(max_examples=80, deadline=None)
@given(
    high=st.floats(min_value=1e-6, max_value=1.0),
    factor=st.floats(min_value=0.01, max_value=0.99),
    gamma=st.floats(min_value=0.0, max_value=5.0),
)
def test_lower_kpi_means_higher_weight(high: float, factor: float, gamma: float) -> None:
    bal = tb.DTP(2, gamma=gamma)
    bal(torch.ones(2, dtype=torch.float64), kpi=[high * factor, high])
    low_w, high_w = bal.last_weights.tolist()
    assert low_w > high_w >= 0.0


def test_kpi_moving_average() -> None:
    bal = tb.DTP(2, gamma=1.0, alpha=0.25)
    bal(const(1.0, 1.0), kpi=[0.8, 0.5])  # first value taken as is
    assert bal.last_weights.tolist() == pytest.approx([focal(0.8, 1), focal(0.5, 1)], rel=1e-6)
    bal(const(1.0, 1.0), kpi=[0.4, 0.5])  # 0.25 * 0.4 + 0.75 * 0.8 = 0.7
    assert bal.kpi.tolist() == pytest.approx([0.7, 0.5], rel=1e-12)
    assert bal.last_weights.tolist() == pytest.approx([focal(0.7, 1), focal(0.5, 1)], rel=1e-6)
    bal(const(1.0, 1.0), kpi=[0.2, 1.0])  # 0.25 * 0.2 + 0.75 * 0.7 = 0.575; 0.625
    assert bal.kpi.tolist() == pytest.approx([0.575, 0.625], rel=1e-12)
    assert bal.last_weights.tolist() == pytest.approx([focal(0.575, 1), focal(0.625, 1)], rel=1e-6)


def test_alpha_one_means_no_smoothing() -> None:
    bal = tb.DTP(1, alpha=1.0)
    bal(const(1.0), kpi=[0.9])
    bal(const(1.0), kpi=[0.3])
    assert bal.last_weights.item() == pytest.approx(focal(0.3, 1.0), rel=1e-6)


def test_default_alpha_is_a_slow_average() -> None:
    bal = tb.DTP(1)
    bal(const(1.0), kpi=[0.9])
    bal(const(1.0), kpi=[0.3])
    assert bal.kpi.item() == pytest.approx(0.1 * 0.3 + 0.9 * 0.9, rel=1e-12)


def test_step_without_kpi_reuses_the_average() -> None:
    bal = tb.DTP(2, alpha=0.5)
    bal(const(1.0, 1.0), kpi=[0.6, 0.2])
    first = bal.last_weights.clone()
    bal(const(5.0, 5.0))
    assert torch.equal(bal.last_weights, first)
    assert bal.kpi.tolist() == pytest.approx([0.6, 0.2])


def test_update_kpi_before_the_first_step() -> None:
    bal = tb.DTP(["a", "b"])
    averages = bal.update_kpi({"a": 0.5, "b": 0.25})
    assert averages.tolist() == [0.5, 0.25]
    bal(const(1.0, 1.0))
    assert bal.last_weights.tolist() == pytest.approx([focal(0.5, 1), focal(0.25, 1)], rel=1e-6)


def test_kpi_as_tensor_list_and_dict_agree() -> None:
    results = []
    for kpi in ([0.3, 0.8], (0.3, 0.8), torch.tensor([0.3, 0.8]), {"b": 0.8, "a": 0.3}):
        bal = tb.DTP(["a", "b"], gamma=[1.0, 3.0])
        bal(const(1.0, 2.0), kpi=kpi)
        results.append(bal.last_weights)
    for weights in results[1:]:
        torch.testing.assert_close(weights, results[0], rtol=1e-6, atol=0)


class TwoRanks:
    """A stand-in for the DDP synchronisation: the other rank's KPIs are (0.2, 0.4)."""

    def mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        other = torch.tensor([0.2, 0.4], dtype=torch.float64)
        return [(t + other) / 2 for t in tensors]


def test_kpis_are_averaged_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    bal = tb.DTP(2, alpha=1.0)
    monkeypatch.setattr(bal, "current_sync", lambda: TwoRanks())
    assert bal.update_kpi([0.6, 0.8]).tolist() == pytest.approx([0.4, 0.6])


def test_accumulated_step_folds_in_the_mean_kpi_of_its_micro_batches() -> None:
    bal = tb.DTP(1, alpha=1.0, accumulation_steps=2)
    bal(const(1.0), kpi=[0.2])
    bal(const(1.0), kpi=[0.6])  # closes the step: the average becomes (0.2 + 0.6) / 2
    assert bal.kpi.tolist() == pytest.approx([0.4])
    bal(const(1.0))
    assert bal.last_weights.item() == pytest.approx(focal(0.4, 1.0), rel=1e-6)


def test_state_round_trip_restores_the_kpi_average() -> None:
    bal = tb.DTP(2, alpha=0.5)
    bal(const(1.0, 1.0), kpi=[0.6, 0.2])
    bal(const(1.0, 1.0), kpi=[0.2, 0.8])
    other = tb.DTP(2, alpha=0.5)
    other.load_state_dict(save_load(bal.state_dict()))
    assert other.kpi.tolist() == pytest.approx([0.4, 0.5])
    other(const(1.0, 1.0))  # no KPI: the restored average is used
    assert other.last_weights.tolist() == pytest.approx([focal(0.4, 1), focal(0.5, 1)], rel=1e-6)


def test_first_call_without_kpi_raises() -> None:
    bal = tb.DTP(2)
    with pytest.raises(tb.InvalidKPIError, match="kpi"):
        bal(const(1.0, 1.0))
    assert bal.steps == 0


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, float("nan"), float("inf")])
def test_invalid_kpi_raises_naming_the_task(bad: float) -> None:
    bal = tb.DTP(["seg", "depth"])
    bal(const(1.0, 1.0), kpi=[0.5, 0.5])
    with pytest.raises(tb.InvalidKPIError) as info:
        bal(const(1.0, 1.0), kpi={"seg": 0.5, "depth": bad})
    assert "'depth'" in str(info.value)
    assert str(bad) in str(info.value)
    # the averages are untouched
    assert bal.kpi.tolist() == [0.5, 0.5]
    assert bal.steps == 1


def test_invalid_kpi_is_a_value_error() -> None:
    assert issubclass(tb.InvalidKPIError, ValueError)


def test_kpi_for_the_wrong_tasks() -> None:
    bal = tb.DTP(["a", "b", "c"])
    with pytest.raises(tb.TaskMismatchError, match="'c'"):
        bal(const(1.0, 1.0, 1.0), kpi={"a": 0.5, "b": 0.5})
    with pytest.raises(tb.TaskMismatchError, match="2 KPIs"):
        bal(const(1.0, 1.0, 1.0), kpi=[0.5, 0.5])


def test_kpi_with_an_unknown_task_name_raises() -> None:
    bal = tb.DTP(["a", "b"])
    with pytest.raises(tb.TaskMismatchError):
        bal(const(1.0, 1.0), kpi={"a": 0.5, "b": 0.5, "bb": 0.1})


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        tb.DTP(2, alpha=alpha)


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), float("inf"), [1.0, -0.5]])
def test_bad_gamma(gamma: float | list[float]) -> None:
    with pytest.raises(ValueError, match="gamma"):
        tb.DTP(2, gamma=gamma)


def test_gamma_count_must_match() -> None:
    with pytest.raises(tb.TaskMismatchError, match="3 gamma"):
        tb.DTP(2, gamma=[1.0, 1.0, 1.0])
