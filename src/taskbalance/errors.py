"""Exceptions raised by taskbalance.

Every error names the task and the offending value, so a failing step in a long
run can be traced without a debugger.
"""

from __future__ import annotations


class TaskBalanceError(Exception):
    """Base class of every error raised by taskbalance."""


class TaskMismatchError(TaskBalanceError, ValueError):
    """The losses given do not match the balancer's tasks (count or names)."""


class NonFiniteLossError(TaskBalanceError, ValueError):
    """A task loss is NaN or infinite."""

    def __init__(self, task: str, value: float) -> None:
        self.task = task
        self.value = value
        super().__init__(
            f"loss of task {task!r} is not finite ({value}); "
            "pass nonfinite='skip_step' to skip such steps instead of raising"
        )


class NonPositiveLossError(TaskBalanceError, ValueError):
    """A method takes the log (or a ratio) of a loss that is zero or negative."""

    def __init__(self, task: str, value: float, method: str) -> None:
        self.task = task
        self.value = value
        super().__init__(
            f"{method} needs strictly positive losses, but task {task!r} has loss {value}"
        )


class InvalidKPIError(TaskBalanceError, ValueError):
    """A key performance indicator is outside (0, 1] or missing."""


class NotScalarLossError(TaskBalanceError, ValueError):
    """A task loss has more than one element."""


class BalancerUsageError(TaskBalanceError, RuntimeError):
    """The balancer is used in a way that would silently give wrong results."""


class SolverError(TaskBalanceError, RuntimeError):
    """A numerical solver failed and no documented fallback applies."""


class NonFiniteGradientError(SolverError):
    """A task gradient (or the update combined from the task gradients) is NaN or infinite.

    Raised by the gradient engine on a non-finite Gramian or update and by GradNorm on a
    non-finite gradient norm, before any state of the balancer has changed. Under fp16
    autocast with a GradScaler this is the expected sign of an overflow:
    :func:`taskbalance.integrations.amp_backward` catches exactly this class, so that the
    scaler skips the step and lowers its scale. ``task`` names the first offending task,
    or is ``None`` when the update is non-finite and no single task can be blamed.
    """

    def __init__(self, message: str, task: str | None = None) -> None:
        self.task = task
        super().__init__(message)


class TaskBalanceWarning(UserWarning):
    """A call that runs but probably trains differently from what was meant; the message
    says what to change. Each kind is warned once per balancer (or once per process)."""


def warn(message: str, category: type[Warning] = TaskBalanceWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside taskbalance and torch (the
    user's line), however deep in the libraries the misuse was noticed."""
    import os
    import sys
    import warnings

    import torch

    inside = (
        os.path.dirname(os.path.abspath(__file__)),
        os.path.dirname(os.path.abspath(torch.__file__)),
    )
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
