"""Auto-Lambda: task weights meta-learned by a one-step look-ahead.

Liu, Johns, Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022
(official code lorenmt/auto-lambda). The model trains on ``Σ_i λ_i L_i``; before each model
step the weights take one step on the primary tasks' validation loss after a virtual SGD
step of the model on the training batch:

    θ'(λ) = θ − α ∇_θ Σ_i λ_i L_i(θ; train),    λ ← λ − β Adam(∇_λ Σ_{i∈P} L_i(θ'(λ); val)).

L_train is linear in λ, so ``∂L_val(θ')/∂λ_i = −α g_i·v`` with ``g_i = ∇_θ L_i(θ; train)``
and ``v = ∇_θ' L_val(θ')``. ``hvp="finite_difference"`` (default, as the official code and
DARTS) takes ``g_i·v ≈ (L_i(θ + εv) − L_i(θ − εv)) / 2ε``, ``ε = 0.01 / ||v||`` (exact for
quadratic losses); ``hvp="exact"`` computes the K gradients g_i (K backward passes
instead of two forward passes). Defaults of the official code: ``init=0.1`` for every
weight, Adam with ``lr=1e-4`` (its dense-prediction scripts; CIFAR-100 used 3e-4), a meta
step before every model step, ``primary`` = all tasks (multi-task mode; a subset is the
auxiliary-learning mode). α is the model optimiser's current learning rate.

Usage, before the ordinary step (``docs/methods.md`` has the complete loop)::

    autol.meta_step(model.parameters(), train_losses=lambda: losses(model, x, y),
                    val_losses=lambda: losses(model, xv, yv), lr=opt.param_groups[0]["lr"])
    opt.zero_grad(); autol(losses(model, x, y)).backward(); opt.step()

``meta_step`` runs the closures four times (train with and without grad, val once) and puts
the parameters back bit for bit. Measured cost (median of 300, a 32-256-256-3 MLP, batch 256,
one CPU thread): 2.8 ordinary training steps with finite differences, 3.4-3.8 with
``hvp="exact"`` at K = 3 (it grows with K). Deviations from the official code: the virtual step is
plain SGD (``weight_decay=`` may be given; the SGD momentum buffer is not added), and λ is
clamped at 0 after each Adam step (the official code does not clamp; a negative weight would
ascend its task's loss), each clamp counted in :attr:`AutoLambda.clamped_steps` and logged.
A non-finite loss follows ``nonfinite=``; a non-finite meta-gradient raises
:class:`~taskbalance.errors.NonFiniteGradientError` or, with ``nonfinite="skip_step"``,
leaves λ as it is (logged, counted in :attr:`AutoLambda.skipped_meta_steps`). Under DDP each
rank looks ahead on its own batches and the K meta-gradients are averaged over the ranks, so
every rank takes the same λ (every rank must call ``meta_step``); this is the mean of the
ranks' look-aheads, not one look-ahead on the global batch.

Without ``meta_step`` the method is static weighting at ``init``: this is warned once, at
the first ``end_period()`` or at step :data:`FORGOTTEN_META_STEPS`, with the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.balancer import Balancer, Losses, Tasks, _SkipStepError, detached_stack
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError, TaskMismatchError, warn
from taskbalance.gradients import resolve_tensors
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")

#: training steps without any ``meta_step`` after which the omission is warned about.
FORGOTTEN_META_STEPS = 1_000


def adam_step(
    param: Tensor, grad: Tensor, avg: Tensor, avg_sq: Tensor, step: int, lr: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of Adam (betas 0.9, 0.999, eps 1e-8, as ``torch.optim.Adam``); ``step`` >= 1.

    Returns ``(param, avg, avg_sq)`` updated (new tensors)."""
    avg = 0.9 * avg + 0.1 * grad
    avg_sq = 0.999 * avg_sq + 0.001 * grad * grad
    denom = avg_sq.sqrt() / math.sqrt(1.0 - 0.999**step) + 1e-8
    return param - (lr / (1.0 - 0.9**step)) * avg / denom, avg, avg_sq


@register("auto_lambda", "autol")
class AutoLambda(Balancer):
    """Auto-Lambda (Liu et al., TMLR 2022); see the module docstring.

    Args:
        tasks: number of tasks or their names.
        primary: the tasks whose validation loss λ is tuned for (names or indices;
            default all).
        lr: β, Adam's learning rate for λ (default 1e-4).
        init: the initial weight of every task (default 0.1).
        hvp: ``"finite_difference"`` (default, official) or ``"exact"``.
    """

    def __init__(
        self,
        tasks: Tasks,
        primary: Sequence[str | int] | str | int | None = None,
        lr: float = 1e-4,
        init: float = 0.1,
        hvp: Literal["finite_difference", "exact"] = "finite_difference",
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(init) and init >= 0):
            raise ValueError(f"Auto-Lambda needs lr > 0 and init >= 0, got {lr=}, {init=}")
        if hvp not in ("finite_difference", "exact"):
            raise ValueError(f"hvp must be 'finite_difference' or 'exact', got {hvp!r}")
        self.lr, self.init, self.hvp = float(lr), float(init), hvp
        chosen = range(self.num_tasks) if primary is None else primary
        self.primary_indices = [self._index(p) for p in _as_list(chosen)]
        self._lambda = torch.full((self.num_tasks,), self.init, dtype=torch.float64)
        self._avg = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._avg_sq = torch.zeros(self.num_tasks, dtype=torch.float64)
        self.meta_steps = 0
        self.clamped_steps = 0
        self.skipped_meta_steps = 0
        #: ``∇_λ L_val(θ')`` of the last meta step (float64), for logging.
        self.last_meta_gradient: Tensor | None = None
        self._warned = False

    def _index(self, task: str | int) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise TaskMismatchError(f"primary task {task!r} is not one of {list(self.tasks)}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(
                f"primary holds {task!r}: give task names or indices < {len(self.tasks)}"
            )
        return task

    @property
    def lam(self) -> Tensor:
        """The current weights λ (float64)."""
        return self._lambda.clone()

    def compute_weights(self, losses: Tensor, **context: Any) -> Tensor:
        if not self._warned and self.meta_steps == 0 and self.steps + 1 >= FORGOTTEN_META_STEPS:
            self._warn_forgotten()
        return self._lambda.to(losses.device, losses.dtype)

    def evaluation_weights(self, losses: Tensor, **context: Any) -> Tensor:
        return self._lambda.to(losses.device, losses.dtype)

    def end_period(self) -> None:
        if not self._warned and self.meta_steps == 0 and self.steps > 0:
            self._warn_forgotten()

    def _warn_forgotten(self) -> None:
        self._warned = True
        warn(
            f"AutoLambda: {self.steps} training steps and meta_step() was never called, so "
            f"the weights stay at init={self.init} (static weighting, not Auto-Lambda). Call "
            "autol.meta_step(model.parameters(), train_losses=lambda: ..., val_losses=lambda: "
            "..., lr=<the optimizer's lr>) before each optimizer step (docs/methods.md). "
            "Warned once"
        )

    def meta_step(
        self,
        params: Any,
        train_losses: Callable[[], Losses],
        val_losses: Callable[[], Losses],
        lr: float,
        weight_decay: float = 0.0,
    ) -> Tensor | None:
        """Update λ by the one-step look-ahead; return the new λ (``None`` if skipped).

        ``params``: every trained parameter (``model.parameters()``); ``train_losses`` and
        ``val_losses``: closures giving the K losses of this step's training batch and of a
        validation batch at the current parameters; ``lr``: the model's learning rate α.
        Call it before ``zero_grad``/``backward``/``step``; it leaves the parameters and
        their ``.grad`` as they were.
        """
        if self._open is not None:
            raise BalancerUsageError(
                "AutoLambda.meta_step() inside an accumulated step: call it once per optimizer "
                "step, before the first micro-batch or after the last"
            )
        if not torch.is_grad_enabled():
            raise BalancerUsageError("AutoLambda.meta_step() needs autograd: not in no_grad()")
        if not callable(train_losses) or not callable(val_losses):
            raise TypeError("train_losses and val_losses must be closures: lambda: losses(...)")
        if not (math.isfinite(lr) and lr > 0) or not weight_decay >= 0:
            raise ValueError(
                f"meta_step needs lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}"
            )
        tensors = resolve_tensors(params, "params")
        saved = [t.detach().clone() for t in tensors]
        try:
            grad = self._meta_gradient(tensors, saved, train_losses, val_losses, lr, weight_decay)
        except _SkipStepError as err:
            skipped = f"the {err.what} of task {err.task!r} is {err.value}"
            grad = torch.full((self.num_tasks,), math.nan, dtype=torch.float64)
        else:
            skipped = None
        finally:
            with torch.no_grad():
                for t, s in zip(tensors, saved):
                    t.copy_(s)
        sync = self.current_sync()
        if sync is not None:  # a rank that skips sends NaN: every rank then skips
            grad = sync.mean([grad])[0]
        if skipped is not None:
            return self._skip_meta(skipped)
        if not bool(torch.isfinite(grad).all()):
            bad = self.tasks[int((~torch.isfinite(grad)).nonzero()[0])]
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"AutoLambda: the meta-gradient of task {bad!r}'s weight is not finite",
                    task=bad,
                )
            return self._skip_meta(f"the meta-gradient of task {bad!r} is not finite")
        self.last_meta_gradient = grad
        self.meta_steps += 1
        lam, self._avg, self._avg_sq = adam_step(
            self._lambda, grad, self._avg, self._avg_sq, self.meta_steps, self.lr
        )
        if bool((lam < 0).any()):
            self.clamped_steps += 1
            logger.info("AutoLambda: clamped negative weights %s at 0", lam.tolist())
        self._lambda = lam.clamp(min=0.0)
        return self.lam

    def _skip_meta(self, why: str) -> None:
        self.skipped_meta_steps += 1
        logger.warning(
            "AutoLambda: skipped a meta step because %s (%d skipped)", why, self.skipped_meta_steps
        )
        return None

    def _meta_gradient(
        self,
        tensors: list[Tensor],
        saved: list[Tensor],
        train_losses: Callable[[], Losses],
        val_losses: Callable[[], Losses],
        lr: float,
        weight_decay: float,
    ) -> Tensor:
        """``∇_λ L_val(θ'(λ)) = −α (g_i · v)_i`` (float64, CPU); parameters left at θ'."""
        items = self.split_losses(train_losses())
        self._check_finite(detached_stack(items))
        if not all(item.requires_grad for item in items):
            raise BalancerUsageError(
                "AutoLambda.meta_step: train_losses() gave a loss that does not require grad; "
                "the closure must compute the losses from the model, with autograd enabled"
            )
        lam = self._lambda.to(items[0].device, items[0].dtype)
        if self.hvp == "exact":
            per_task = [_grads(item, tensors, retain=True) for item in items]
            step = [sum(lam[i] * g[j] for i, g in enumerate(per_task)) for j in range(len(tensors))]
        else:
            step = _grads((lam * torch.stack(items)).sum(), tensors, retain=False)
        with torch.no_grad():
            for t, s, g in zip(tensors, saved, step):
                t.copy_(s - lr * (g + weight_decay * s))
        val = self.split_losses(val_losses())
        self._check_finite(detached_stack(val))
        v = _grads(sum(val[i] for i in self.primary_indices), tensors, retain=False)
        if self.hvp == "exact":
            dots = [sum((g * d).sum() for g, d in zip(gs, v)) for gs in per_task]
            return -lr * torch.stack(dots).double().cpu()
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in v))
        if norm == 0.0:
            return torch.zeros(self.num_tasks, dtype=torch.float64)
        eps = 0.01 / norm
        sides = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for t, s, d in zip(tensors, saved, v):
                    t.copy_(s + sign * eps * d)
                sides.append(detached_stack(self.split_losses(train_losses())).double().cpu())
        return -lr * (sides[0] - sides[1]) / (2.0 * eps)

    def method_state(self) -> dict[str, Any]:
        return {
            "lambda": self._lambda.clone(),
            "avg": self._avg.clone(),
            "avg_sq": self._avg_sq.clone(),
            "meta_steps": self.meta_steps,
            "clamped_steps": self.clamped_steps,
            "skipped_meta_steps": self.skipped_meta_steps,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        lam = state.get("lambda")
        if not isinstance(lam, Tensor) or lam.shape != (self.num_tasks,):
            raise BalancerUsageError(
                f"AutoLambda.load_method_state: expected 'lambda' of shape ({self.num_tasks},); "
                "load a state saved by an AutoLambda balancer with the same tasks"
            )
        self._lambda = lam.detach().double().cpu().clone()
        self._avg = state["avg"].detach().double().cpu().clone()
        self._avg_sq = state["avg_sq"].detach().double().cpu().clone()
        self.meta_steps = int(state["meta_steps"])
        self.clamped_steps = int(state["clamped_steps"])
        self.skipped_meta_steps = int(state["skipped_meta_steps"])


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, (str, int)) else list(value)


def _grads(loss: Tensor, tensors: list[Tensor], *, retain: bool) -> list[Tensor]:
    """``∂loss/∂t`` for each tensor (zeros where the loss does not reach it)."""
    grads = torch.autograd.grad(loss, tensors, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
