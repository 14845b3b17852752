"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018 (Algorithm 1). Learnable weights w_i
(init 1) and, on W = the last shared layer,

    G_i = ||grad_W (w_i L_i)||_2 = w_i ||grad_W L_i||,    Gbar = mean_i G_i,
    Ltilde_i = L_i(t) / L_i(0),    r_i = Ltilde_i / mean_j Ltilde_j,
    L_grad = sum_i | G_i − Gbar r_i^alpha |    (the target Gbar r_i^alpha held constant).

Hence ``dL_grad/dw_i = sign(G_i − target_i) ||grad_W L_i||``: K first-order backward passes
to W (the graph kept), no second-order graph. L_grad updates only the w_i; the network gets
the ordinary backward of ``sum_i w_i(t) L_i`` with the weights *before* this step's update
(task-specific parameters therefore receive ``w_i``-weighted gradients, as in the paper).
After each step the weights are clamped at ``1e-8`` (never negative or zero) and renormalised
to ``sum_i w_i = K``. ``alpha = 1.5`` by default (the paper's typical value; 0.12 for its
synthetic problem). L(0) is the first step's losses; every loss must be positive.

The weights take their own Adam step (weight decay 0) inside :meth:`GradNorm.backward`;
lr 0.025 by default (the learning rate of weighting parameters in the Nash-MTL/FAMO
benchmark code; the paper gives none, and public runs of its synthetic problem use
1e-4..5e-4); with ``optimizer="external"`` their gradient is added to
``.grad`` for an optimizer given to :meth:`GradNorm.attach`, and the renormalisation happens
at the start of the next call. ``last_shared=`` names W (a tensor, tensors or a module);
otherwise W is the last tensor of ``shared`` with at least 2 dimensions (the last layer's
weight matrix for a module's parameters in definition order). With ``features=Z`` instead,
``G_i = w_i ||dL_i/dZ||`` on the shared representation: a cheaper variant (K passes through
the heads only), not the paper's. ``last_shared=`` and ``features=`` together are refused
(one of them would be ignored); a W taken from a ``shared=`` that holds the heads (the last
matrix is then the last head's) is explained when a task does not reach it.

In exact mode W must not be sharded by FSDP (refused, as for every gradient method: its
gradient would be taken on an unsharded copy); the features variant's update is the ordinary
backward of a weighted loss, which FSDP handles.

Under DDP the losses and the gradients on W are averaged over the ranks (with
``features=``: the squared norms are summed, ``||dL_i/dZ||²`` of the global batch), so every
rank computes the same weights; the model's update is the ordinary backward, which DDP
averages. With ``accumulation_steps=N`` the weights stay fixed during an accumulated step,
each micro-batch adds 1/N of its L_grad gradient and the weights take one step at its end;
L(0) is the first micro-batch's losses.

The gradient norms are checked before the weights step: a NaN or infinite norm raises
:class:`~taskbalance.errors.NonFiniteGradientError` naming the task (``nonfinite="skip_step"``:
the step is skipped), with no gradient written and the weights untouched, so one overflowed
step cannot turn the weights into NaN for the rest of the run. That makes GradNorm usable
under a GradScaler through :func:`taskbalance.integrations.amp_backward`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, Tasks, _SkipStepError, with_reference
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, NonPositiveLossError
from taskbalance.gradients import (
    autocast_disabled,
    check_not_sharded,
    describe_tensors,
    parameter_names,
    resolve_tensors,
)
from taskbalance.learnable import OptimizerMode, OwnedParameters
from taskbalance.registry import register

#: floor of a weight before renormalisation.
MIN_WEIGHT = 1e-8


def gradnorm_weight_grad(
    weights: Tensor, grad_norms: Tensor, loss_ratios: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL_grad/dw, G, target)`` from ``w``, ``||grad_W L_i||`` and ``L_i(t)/L_i(0)``."""
    g = weights * grad_norms
    r = loss_ratios / loss_ratios.mean()
    target = g.mean() * r**alpha
    return torch.sign(g - target) * grad_norms, g, target


@register("gradnorm")
class GradNorm(Balancer):
    """GradNorm; see the module docstring."""

    kind = "gradient"
    restores_micro_batches = False  # the weights do not move inside an accumulated step

    def __init__(
        self,
        tasks: Tasks,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: OptimizerMode = "own",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        self.alpha = float(alpha)
        self.learnable = OwnedParameters(
            "GradNorm", {"weights": torch.ones(self.num_tasks)}, optimizer=optimizer, lr=lr
        )
        self.initial_losses: Tensor | None = None
        self._extras: dict[str, Tensor] = {}
        self._held_grad: Tensor | None = None  # sum of L_grad gradients of an open step

    @property
    def weights(self) -> Tensor:
        """The current task weights (detached)."""
        return self.learnable["weights"].detach()

    def renormalise(self) -> None:
        """Clamp the weights at :data:`MIN_WEIGHT` and rescale them to sum to K."""
        w = self.learnable["weights"]
        with torch.no_grad():
            clamped = w.clamp(min=MIN_WEIGHT)
            w.copy_(clamped * (self.num_tasks / clamped.sum()))

    def _layer(self, shared: Any, features: Any, last_shared: Any) -> tuple[list[Tensor], str]:
        """The tensors W (or the features) and, for the error of a task that does not reach
        them, what they are."""
        if features is not None:
            if last_shared is not None:
                raise BalancerUsageError(
                    "GradNorm takes last_shared= or features=, not both: with features= the "
                    "gradient norms are taken on the representation and last_shared= would "
                    "be ignored. Drop one (last_shared= is the paper's W)"
                )
            return ([features] if isinstance(features, Tensor) else list(features)), "features"
        if last_shared is not None:
            layer = resolve_tensors(last_shared, what="last_shared=")
            check_not_sharded(layer, "GradNorm, last_shared=", last_shared)
            return layer, "the layer W (last_shared=)"
        if shared is None:
            raise BalancerUsageError("GradNorm needs last_shared=, shared= or features=")
        tensors = resolve_tensors(shared)
        check_not_sharded(tensors, "GradNorm, W from shared=", shared)
        matrices = [t for t in tensors if t.dim() >= 2]
        if not matrices:
            raise BalancerUsageError("shared has no tensor with >= 2 dims; pass last_shared=")
        layer = matrices[-1:]
        what = (
            f"the layer W, taken as the last tensor of shared= with >= 2 dims "
            f"({describe_tensors(layer, parameter_names(shared))}). If shared= holds the "
            "heads, that is the last head: pass shared= the trunk only (e.g. model.body), "
            "or last_shared= the last shared layer"
        )
        return layer, what

    def backward(
        self,
        losses: Losses,
        shared: Any = None,
        features: Any = None,
        last_shared: Any = None,
        **context: Any,
    ) -> Tensor | None:
        """Backpropagate ``sum_i w_i L_i``, step the weights by L_grad; return the weights used.

        Runs with autocast disabled for the losses' device type (it may be called inside an
        autocast region).

        Raises:
            NonFiniteGradientError: the gradient of a task on W (or on the features) is NaN
                or infinite. It is checked before anything changes: no gradient is written,
                the weights, their optimizer and L(0) are untouched. With
                ``nonfinite="skip_step"`` the step is skipped instead (``None`` is returned,
                :attr:`skipped_steps` counts it, ``last_skip_reason == "gradient"``).
        """
        self._check_training_call()
        losses, reference = with_reference(losses)
        with autocast_disabled(reference):
            return self._backward(losses, shared, features, last_shared)

    def _backward(
        self, losses: Losses, shared: Any, features: Any, last_shared: Any
    ) -> Tensor | None:
        """:meth:`backward` with autocast already disabled."""
        sync = self.current_sync()
        general = sync is not None or self.accumulation_steps > 1
        if general:
            boundary = self._begin_call(rerun=False)
            self.last_step_skipped = False
            items = self.split_separate(losses)
            try:
                stacked = self.global_losses(items)
            except _SkipStepError as err:
                self._skip(err)
                self._end_call(None, None, boundary, sync)
                return None
        else:
            begun = self.begin_step(losses)
            if begun is None:
                return None
            items, stacked = begun
        if not bool((stacked > 0).all()):
            bad = int((stacked <= 0).nonzero()[0])
            raise NonPositiveLossError(self.tasks[bad], float(stacked[bad]), "GradNorm")
        self.learnable.check_ready()
        self.learnable.to(stacked.device)
        layer, what = self._layer(shared, features, last_shared)
        task_grads = []
        for task, item in zip(self.tasks, items):
            grads = torch.autograd.grad(item, layer, retain_graph=True, allow_unused=True)
            if all(g is None for g in grads):
                raise BalancerUsageError(f"loss of task {task!r} does not reach {what}")
            task_grads.append(grads)
        if sync is None:
            norms = [
                torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None))
                for grads in task_grads
            ]
        else:
            norms = list(self._global_norms(task_grads, layer, features is not None, sync))
        try:
            self._check_norms(torch.stack(norms))
        except _SkipStepError as err:
            self._skip(err)
            if general:
                self._end_call(None, None, boundary, sync)
            return None
        if self.learnable.mode == "external" and self.micro_step == 0:
            self.renormalise()  # after the user's optimizer stepped the weights
        if self.initial_losses is None:
            self.initial_losses = stacked.double().clone()
        used = self.weights.clone()
        total = (used.to(stacked.dtype) * torch.stack(items)).sum()
        scale = self.micro_scale()
        (total if scale is None else total * scale).backward()
        ratios = stacked.double() / self.initial_losses.to(stacked.device)
        grad, g, _ = gradnorm_weight_grad(used.double(), torch.stack(norms), ratios, self.alpha)
        self._extras = {"loss_ratio": ratios, "grad_norm": g}
        if scale is not None:
            grad = grad * scale
            self._held_grad = grad if self._held_grad is None else self._held_grad + grad
        else:
            self.learnable.step_with({"weights": grad})
            if self.learnable.mode == "own":
                self.renormalise()
        if general:
            self._end_call(stacked, used, boundary, sync)
        else:
            self.record_step(stacked, used)
        return self.last_weights

    def _check_norms(self, norms: Tensor) -> None:
        """Raise (or signal a skip) if a task's gradient norm on W is not finite.

        A non-finite norm (an fp16 overflow under a GradScaler, a NaN in the model) would
        make L_grad's gradient, hence the weights, NaN for the rest of the run.
        """
        finite = torch.isfinite(norms)
        if bool(finite.all()):
            return
        bad = int((~finite).nonzero()[0])
        task, value = self.tasks[bad], float(norms[bad])
        if self.nonfinite == "skip_step":
            raise _SkipStepError(task, value, what="gradient")
        raise NonFiniteGradientError(
            f"GradNorm: the gradient of task {task!r} on the layer W is not finite (norm "
            f"{value}); no weight step was taken. Pass nonfinite='skip_step' to skip such "
            "steps, or use taskbalance.integrations.amp_backward under a GradScaler",
            task=task,
        )

    @staticmethod
    def _global_norms(
        task_grads: list[tuple[Tensor | None, ...]], layer: list[Tensor], features: bool, sync: Any
    ) -> Tensor:
        """``||grad_W L_i||`` of the global batch: W-gradients averaged over the ranks, or,
        for features (per-sample rows), the ranks' squared norms summed and divided by R²."""
        if features:
            squares = torch.stack(
                [
                    sum(g.double().pow(2).sum() for g in grads if g is not None)
                    for grads in task_grads
                ]
            )
            total = sync.all_reduce([squares], 1.0 / sync.world_size**2)[0]
            return torch.sqrt(total)
        rows = [
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(t)).reshape(-1)
                    for g, t in zip(grads, layer)
                ]
            )
            for grads in task_grads
        ]
        mean = sync.mean([torch.stack(rows)])[0]
        return mean.double().pow(2).sum(dim=1).sqrt()

    def close_accumulated_step(self) -> None:
        """One step of the weights on the summed micro-batch gradients, then renormalise."""
        if self._held_grad is not None:
            self.learnable.step_with({"weights": self._held_grad})
            self._held_grad = None
            if self.learnable.mode == "own":
                self.renormalise()

    def extras(self) -> dict[str, Tensor]:
        return self._extras

    def method_state(self) -> dict[str, Any]:
        return {"learnable": self.learnable.state_dict(), "initial_losses": self.initial_losses}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.learnable.load_state_dict(state["learnable"])
        self.initial_losses = state["initial_losses"]
        self._held_grad = None
