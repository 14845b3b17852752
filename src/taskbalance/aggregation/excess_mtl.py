"""ExcessMTL: task weights driven by estimated excess risks.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, "Robust Multi-Task Learning with Excess
Risks", ICML 2024 (arXiv:2402.02009). Loss-driven weights favour a task with label noise,
whose loss stays high at its optimum; ExcessMTL weights tasks by their distance to
convergence instead. The excess risk ``L_i(θ) - L_i(θ_i*)`` is estimated by a second-order
Taylor expansion, ``g_iᵀ H_i⁻¹ g_i``, with the diagonal of H_i approximated AdaGrad-style by
the root of the task's accumulated squared gradients:

    S_i <- S_i + g_i ⊙ g_i,                     S_i = 0 at the start
    ε_i = Σ_j g_ij² / sqrt(S_ij)                (terms with S_ij = 0 are 0)
    r_i = ε_i / ε_i⁰,                            ε_i⁰ = ε_i of the task's first step
    w_i <- w_i exp(η r_i),  then  w <- K w / Σ_k w_k,    w = 1 at the start
    d = Σ_i w_i g_i.

On the step that sets ε_i⁰ the task's ``r_i`` is 0, so the first step leaves ``w = 1`` (as
the official code, which skips that step's update). The normalisation by ε_i⁰ makes the
tasks' estimates comparable (the paper's scale normalisation); the constant ½ of the
Taylor term cancels in it and is left out, as in the code. η = 0.01 is the official
code's default (``robust_step_size``; its README example uses 1). The weights sum to K, as
in the official code and LibMTL (so η = 0 is equal weighting with ``Σ g_i``).

Choices against the official code (LibMTL's is the same):

* the code adds 1e-7 under the root only against 0/0; here those terms are skipped, so ε_i
  is exactly proportional to the gradients' scale (r_i free of a constant scale) and
  gradients of 1e-4 and below are not distorted;
* the update ``w exp(η r)`` is done in log space (``K softmax(log w + η r)``): the same
  numbers without overflow of ``exp``;
* a task whose gradient is exactly zero on its first step has ``ε_i = 0`` and no usable
  reference (the code divides by it); its reference is taken at its first step with
  ``ε_i > 0`` and until then ``r_i = 0``. Each such step is counted in
  :attr:`ExcessMTL.deferred_references` and logged (once per task) on the ``taskbalance``
  logger.

``needs = "jacobian"``, exact mode only: S is K×P state (in J's dtype and device), written
into a spare buffer and committed once the result is finite; in the features mode the rows
of J are one batch's examples and cannot be accumulated across batches (the code's
representation variant sums them first; not offered here). Under DDP the engine averages J
first, so S is the same on every rank. The recorded weights are the w applied: ``d = wᵀJ``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer, spare_buffer
from taskbalance.balancer import Tasks
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def excess_risks(jacobian: Tensor, accumulated: Tensor) -> Tensor:
    """``ε_i = Σ_j g_ij² / sqrt(S_ij)`` (``(K,)``, J's dtype), 0/0 terms counted as 0."""
    root = accumulated.sqrt()
    safe = torch.where(root > 0, root, 1.0)
    return (jacobian * jacobian / safe).sum(dim=1)


def exponentiated_step(weights: Tensor, ratios: Tensor, eta: float) -> Tensor:
    """``K w exp(η r) / Σ_k w_k exp(η r_k)``, computed as ``K softmax(log w + η r)``."""
    return weights.numel() * torch.softmax(weights.log() + eta * ratios, dim=0)


@register("excess_mtl", "excessmtl")
class ExcessMTL(GradientBalancer):
    """ExcessMTL (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        eta: step size η >= 0 of the exponentiated update (official ``robust_step_size``;
            default 0.01).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    needs = "jacobian"
    modes = ("exact",)
    guards_state = False  # the K×P accumulator is committed only once the result is finite

    def __init__(self, tasks: Tasks, *, eta: float = 0.01, **kw: Any) -> None:
        super().__init__(tasks, **kw)
        if not 0.0 <= eta < float("inf"):
            raise ValueError(f"eta must be non-negative and finite, got {eta}")
        self.eta = float(eta)
        self.t = 0
        self.accumulated: Tensor | None = None
        self.reference = torch.zeros(self.num_tasks, dtype=torch.float64)  # 0: not yet set
        self.weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self.deferred_references = 0
        self._spare: Tensor | None = None  # storage reused for the next accumulator
        self._logged: set[int] = set()  # tasks whose deferred reference was logged

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        acc = self.accumulated
        if acc is not None and acc.shape != jacobian.shape:
            raise BalancerUsageError(
                f"ExcessMTL accumulates squared gradients of shape {tuple(acc.shape)}, but "
                f"this step's are {tuple(jacobian.shape)}: the shared parameters changed"
            )
        new = spare_buffer(self._spare, jacobian)
        torch.mul(jacobian, jacobian, out=new)
        if acc is not None:
            new.add_(acc.to(new))
        risks = excess_risks(jacobian, new).double().cpu()
        finite = torch.isfinite(risks)
        if not bool(finite.all()):
            self._spare = new
            bad = int((~finite).nonzero()[0])
            raise NonFiniteGradientError(
                f"the gradient of task {self.tasks[bad]!r} is not finite (or its square "
                f"overflows J's dtype): its excess risk is {float(risks[bad])}",
                task=self.tasks[bad],
            )
        reference = self.reference.clone()
        unset = reference == 0
        reference = torch.where(unset, risks, reference)
        ratios = torch.where(unset, 0.0, risks / torch.where(unset, 1.0, reference))
        weights = exponentiated_step(self.weights, ratios, self.eta)
        deferred = [i for i in range(self.num_tasks) if bool(unset[i]) and not risks[i] > 0]
        applied = weights.to(jacobian)
        direction = applied @ jacobian
        if bool(torch.isfinite(direction).all()):
            self._spare, self.accumulated, self.t = acc, new, self.t + 1
            self.reference, self.weights = reference, weights
            self.deferred_references += len(deferred)
            for i in deferred:
                if i not in self._logged:
                    self._logged.add(i)
                    logger.warning(
                        "ExcessMTL: the gradient of task %r is zero, so its excess risk has "
                        "no reference yet; it is taken at the task's first non-zero gradient "
                        "(until then the task's weight changes only through normalisation)",
                        self.tasks[i],
                    )
        else:
            self._spare = new
        return direction, applied

    def method_state(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "accumulated": None if self.accumulated is None else self.accumulated.clone(),
            "reference": self.reference.clone(),
            "weights": self.weights.clone(),
            "deferred_references": self.deferred_references,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        acc = state["accumulated"]
        self.accumulated = None if acc is None else acc.clone()
        self.reference = state["reference"].to(torch.float64).clone()
        self.weights = state["weights"].to(torch.float64).clone()
        self.deferred_references = int(state["deferred_references"])
        self._spare = None
