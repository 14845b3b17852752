"""Summary numbers of a comparison: Δm% against a baseline and the mean rank.

Δm% (Maninis et al., CVPR 2019; the form used by the CAGrad, Nash-MTL and FAMO papers):

    Δm% = (100 / K) Σ_k (−1)^{δ_k} (M_{m,k} − M_{b,k}) / M_{b,k},

K the number of *metrics* (not tasks), M_{m,k} metric k of method m, M_{b,k} that of the
baseline b, δ_k = 1 when higher is better. Lower is better; the baseline scores 0.

Mean rank (MR): the method's rank on each metric (1 = best, ties share the mean of their
ranks), averaged over metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from taskbalance.compare.problem import Metric


def delta_m(
    method: Mapping[str, float], baseline: Mapping[str, float], metrics: Sequence[Metric]
) -> float:
    """Δm% of ``method`` against ``baseline`` over the metrics marked ``in_delta_m``.

    Raises:
        ValueError: no metric counts, a metric is missing, or a baseline value is zero or
            not finite (the relative change is undefined).
    """
    counted = [m for m in metrics if m.in_delta_m]
    if not counted:
        raise ValueError("no metric is counted in Δm%")
    total = 0.0
    for metric in counted:
        if metric.name not in method or metric.name not in baseline:
            raise ValueError(f"metric {metric.name!r} is missing from a run")
        base = float(baseline[metric.name])
        if base == 0.0 or not math.isfinite(base):
            raise ValueError(
                f"Δm% is undefined: the baseline's {metric.name!r} (task {metric.task!r}) is {base}"
            )
        sign = -1.0 if metric.higher_is_better else 1.0
        total += sign * (float(method[metric.name]) - base) / base
    return 100.0 * total / len(counted)


def _ranks(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Rank of each value, 1 = best; ties share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher_is_better else values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1
        for i in order[start : end + 1]:
            ranks[i] = shared
        start = end + 1
    return ranks


def mean_ranks(
    table: Mapping[str, Mapping[str, float]], metrics: Sequence[Metric]
) -> dict[str, float]:
    """Mean rank of each method (``table``: method -> metric name -> value) over ``metrics``."""
    methods = list(table)
    counted = [m for m in metrics if m.in_delta_m]
    if not methods or not counted:
        return {}
    sums = dict.fromkeys(methods, 0.0)
    for metric in counted:
        ranks = _ranks([float(table[m][metric.name]) for m in methods], metric.higher_is_better)
        for method, rank in zip(methods, ranks):
            sums[method] += rank
    return {method: total / len(counted) for method, total in sums.items()}
