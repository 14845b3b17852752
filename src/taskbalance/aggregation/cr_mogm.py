"""CR-MOGM: any weighting method's weights, exponentially averaged over the steps.

Zhou, Zhang, Jiang, Zhong, Gu, Zhu, "On the Convergence of Stochastic Multi-Objective
Gradient Manipulation and Beyond", NeurIPS 2022 (correlation-reduced stochastic
multi-objective gradient manipulation). With stochastic gradients, weights computed from
the current mini-batch alone are correlated with its noise, which biases the update and can
keep MGDA-like methods from converging (the paper's two-objective counter-example). The fix
replaces the inner method's weights ``λ̂_t`` by their moving average

    λ_t = α λ_{t-1} + (1 - α) λ̂_t,        λ_1 = λ̂_1,

and updates with ``Σ_i λ_{t,i} g_i`` (gradient methods) or ``Σ_i λ_{t,i} L_i`` (loss
methods). ``beta`` is α: a constant (default 0.9, roughly an average over the last
``1 / (1 - beta)`` steps; ``beta=0`` is the inner method itself) or a schedule, a callable
``beta(step) -> α_t`` evaluated at every step (``step`` = the steps completed so far, 0
at the first) whose values must lie in [0, 1]. The first step has no past and takes the
inner weights as they are, so the average carries no bias towards a zero start.

The paper's convergence result (its Corollary 1) ties α_t to the learning rate: α_t starts
near 0 and rises towards 1 as the step size η_t decays, ``α_t = 1 − η_t / η_0`` (the
reading torchjd 0.18 documents for its ``CRMOGMWeighting``; the paper's PDF was not
available to this library, so the constant below and this schedule are stated as choices).
:func:`lr_schedule` builds that schedule from an optimizer:
``tb.make("cr_mogm", tasks, beta=lr_schedule(opt))`` reads ``opt``'s current learning
rate at each step (with a constant learning rate α_t = 0: the inner method unchanged, so
this schedule only matters with a learning-rate scheduler). The default 0.9 is this
library's choice (as torchjd's), not a value taken from the paper.

``tb.make("cr_mogm", tasks, inner="mgda", beta=0.9, **inner_kwargs)``: ``inner`` is any
registered method whose update is a weighted sum with its weights — a gradient method that
computes its weights from the Gramian (MGDA, CAGrad, IMTL-G, Nash-MTL, UPGrad, ...) or a
loss method whose combined loss is ``Σ w_i L_i`` (DWA, RLW, DTP, ...). The default inner is
MGDA, the method the paper's analysis and experiments centre on. Methods whose update is
not ``Σ w_i g_i`` (GradDrop, DB-MTL, PCD, GradNorm, ...) or whose loss is not ``Σ w_i L_i``
(uncertainty weighting, GLS, FAMO, ...) are refused with
:class:`~taskbalance.errors.BalancerUsageError`, naming the accepted ones.

The balancer is an instance of a class built once per inner method, a subclass of both
:class:`CRMOGM` and the inner method's class, so it runs through the inner method's own
machinery (modes, DDP, accumulation, AMP) with only the weights intercepted. Its state is
the inner method's state plus the averaged weights (``state_dict()`` round-trips both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Balancer, Tasks
from taskbalance.errors import BalancerUsageError
from taskbalance.registry import get, list_methods, register

_WRAPPED: dict[type, type] = {}


def moving_average(previous: Tensor | None, current: Tensor, beta: float) -> Tensor:
    """``beta * previous + (1 - beta) * current`` (``current`` when there is no previous)."""
    if previous is None:
        return current.clone()
    return beta * previous.to(current) + (1.0 - beta) * current


def lr_schedule(optimizer: torch.optim.Optimizer, group: int = 0) -> Callable[[int], float]:
    """α_t = 1 − η_t / η_0 from ``optimizer``'s learning rate (param group ``group``).

    η_0 is the learning rate when this is called (create it before any scheduler step);
    each call of the returned function reads the current one. A learning rate that has
    grown above η_0 gives α = 0 (no averaging), never a negative α.
    """
    groups = optimizer.param_groups
    if not 0 <= group < len(groups):
        raise ValueError(f"the optimizer has {len(groups)} param groups, no group {group}")
    initial = float(groups[group]["lr"])
    if not initial > 0 or not math.isfinite(initial):
        raise ValueError(f"lr_schedule needs a positive initial learning rate, got {initial}")

    def alpha(step: int) -> float:
        return min(max(1.0 - float(groups[group]["lr"]) / initial, 0.0), 1.0)

    return alpha


def refusal(cls: type) -> str | None:
    """Why ``cls`` cannot be the inner method of CR-MOGM (``None`` if it can)."""
    if issubclass(cls, CRMOGM):
        return "it is CR-MOGM itself"
    if issubclass(cls, GradientBalancer):
        if (
            cls.needs != "gramian"
            or cls.aggregate is not GradientBalancer.aggregate
            or cls.backward is not GradientBalancer.backward
            or cls.weights_from_gramian is GradientBalancer.weights_from_gramian
        ):
            return "its update is not a weighted sum of the task gradients with its weights"
        return None
    if (
        cls.combine is not Balancer.combine
        or cls.backward is not Balancer.backward
        or cls.compute_weights is Balancer.compute_weights
    ):
        return "its combined loss is not a weighted sum of the task losses with its weights"
    return None


def accepted_methods() -> list[str]:
    """Registered methods CR-MOGM can wrap."""
    return [name for name in list_methods() if refusal(get(name)) is None]


@register("cr_mogm", "crmogm")
class CRMOGM(Balancer):
    """CR-MOGM (Zhou et al., NeurIPS 2022): the inner method's weights, moving-averaged.

    Args:
        tasks: number of tasks or their names.
        inner: the registered name of the wrapped method (default ``"mgda"``).
        beta: the averaging factor α in [0, 1) (default 0.9; 0 gives the inner method),
            or a schedule ``beta(step) -> α_t`` in [0, 1] (e.g. :func:`lr_schedule`).
        **kw: the inner method's hyper-parameters and the common settings.
    """

    tasks_per_step_refusal: ClassVar[str | None] = (
        "it averages the K weights across steps, and a subset step's weights are zero for "
        "the unsampled tasks"
    )

    #: the default inner method's kind; an instance has its inner method's kind.
    kind: ClassVar[str] = "gradient"

    def __new__(cls, tasks: Tasks, *args: Any, inner: str = "mgda", **kwargs: Any) -> CRMOGM:
        if cls is CRMOGM:
            cls = _wrapped(inner)
        return super().__new__(cls, tasks, *args, inner=inner, **kwargs)  # type: ignore[return-value]

    def __init__(
        self,
        tasks: Tasks,
        inner: str = "mgda",
        beta: float | Callable[[int], float] = 0.9,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if callable(beta):
            self.beta: float | Callable[[int], float] = beta
        elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(
                f"CR-MOGM needs beta (α) in [0, 1) or a schedule beta(step) -> α, got {beta!r}"
            )
        else:
            self.beta = float(beta)
        self.inner = get(inner).method_name
        self._average: Tensor | None = None  # λ_{t-1}, float64

    def current_beta(self) -> float:
        """α for this step: the constant, or the schedule's value at :attr:`steps`."""
        if not callable(self.beta):
            return self.beta
        value = self.beta(self.steps)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BalancerUsageError(
                f"CR-MOGM's beta schedule returned {value!r} at step {self.steps}; it must "
                "return a number α in [0, 1] (e.g. lr_schedule(optimizer))"
            )
        return float(value)

    def _smooth(self, raw: Tensor) -> Tensor:
        average = moving_average(self._average, raw.detach().double(), self.current_beta())
        self._average = average
        return average.to(device=raw.device, dtype=raw.dtype)

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        return self._smooth(super().compute_weights(losses, **context))

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._smooth(super().weights_from_gramian(gramian, losses))  # type: ignore[misc]

    def method_state(self) -> dict[str, Any]:
        return {"inner": super().method_state(), "average": self._average}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if "inner" not in state or "average" not in state:
            raise BalancerUsageError(
                "CR-MOGM.load_method_state: the state has no 'inner' and 'average' entries; "
                "load a state saved by a CR-MOGM balancer"
            )
        super().load_method_state(state["inner"])
        self._average = state["average"]


def _wrapped(inner: Any) -> type:
    """The class ``CRMOGM`` + the inner method's class, built once per inner method."""
    if not isinstance(inner, str):
        raise TypeError(f"CR-MOGM's inner must be a registered method name, got {inner!r}")
    inner_cls = get(inner)
    why = refusal(inner_cls)
    if why is not None:
        raise BalancerUsageError(
            f"CR-MOGM cannot wrap {inner!r}: {why}, so there are no weights to average. "
            f"Wrap one of {accepted_methods()}"
        )
    if inner_cls not in _WRAPPED:
        _WRAPPED[inner_cls] = type(
            f"CRMOGM_{inner_cls.__name__}",
            (CRMOGM, inner_cls),
            {"kind": inner_cls.kind, "__module__": __name__, "__doc__": CRMOGM.__doc__},
        )
    return _WRAPPED[inner_cls]
