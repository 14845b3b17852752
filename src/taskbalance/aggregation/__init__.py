"""Gradient methods: weights (or a direction) computed from the task gradients."""

from taskbalance.aggregation.base import GradientBalancer

__all__ = ["GradientBalancer"]
