import math

import pytest

from taskbalance.compare import Metric, delta_m, mean_ranks

METRICS = (
    Metric("acc", "t1", higher_is_better=True),
    Metric("mse", "t2", higher_is_better=False),
)


def test_delta_m_hand_computed():
    # acc: -(0.9 - 0.8) / 0.8 = -0.125 ; mse: (2 - 4) / 4 = -0.5 ; mean -0.3125 -> -31.25 %
    assert delta_m({"acc": 0.9, "mse": 2.0}, {"acc": 0.8, "mse": 4.0}, METRICS) == pytest.approx(
        -31.25
    )
    # worse on both: -(0.6 - 0.8)/0.8 = 0.25 ; (5 - 4)/4 = 0.25 -> +25 %
    assert delta_m({"acc": 0.6, "mse": 5.0}, {"acc": 0.8, "mse": 4.0}, METRICS) == pytest.approx(
        25.0
    )


def test_delta_m_of_baseline_is_zero_and_skips_diagnostics():
    metrics = (*METRICS, Metric("reached", "t1", True, in_delta_m=False))
    base = {"acc": 0.8, "mse": 4.0, "reached": 3}
    assert delta_m(base, base, metrics) == 0.0
    assert delta_m({**base, "reached": 0}, base, metrics) == 0.0


def test_delta_m_errors_name_the_metric():
    with pytest.raises(ValueError, match="mse"):
        delta_m({"acc": 0.9, "mse": 1.0}, {"acc": 0.8, "mse": 0.0}, METRICS)
    with pytest.raises(ValueError, match="mse"):
        delta_m({"acc": 0.9}, {"acc": 0.8, "mse": 1.0}, METRICS)
    with pytest.raises(ValueError, match="no metric"):
        delta_m({}, {}, (Metric("x", "t", True, in_delta_m=False),))


def test_mean_ranks_hand_computed_with_ties():
    table = {
        "A": {"acc": 0.9, "mse": 2.0},  # acc rank 1, mse rank 1.5 (tie)
        "B": {"acc": 0.8, "mse": 2.0},  # acc rank 2.5 (tie), mse rank 1.5
        "C": {"acc": 0.8, "mse": 3.0},  # acc rank 2.5, mse rank 3
    }
    ranks = mean_ranks(table, METRICS)
    assert ranks == {"A": 1.25, "B": 2.0, "C": 2.75}
    assert math.isclose(sum(ranks.values()), 6.0)  # ranks 1..3 per metric, averaged
