"""``taskbalance compare``: every method on the same work, with tables and pictures."""

from taskbalance.compare.command import ComparisonReport, compare
from taskbalance.compare.metrics import delta_m, mean_ranks
from taskbalance.compare.options import MethodSpec, select_methods
from taskbalance.compare.problem import (
    BalancerFactory,
    ComparisonProblem,
    Metric,
    RunResult,
    after_step,
    balanced_backward,
    list_problems,
    make_problem,
    register_problem,
)

__all__ = [
    "BalancerFactory",
    "ComparisonProblem",
    "ComparisonReport",
    "MethodSpec",
    "Metric",
    "RunResult",
    "after_step",
    "balanced_backward",
    "compare",
    "delta_m",
    "list_problems",
    "make_problem",
    "mean_ranks",
    "register_problem",
    "select_methods",
]
