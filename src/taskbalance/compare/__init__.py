"""``taskbalance compare``: every method on the same work, with tables and pictures."""

from taskbalance.compare.baselines import BASELINE_ROWS, Tuning, tuning_candidates
from taskbalance.compare.command import ComparisonReport, compare
from taskbalance.compare.metrics import delta_m, mean_ranks
from taskbalance.compare.options import MethodSpec, build_problem, select_methods
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
    "BASELINE_ROWS",
    "BalancerFactory",
    "ComparisonProblem",
    "ComparisonReport",
    "MethodSpec",
    "Metric",
    "RunResult",
    "Tuning",
    "after_step",
    "balanced_backward",
    "build_problem",
    "compare",
    "delta_m",
    "list_problems",
    "make_problem",
    "mean_ranks",
    "register_problem",
    "select_methods",
    "tuning_candidates",
]
