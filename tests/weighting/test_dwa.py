"""Dynamic Weight Averaging (Liu, Johns, Davison, CVPR 2019)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import const, save_load
from taskbalance.weighting import dwa as dwa_module


def softmax_times_k(ratios: list[float], temperature: float) -> list[float]:
    """K exp(r_i / T) / sum_n exp(r_n / T), in plain Python."""
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def test_hand_computed_step_mode() -> None:
    bal = tb.DWA(["a", "b"], temperature=2.0, period="step")
    bal(const(1.0, 1.0))
    assert bal.last_weights.tolist() == [1.0, 1.0]
    bal(const(0.5, 1.0))
    assert bal.last_weights.tolist() == [1.0, 1.0]
    total = bal(const(3.0, 5.0))
    # r = (0.5 / 1, 1 / 1) = (0.5, 1); w = 2 softmax(r / 2)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    assert bal.last_weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(3.0 * expected[0] + 5.0 * expected[1], rel=1e-6)
    # the task whose loss fell less gets the larger weight
    assert bal.last_weights[1] > 1.0 > bal.last_weights[0]


def test_hand_computed_three_tasks_step_mode() -> None:
    bal = tb.DWA(3, temperature=1.0, period="step")
    bal(const(2.0, 1.0, 4.0))
    bal(const(1.0, 2.0, 4.0))
    bal(const(9.0, 9.0, 9.0))
    expected = softmax_times_k([0.5, 2.0, 1.0], 1.0)
    assert bal.last_weights.tolist() == pytest.approx(expected, rel=1e-6)
    # the next step uses r = (9/1, 9/2, 9/4)
    bal(const(1.0, 1.0, 1.0))
    assert bal.last_weights.tolist() == pytest.approx(
        softmax_times_k([9.0, 4.5, 2.25], 1.0), rel=1e-5
    )


def test_epoch_mode_uses_the_mean_loss_of_each_epoch() -> None:
    bal = tb.DWA(["a", "b"], temperature=2.0)  # period="epoch" is the default
    assert bal.period == "epoch"
    # epoch 1: mean (2, 2)
    bal(const(1.0, 2.0))
    bal(const(3.0, 2.0))
    bal.end_period()
    # epoch 2: mean (1, 2), three steps
    for values in [(1.0, 1.0), (1.0, 3.0), (1.0, 2.0)]:
        bal(const(*values))
        assert bal.last_weights.tolist() == [1.0, 1.0]
    bal.end_period()
    # epoch 3: r = (1/2, 2/2)
    bal(const(7.0, 7.0))
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    assert bal.last_weights.tolist() == pytest.approx(expected, rel=1e-6)
    # the last losses of the epochs would give r = (1/3, 1), the sums (3/4, 6/4): both differ
    wrong_last = softmax_times_k([1 / 3, 1.0], 2.0)
    wrong_sum = softmax_times_k([0.75, 1.5], 2.0)
    assert bal.last_weights.tolist() != pytest.approx(wrong_last, rel=1e-3)
    assert bal.last_weights.tolist() != pytest.approx(wrong_sum, rel=1e-3)


def test_epoch_weights_are_constant_within_an_epoch_and_slide() -> None:
    bal = tb.DWA(2, temperature=2.0)
    bal(const(4.0, 4.0))
    bal.end_period()  # mean (4, 4)
    bal(const(2.0, 4.0))
    bal.end_period()  # mean (2, 4)
    seen = []
    for values in [(1.0, 1.0), (5.0, 0.5), (2.0, 2.0)]:
        bal(const(*values))
        seen.append(bal.last_weights.tolist())
    assert seen[0] == seen[1] == seen[2]
    assert seen[0] == pytest.approx(softmax_times_k([0.5, 1.0], 2.0), rel=1e-6)
    bal.end_period()  # mean (8/3, 7/6)
    bal(const(1.0, 1.0))
    assert bal.last_weights.tolist() == pytest.approx(
        softmax_times_k([(8 / 3) / 2, (3.5 / 3) / 4], 2.0), rel=1e-6
    )


def test_epoch_mode_without_end_period_keeps_unit_weights() -> None:
    bal = tb.DWA(2)
    for i in range(10):
        bal(const(1.0 + i, 10.0 / (i + 1)))
        assert bal.last_weights.tolist() == [1.0, 1.0]


def _steps(bal: tb.DWA, n: int) -> None:
    for _ in range(n):
        bal(const(1.0, 1.0))


def test_forgotten_end_period_warns_once_at_the_documented_length() -> None:
    bal = tb.DWA(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing before the documented length
        _steps(bal, dwa_module.FORGOTTEN_END_PERIOD_STEPS - 1)
    with pytest.warns(tb.TaskBalanceWarning, match=r"end_period\(\) may have been forgotten"):
        _steps(bal, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _steps(bal, 10)


def test_warning_points_at_the_callers_line() -> None:
    bal = tb.DWA(2)
    _steps(bal, dwa_module.FORGOTTEN_END_PERIOD_STEPS - 1)
    with pytest.warns(tb.TaskBalanceWarning) as record:
        bal(const(1.0, 1.0))
    assert record[0].filename == __file__


def test_after_closed_periods_a_period_four_times_the_longest_warns() -> None:
    bal = tb.DWA(2)
    for _ in range(3):
        _steps(bal, 50)
        bal.end_period()
    # threshold: max(4 × 50, 100) = 200 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(bal, 199)
    with pytest.warns(tb.TaskBalanceWarning, match="the longest so far had 50"):
        _steps(bal, 1)


def test_regular_epochs_never_warn() -> None:
    bal = tb.DWA(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            _steps(bal, 30)
            bal.end_period()


def test_steps_per_period_closes_periods_by_itself() -> None:
    auto = tb.DWA(2, steps_per_period=3)
    manual = tb.DWA(2)
    losses = [(1.0 + i, 10.0 / (i + 1)) for i in range(12)]
    for i, pair in enumerate(losses):
        auto(const(*pair))
        manual(const(*pair))
        if i % 3 == 2:
            manual.end_period()
        assert torch.equal(auto.last_weights, manual.last_weights)
    assert auto.last_weights.tolist() != [1.0, 1.0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_steps_per_period_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="steps_per_period"):
        tb.DWA(2, steps_per_period=bad)


def test_steps_per_period_needs_epoch_periods() -> None:
    with pytest.raises(ValueError, match="period='epoch'"):
        tb.DWA(2, steps_per_period=3, period="step")


def test_longest_period_survives_a_resume() -> None:
    bal = tb.DWA(2)
    _steps(bal, 40)
    bal.end_period()
    resumed = tb.DWA(2)
    resumed.load_state_dict(save_load(bal.state_dict()))
    with pytest.warns(tb.TaskBalanceWarning, match="the longest so far had 40"):
        _steps(resumed, 160)


def test_end_period_without_steps_is_a_no_op() -> None:
    bal = tb.DWA(2, temperature=2.0)
    bal.end_period()  # nothing to close yet
    bal(const(1.0, 2.0))
    bal.end_period()
    bal(const(2.0, 2.0))
    bal.end_period()
    bal.end_period()  # an empty period must not shift the window to (2, 2), (2, 2)
    bal(const(1.0, 1.0))
    assert bal.last_weights.tolist() == pytest.approx(softmax_times_k([2.0, 1.0], 2.0), rel=1e-6)


def test_user_end_period_is_harmless_in_step_mode() -> None:
    a = tb.DWA(2, period="step")
    b = tb.DWA(2, period="step")
    for values in [(1.0, 2.0), (0.5, 1.9), (0.4, 1.0), (0.3, 0.9)]:
        a(const(*values))
        b(const(*values))
        b.end_period()
        assert torch.equal(a.last_weights, b.last_weights)


def test_weights_sum_to_k_and_first_two_periods_are_one_in_both_modes() -> None:
    losses = [(3.0, 1.0, 0.2), (2.5, 0.5, 0.3), (2.0, 0.4, 0.35), (1.0, 0.3, 0.4), (0.9, 0.2, 0.5)]
    step = tb.DWA(3, period="step")
    epoch = tb.DWA(3, period="epoch")
    for i, values in enumerate(losses):
        step(const(*values))
        epoch(const(*values))
        epoch(const(*values))
        epoch.end_period()
        for bal in (step, epoch):
            if i < 2:
                assert bal.last_weights.tolist() == [1.0, 1.0, 1.0]
            else:
                assert bal.last_weights.sum().item() == pytest.approx(3.0, rel=1e-6)
                assert bal.last_weights.tolist() != [1.0, 1.0, 1.0]
        assert torch.allclose(step.last_weights, epoch.last_weights, rtol=1e-6)


def test_large_temperature_flattens_the_weights() -> None:
    flat = tb.DWA(2, temperature=1e6, period="step")
    sharp = tb.DWA(2, temperature=0.1, period="step")
    for bal in (flat, sharp):
        bal(const(1.0, 1.0))
        bal(const(0.1, 2.0))
        bal(const(1.0, 1.0))
    assert flat.last_weights.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert sharp.last_weights[1].item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_period_mean_raises(bad: float) -> None:
    bal = tb.DWA(["seg", "depth"])
    bal(const(1.0, bad))
    bal(const(1.0, bad))
    with pytest.raises(tb.NonPositiveLossError) as info:
        bal.end_period()
    assert info.value.task == "depth"
    assert info.value.value == bad
    assert "'depth'" in str(info.value)


def test_non_positive_loss_raises_in_step_mode() -> None:
    bal = tb.DWA(["seg", "depth"], period="step")
    with pytest.raises(tb.NonPositiveLossError, match="'seg'"):
        bal(const(0.0, 1.0))


def test_a_step_that_raised_leaves_no_trace() -> None:
    bal = tb.DWA(2, period="step")
    ref = tb.DWA(2, period="step")
    bal(const(2.0, 2.0))
    ref(const(2.0, 2.0))
    with pytest.raises(tb.NonPositiveLossError):
        bal(const(-2.0, 2.0))
    for values in [(1.0, 2.0), (1.0, 1.0), (0.5, 1.0)]:
        bal(const(*values))
        ref(const(*values))
        assert torch.equal(bal.last_weights, ref.last_weights)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        tb.DWA(2, temperature=temperature)


def test_bad_period() -> None:
    with pytest.raises(ValueError, match="period"):
        tb.DWA(2, period="batch")  # type: ignore[arg-type]


def test_state_mid_epoch_round_trip() -> None:
    a = tb.DWA(2)
    for values in [(1.0, 2.0), (2.0, 2.0)]:
        a(const(*values))
    a.end_period()
    a(const(1.0, 1.0))
    b = tb.DWA(2)
    b.load_state_dict(save_load(a.state_dict()))
    for bal in (a, b):
        bal(const(0.5, 3.0))  # epoch 2 mean (0.75, 2)
        bal.end_period()
        bal(const(1.0, 1.0))
    assert torch.equal(a.last_weights, b.last_weights)
    assert a.last_weights.tolist() == pytest.approx(
        softmax_times_k([0.75 / 1.5, 2.0 / 2.0], 2.0), rel=1e-6
    )


positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    k=st.integers(min_value=1, max_value=6),
    temperature=st.floats(min_value=0.1, max_value=20.0),
)
def test_weights_sum_to_k_for_any_positive_losses(
    data: st.DataObject, k: int, temperature: float
) -> None:
    first = data.draw(st.lists(positive, min_size=k, max_size=k))
    second = data.draw(st.lists(positive, min_size=k, max_size=k))
    bal = tb.DWA(k, temperature=temperature, period="step")
    bal(torch.tensor(first, dtype=torch.float64))
    bal(torch.tensor(second, dtype=torch.float64))
    bal(torch.ones(k, dtype=torch.float64))
    weights = bal.last_weights
    assert weights.dtype == torch.float64
    assert weights.sum().item() == pytest.approx(k, rel=1e-9)
    assert bool((weights >= 0).all())
    ratios = [s / f for f, s in zip(first, second)]
    # larger ratio, larger (or equal) weight
    for i in range(k):
        for j in range(k):
            if ratios[i] > ratios[j]:
                assert weights[i] >= weights[j]
