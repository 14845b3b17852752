"""MoDo: multi-objective gradient with double sampling.

Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023 (Algorithm 1; official code
heshandevaka/Trade-Off-MOL, ported to LibMTL). A stochastic MGDA: the weights λ ∈ Δ_K take
one projected-gradient step per iteration on MGDA's objective ½||Jᵀλ||², whose gradient
``J Jᵀ λ`` is estimated from two independent mini-batches z1, z2 (so the estimate is
unbiased), and a third batch z3 gives the model's update:

    λ_{t+1} = Π_Δ(λ_t − γ (J_{z1} J_{z2}ᵀ λ_t + ρ λ_t)),      d_t = J_{z3}ᵀ λ_{t+1},

``λ_0 = 1/K``, Π_Δ the Euclidean projection onto the simplex. ``rho=0`` is the paper's
Algorithm 1 exactly; the ``ρλ`` term (the gradient of ``(ρ/2)||λ||²``) is the regularised
sub-problem of the official code and LibMTL. Defaults ``gamma=1e-3``, ``rho=0.1`` are
LibMTL's (the official scripts sweep γ from 1e-3 to 10, some with ρ = 0).

Usage: ``modo.backward([losses_a, losses_b, losses_c], shared=model.shared_parameters())``,
each entry the K losses (a dict or a sequence) of its own mini-batch, from its own forward
pass; λ is updated from a and b, the update is c's (3 forward passes, 3K backward passes).
Double sampling needs parameter gradients: with three batches only the exact mode
(``shared=``) is accepted, since features of different batches are different tensors.
Task-specific parameters get batch c's gradient (the paper updates the whole model with z3;
LibMTL averages the heads' gradients over the three batches); the history records c's losses.

One set of losses (``modo.backward(losses, shared=...)``, as every generic training loop,
the registry suites and ``taskbalance compare`` give) uses that batch three times: λ steps
on its own Gramian ``J Jᵀ``, the biased single-sample variant. This is warned once, with the
fix. A non-finite loss of batch a or b follows ``nonfinite=`` like one of batch c; a
non-finite cross Gramian raises :class:`~taskbalance.errors.NonFiniteGradientError`.
Under DDP the Jacobians of a and b are averaged over the ranks, like c's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation._simplex import project_simplex
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Losses, Tasks, _SkipStepError, detached_stack, with_reference
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, warn
from taskbalance.gradients import autocast_disabled
from taskbalance.registry import register


def modo_weights(lam: Tensor, cross: Tensor, gamma: float, rho: float) -> Tensor:
    """``Π_Δ(λ − γ (C λ + ρ λ))`` (float64) with ``C = J_{z1} J_{z2}ᵀ`` (K×K)."""
    lam, cross = lam.detach().double().cpu(), cross.detach().double().cpu()
    step = lam - gamma * (cross @ lam + rho * lam)
    return torch.from_numpy(project_simplex(step.numpy()))


@register("modo")
class MoDo(GradientBalancer):
    """MoDo (Chen et al., NeurIPS 2023): λ by double sampling (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        gamma: γ, the step size of λ (default 1e-3).
        rho: ρ, the ℓ2 regularisation of λ's sub-problem (default 0.1; 0 is Algorithm 1).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    tasks_per_step_refusal = (
        "its weights λ are an iterate over all K tasks carried across steps, and its step "
        "takes up to three batches"
    )

    def __init__(self, tasks: Tasks, gamma: float = 1e-3, rho: float = 0.1, **kw: Any) -> None:
        super().__init__(tasks, **kw)
        for name, value in (("gamma", gamma), ("rho", rho)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"MoDo's {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"MoDo needs a finite {name} >= 0, got {value!r}")
        self.gamma, self.rho = float(gamma), float(rho)
        self._lambda = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        self._cross: Tensor | None = None  # J_a J_bᵀ of the call in progress
        self._pending: _SkipStepError | None = None  # a non-finite loss of batch a or b
        self._warned_single = False

    @property
    def lam(self) -> Tensor:
        """The current weights λ (float64, on the simplex)."""
        return self._lambda.clone()

    def _backward(self, losses: Losses, shared: Any, features: Any) -> Tensor | None:
        batches = _three_batches(losses)
        if batches is None:
            if not self._warned_single:
                self._warned_single = True
                warn(
                    "MoDo.backward got one set of losses: the same batch gives λ's update "
                    "(its own Gramian J Jᵀ) and the model's, the biased single-sample step "
                    "that MoDo's double sampling removes. Pass the losses of three "
                    "independent mini-batches: modo.backward([losses_a, losses_b, losses_c], "
                    "shared=...) (λ from a and b, the update from c). Warned once"
                )
            return self._run(losses, shared, features)
        if features is not None:
            raise BalancerUsageError(
                "MoDo with three batches needs the shared parameters' gradients (features of "
                "different batches cannot be compared): pass shared= without features="
            )
        first, second, last = batches
        if isinstance(shared, Iterator):  # e.g. model.parameters(): read once, used three times
            shared = list(shared)
        # backward() found no tensor at the top level of the nested losses
        with autocast_disabled(with_reference(last)[1]):
            self._cross_gramian(first, second, shared)
            try:
                return self._run(last, shared, None)
            finally:
                self._cross, self._pending = None, None

    def _run(self, losses: Losses, shared: Any, features: Any) -> Tensor | None:
        try:
            return super()._backward(losses, shared, features)
        except _SkipStepError as err:  # batch a or b, without DDP or accumulation
            self._skip(err)
            return None

    def _cross_gramian(self, first: Losses, second: Losses, shared: Any) -> None:
        """``J_a J_bᵀ`` into :attr:`_cross`, or the skip of a non-finite loss of a or b."""
        sync = self.current_sync()
        items = [self.split_separate(first), self.split_separate(second)]
        stacked = torch.stack([detached_stack(pair).double() for pair in items])
        if sync is not None:
            stacked = sync.mean([stacked])[0]
        try:
            for row in stacked:
                self._check_finite(row)
        except _SkipStepError as err:
            self._pending = err  # raised where the engine handles a skipped step
            return
        jacobians = []
        for pair in items:
            jac = self._task_gradients(pair, shared, None)[0].jacobian
            if sync is not None:
                sync.mean_(jac)
            jacobians.append(jac)
        self._cross = (jacobians[0] @ jacobians[1].T).double()

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self._pending is not None:
            raise self._pending
        cross = gramian if self._cross is None else self._cross
        if not bool(torch.isfinite(cross).all()):
            task, batch = _nonfinite_source(~torch.isfinite(cross))
            raise NonFiniteGradientError(
                f"MoDo: the cross Gramian J_a J_bᵀ is not finite; the gradient of task "
                f"{self.tasks[task]!r} in batch {batch} is not finite",
                task=self.tasks[task],
            )
        self._lambda = modo_weights(self._lambda, cross, self.gamma, self.rho)
        return self._lambda.to(gramian.device)

    def method_state(self) -> dict[str, Any]:
        return {"lambda": self._lambda.clone()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        lam = state.get("lambda")
        if not isinstance(lam, Tensor) or lam.shape != (self.num_tasks,):
            raise BalancerUsageError(
                f"MoDo.load_method_state: expected 'lambda' of shape ({self.num_tasks},); "
                "load a state saved by a MoDo balancer with the same tasks"
            )
        self._lambda = lam.detach().double().cpu().clone()


def _nonfinite_source(bad: Tensor) -> tuple[int, str]:
    """``(task, "a" or "b")`` behind the non-finite entries ``bad`` of ``J_a J_bᵀ``: a
    non-finite row i of J_a spoils row i, a non-finite row j of J_b column j."""
    rows, cols = bad.all(dim=1), bad.all(dim=0)
    if bool(cols.any()) and not bool(rows.all()):
        return int(cols.nonzero()[0]), "b"
    if bool(rows.any()):
        return int(rows.nonzero()[0]), "a"
    return int(bad.any(dim=1).nonzero()[0]), "a or b"


def _three_batches(losses: Any) -> list[Any] | None:
    """The three loss sets of ``[losses_a, losses_b, losses_c]``, or ``None`` for one set.

    One set is a dict, a tensor, or a sequence of tensors; several sets are a list or tuple
    whose entries are all dicts or sequences.
    """
    if not isinstance(losses, (list, tuple)) or not losses:
        return None
    nested = [isinstance(b, (Mapping, list, tuple)) for b in losses]
    if not any(nested):
        return None
    if not all(nested) or len(losses) != 3:
        raise BalancerUsageError(
            f"MoDo takes one set of K losses or three (one per independent mini-batch), got "
            f"{len(losses)} entries of which {sum(nested)} are sets of losses; call "
            "modo.backward([losses_a, losses_b, losses_c], shared=...)"
        )
    return list(losses)
