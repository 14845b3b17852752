"""``taskbalance compare``: every method on the same work, with tables and pictures."""

from taskbalance.compare.problem import (
    BalancerFactory,
    ComparisonProblem,
    Metric,
    RunResult,
    balanced_backward,
    list_problems,
    make_problem,
    register_problem,
)

__all__ = [
    "BalancerFactory",
    "ComparisonProblem",
    "Metric",
    "RunResult",
    "balanced_backward",
    "list_problems",
    "make_problem",
    "register_problem",
]
