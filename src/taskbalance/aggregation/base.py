"""Base class of the gradient methods: weights (or a direction) from the task gradients.

Most gradient methods (MGDA, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad, PCGrad,
GradVac) need only the Gramian ``G = J Jᵀ`` (K×K, ``G_ij = g_i·g_j``): they implement
:meth:`GradientBalancer.weights_from_gramian` and the update is ``d = wᵀ J``, i.e. the
gradient of ``sum_i w_i L_i`` with respect to the shared inputs. Methods that need the
Jacobian itself (GradDrop, DB-MTL) set ``needs = "jacobian"`` and implement
:meth:`GradientBalancer.aggregate`.

``backward(losses, shared=..., features=None)``: see :mod:`taskbalance.gradients` for the
exact and features modes and the rule for task-specific parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, Tasks
from taskbalance.errors import BalancerUsageError, SolverError
from taskbalance.gradients import (
    ForkedFeatures,
    apply_direction,
    apply_task_specific,
    forked_task_jacobian,
    resolve_tensors,
    task_jacobian,
)
from taskbalance.gradients import (
    gramian as compute_gramian,
)

Mode = Literal["exact", "features"]


class GradientBalancer(Balancer):
    """A balancer that combines task gradients.

    Args:
        tasks: number of tasks or their names.
        task_specific: ``"unweighted"`` (default) gives each task-specific parameter the
            plain gradient of its own loss; ``"weighted"`` multiplies it by the task weight.
        **kw: see :class:`~taskbalance.balancer.Balancer` (``nonfinite``, ``record``).
    """

    kind: ClassVar[str] = "gradient"
    #: ``"gramian"``: the method needs G only; ``"jacobian"``: it needs J itself.
    needs: ClassVar[str] = "gramian"
    #: the modes in which the method is defined.
    modes: ClassVar[tuple[Mode, ...]] = ("exact", "features")

    def __init__(
        self,
        tasks: Tasks,
        *,
        task_specific: Literal["unweighted", "weighted"] = "unweighted",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if task_specific not in ("unweighted", "weighted"):
            raise ValueError(
                f"task_specific must be 'unweighted' or 'weighted', got {task_specific!r}"
            )
        self.task_specific = task_specific
        self.mode: Mode | None = None

    def preference_vector(self, pref_vector: Any) -> Tensor | None:
        """``pref_vector`` as a finite float64 ``(K,)`` tensor (``None`` stays ``None``)."""
        if pref_vector is None:
            return None
        pref = torch.as_tensor(pref_vector, dtype=torch.float64).reshape(-1)
        if pref.numel() != self.num_tasks or not bool(torch.isfinite(pref).all()):
            raise ValueError(f"pref_vector must hold {self.num_tasks} finite numbers")
        return pref

    # ------------------------------------------------------------------ the method
    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Task weights ``(K,)`` from the Gramian ``(K, K)`` (float64) and detached losses."""
        raise NotImplementedError(f"{type(self).__name__} must implement weights_from_gramian")

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(direction (P,), weights (K,))`` from the Jacobian ``(K, P)``.

        The default computes the weights from the Gramian and returns ``wᵀ J``.
        """
        gramian = compute_gramian(jacobian).double()
        finite = torch.isfinite(gramian)
        if not bool(finite.all()):
            diagonal_bad = ~torch.isfinite(gramian.diagonal())
            rows_bad = diagonal_bad if bool(diagonal_bad.any()) else (~finite).any(dim=1)
            bad = int(rows_bad.nonzero()[0])
            raise SolverError(
                f"the gradient of task {self.tasks[bad]!r} is not finite (its squared norm is "
                f"{float(gramian[bad, bad])}); no weights can be computed"
            )
        weights = self.weights_from_gramian(gramian, losses.double())
        weights = weights.to(jacobian.dtype)
        return weights @ jacobian, weights

    # ------------------------------------------------------------------ the step
    def backward(
        self,
        losses: Losses,
        shared: Any = None,
        features: Any = None,
        **context: Any,
    ) -> Tensor | None:
        """Compute the task gradients, combine them, fill ``.grad``; return the weights."""
        begun = self.begin_step(losses)
        if begun is None:
            return None
        items, stacked = begun
        use_features = features is not None
        mode: Mode = "features" if use_features else "exact"
        if mode not in self.modes:
            raise BalancerUsageError(
                f"{type(self).__name__} is defined only in {self.modes} mode; "
                + ("pass shared= without features=" if use_features else "pass features=")
            )
        if isinstance(features, ForkedFeatures):
            inputs = [features.source]
        elif use_features:
            inputs = [features] if isinstance(features, Tensor) else list(features)
            for z in inputs:
                if not isinstance(z, Tensor) or not z.requires_grad:
                    raise BalancerUsageError(
                        "features must be tensors that require grad (the shared body's "
                        "output, computed with autograd enabled)"
                    )
        else:
            if shared is None:
                raise BalancerUsageError(
                    f"{type(self).__name__} needs shared= (the shared parameters) or "
                    "features= (the shared representation)"
                )
            inputs = resolve_tensors(shared)
        self.mode = mode
        if isinstance(features, ForkedFeatures):
            grads = forked_task_jacobian(items, features, self.tasks)
        else:
            grads = task_jacobian(items, inputs, self.tasks, features=use_features)
        direction, weights = self.aggregate(grads.jacobian, stacked)
        self._check_result(direction, weights)
        # wᵀJ from the Gramian path is a fresh tensor; a Jacobian method's may be its state
        apply_direction(direction, grads, features=use_features, owned=self.needs == "gramian")
        apply_task_specific(grads, weights if self.task_specific == "weighted" else None)
        self.record_step(stacked, weights)
        return self.last_weights

    def _check_result(self, direction: Tensor, weights: Tensor) -> None:
        if weights.shape != (self.num_tasks,):
            raise SolverError(
                f"{type(self).__name__} returned weights of shape {tuple(weights.shape)}, "
                f"expected ({self.num_tasks},)"
            )
        # a finite Gramian (checked in aggregate) and finite weights give a finite wᵀJ;
        # methods that build the direction from J themselves are checked in full.
        direction_ok = self.needs != "jacobian" or bool(torch.isfinite(direction).all())
        if not bool(torch.isfinite(weights).all()) or not direction_ok:
            raise SolverError(
                f"{type(self).__name__} produced a non-finite update (weights "
                f"{weights.tolist()}); the task gradients may be non-finite"
            )
