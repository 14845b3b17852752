"""Base class of the gradient methods: weights (or a direction) from the task gradients.

Most gradient methods (MGDA, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad, PCGrad,
GradVac) need only the Gramian ``G = J Jᵀ`` (K×K, ``G_ij = g_i·g_j``): they implement
:meth:`GradientBalancer.weights_from_gramian` and the update is ``d = wᵀ J``, i.e. the
gradient of ``sum_i w_i L_i`` with respect to the shared inputs. Methods that need the
Jacobian itself (GradDrop, DB-MTL) set ``needs = "jacobian"`` and implement
:meth:`GradientBalancer.aggregate`.

``backward(losses, shared=..., features=None)``: see :mod:`taskbalance.gradients` for the
exact and features modes and the rule for task-specific parameters, and
:mod:`taskbalance.distributed` for DDP (the engine averages ``J`` over the ranks in the
exact mode, sums the ranks' Gramians in the features mode, and averages the parameter
gradients it writes).

Checks of the arguments, each paid once per balancer or only where it can matter: in exact
mode a shared tensor that one task alone reaches (a head passed in ``shared=``) is warned
about once; in features mode ``shared=``, which the engine does not use, is compared with
what the features depend on at the first call and warned about once if it holds more (the
heads) and a loss that reaches a body parameter other than through the features (a head
reading an inner activation) is refused; in the exact mode a ``shared=`` sharded by
``fully_shard`` is looked for on every call where FSDP could be in use and, if found, the
step is :mod:`taskbalance.sharded`'s (one ordinary backward per task that FSDP
reduce-scatters, the K×K Gramian of the shards all-reduced, or J all-gathered for a method
that needs it; heads outside FSDP), while FSDP1 and bare DTensors are refused; in the
features mode a body sharded by ``fully_shard`` is backpropagated by one ordinary backward
that FSDP reduces itself (looked for at the first call where FSDP could be in use; FSDP1,
DTensors and sharded heads refused).
The features-mode checks share one walk of the body's graph.

The step runs with autocast disabled for the losses' device type, so ``backward`` may be
called inside an autocast region (J is at least float32, see :mod:`taskbalance.gradients`).
A step that raises (a non-finite gradient, a solver failure) leaves the method's state as
it was before the call: the state is saved before the solve and restored on an error.

Diagnostics (``diagnostics=``, :mod:`taskbalance.diagnostics`): on a diagnosed step the
Gramian the weights came from is kept (:meth:`GradientBalancer.scaled_weights`) and the
diagnostics are computed from it and the applied weights once the result has passed its
checks; a Jacobian method's from ``J Jᵀ`` of the Jacobian it was given and its direction.
Off, nothing is computed.

Objective sampling (:meth:`GradientBalancer.task_subset`): a method may ask for the
gradients of a subset of the tasks only; the other losses are not back-propagated, their
rows of J are zero and their heads get no gradient in that step.

Task sampling (``tasks_per_step=m``, the methods that compute their weights from the
Gramian): each step draws m of the K tasks (:meth:`GradientBalancer.task_subset`), solves the
method on their m×m Gramian as if they were all the tasks, and rescales the weights so that
the update estimates the K-task one (:meth:`GradientBalancer.sampled_weights`; the
semantics are in :class:`GradientBalancer` and docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.balancer import (
    Balancer,
    Losses,
    Tasks,
    _clone,
    _SkipStepError,
    detached_stack,
    with_reference,
)
from taskbalance.diagnostics import step_diagnostics
from taskbalance.distributed import Sync, check_fsdp_setting
from taskbalance.errors import (
    BalancerUsageError,
    NonFiniteGradientError,
    SolverError,
    TaskMismatchError,
    warn,
)
from taskbalance.gradients import (
    ForkedFeatures,
    TaskGradients,
    accumulate_grad,
    apply_direction,
    apply_task_specific,
    autocast_disabled,
    backprop_to_leaves,
    check_not_sharded,
    check_not_wrapped,
    describe_tensors,
    feature_leaves,
    forked_task_jacobian,
    fsdp_body,
    parameter_names,
    resolve_tensors,
    sharded_tensors,
    sharding_possible,
    task_jacobian,
    task_parameters,
)
from taskbalance.gradients import (
    gramian as compute_gramian,
)
from taskbalance.layerwise import (
    first_non_finite,
    held_per_task,
    hooked_parameters,
    layerwise_gradients,
    unsupported_reason,
)
from taskbalance.sharded import fsdp_exact_backward, fsdp_shared
from taskbalance.structured import aggregate_task_gradients

Mode = Literal["exact", "features"]
logger = logging.getLogger("taskbalance")


def task_index(tasks: tuple[str, ...], task: int | str, name: str = "main") -> int:
    """The index of ``task`` (a task name or an index) in ``tasks``, checked; ``name`` is
    the argument's name in the messages (``main=``, ``primary=``)."""
    k = len(tasks)
    if isinstance(task, str):
        if task not in tasks:
            raise TaskMismatchError(
                f"{name}={task!r} is not a task; give one of {list(tasks)} or an index in "
                f"0..{k - 1}"
            )
        return tasks.index(task)
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"{name} must be a task name or an int index, got {task!r}")
    if not 0 <= task < k:
        raise ValueError(
            f"{name}={task} is out of range for {k} tasks; give an index in 0..{k - 1} or one "
            f"of the names {list(tasks)}"
        )
    return task


def spare_buffer(spare: Tensor | None, like: Tensor) -> Tensor:
    """``spare`` if it can hold a tensor like ``like`` (shape, dtype, device), else a new one.

    The K×P-state methods (DB-MTL, MoCo, ExcessMTL) write their next state into a spare
    buffer and swap it in only once the result is finite; a model moved to another device
    or dtype gets a fresh buffer instead of a write into the old one.
    """
    if (
        spare is None
        or spare.shape != like.shape
        or spare.dtype != like.dtype
        or spare.device != like.device
    ):
        return torch.empty_like(like)
    return spare


def sample_tasks(k: int, m: int, generator: torch.Generator) -> list[int]:
    """``m`` of ``k`` task indices, uniformly without replacement, sorted."""
    return sorted(torch.randperm(k, generator=generator)[:m].tolist())


#: the odd 64-bit constant that spreads ``tasks_seed`` before the step counter is added
_SEED_MIX = 0x9E3779B97F4A7C15


def embed_gramian(sub: Tensor, subset: list[int], k: int) -> Tensor:
    """The K×K Gramian of a step on the tasks ``subset`` from theirs (m×m): zero rows and
    columns for the tasks not sampled."""
    index = torch.tensor(subset, device=sub.device)
    gram = sub.new_zeros(k, k)
    gram[index.unsqueeze(1), index] = sub
    return gram


def no_shared_error(balancer: Balancer) -> BalancerUsageError:
    """The error for a gradient step given neither ``shared=`` nor ``features=``."""
    return BalancerUsageError(
        f"{type(balancer).__name__} needs shared= (the shared parameters) or "
        "features= (the shared representation)"
    )


def _full_task_gradients(grads: TaskGradients, subset: list[int], k: int) -> TaskGradients:
    """The gradients of the sampled tasks ``subset`` as those of all ``k`` tasks: zero rows
    of J and no task-specific gradients for the others (:meth:`GradientBalancer.task_subset`)."""
    sub = grads.jacobian
    jac = sub.new_zeros((k, sub.shape[1]))
    jac.index_copy_(0, torch.tensor(subset, device=sub.device), sub)
    own: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(k)]
    for row, task in enumerate(subset):
        own[task] = grads.own[row]
    return TaskGradients(jac, grads.inputs, own)


class GradientBalancer(Balancer):
    """A balancer that combines task gradients.

    Args:
        tasks: number of tasks or their names.
        task_specific: ``"unweighted"`` (default) gives each task-specific parameter the
            plain gradient of its own loss; ``"weighted"`` multiplies it by the task weight.
        tasks_per_step: ``m`` in ``1..K``: back-propagate only ``m`` tasks per step, drawn
            uniformly without replacement (default ``None``: all K; ``m = K`` is the same,
            bit for bit). See *Task sampling* below.
        tasks_seed: seed of the draws of ``tasks_per_step`` (default 0).
        jacobian_free: in the exact mode (``shared=``), never store J: accumulate the
            Gramian layer by layer from the layers' output gradients and send ``wᵀJ``
            through each layer (:mod:`taskbalance.layerwise`). The same weights and update
            to float rounding; it holds K times the layers' outputs instead of K times
            their parameters. ``True``: always (refused for the methods that need J
            itself); ``False``: J stored; ``"auto"``: decided at the first exact-mode call
            from the shapes, the mode without J when the layers' outputs are fewer than
            their parameters (Linear layers on a batch with fewer rows than their width,
            where it is also faster; measured in docs/jacobian_free.md; under DDP from
            the sizes summed over the ranks), never under FSDP, for a method that needs J
            or for parameters with gradient hooks; the choice is kept and logged.
        **kw: see :class:`~taskbalance.balancer.Balancer` (``nonfinite``, ``record``).

    Task sampling (``tasks_per_step=m < K``), for the methods that compute their weights
    from the Gramian. Step t draws a set S of m tasks, uniformly without replacement, from a
    generator seeded by ``(tasks_seed, t)``, t = :attr:`steps` the steps completed and,
    under DDP, rank 0's ``tasks_seed``. The draw is a function of the state, so every DDP
    rank and every micro-batch of an accumulated step has the same S, and a run resumed from
    ``state_dict()`` draws the same sets. Only the m losses in S are back-propagated (exact,
    features and forked modes: the cost of m tasks); the others get weight 0 and their
    task-specific parameters (heads) no gradient in that step. The method runs on the m×m
    Gramian of S as if S were all the tasks (its defaults are those of m tasks: UPGrad's and
    DualProj's ``p_i = 1/m``; a ``pref_vector`` given for the K tasks is restricted to S
    and, for the methods whose default is ``1/K``, multiplied by K/m), and the weights
    ``w_S`` it returns are rescaled so that the update estimates the K-task one:

    * methods whose weights are shares that sum to about one (the update has the size of
      one task gradient whatever K: MGDA, UPGrad, DualProj, CAGrad, IMTL-G; PCGrad with
      ``reduction="mean"``) apply ``w_S`` as it is: the m-task shares (1/m for the mean)
      are already K/m times the K-task ones (1/K);
    * methods whose weights are per task (the update sums the tasks: PCGrad, Aligned-MTL,
      ConFIG, FairGrad, Nash-MTL; :attr:`weights_per_task`) apply ``(K/m) w_S``.

    Both are the inverse-probability (Horvitz-Thompson) estimate ``Σ_{i∈S} (K/m) c_i g_i``
    of ``Σ_i c_i g_i`` with ``c`` the method's K-task weights, so when the weights do not
    depend on the gradients (UPGrad and DualProj without conflict are the mean, PCGrad
    without conflict the sum) the expected update over the draws is the full-K update:
    **unbiased**. Otherwise (a conflict, MGDA, CAGrad, Nash-MTL, ...) the weights are a
    nonlinear function of the Gramian and the update is an estimate that is **not**
    unbiased. History records the K weights with zeros for the unsampled tasks.

    Refused with :class:`~taskbalance.errors.BalancerUsageError` for ``m < K``: the methods
    that need the Jacobian itself, that sample tasks themselves (SDMGrad-OS: ``n=``,
    M-ConFIG: ``per_step=``), that keep per-task state across steps which a subset step
    would corrupt (:attr:`tasks_per_step_refusal`: GradVac, PCD, SDMGrad, MoDo, CR-MOGM,
    IMTL's learnable scales), and ``diagnostics=`` (K-task statistics that m gradients do
    not give). Warm starts (CAGrad's support, FairGrad's and Nash-MTL's last solution) are
    kept: they are only starting points, compared with a cold start.
    """

    kind: ClassVar[str] = "gradient"
    #: ``"gramian"``: the method needs G only; ``"jacobian"``: it needs J itself.
    needs: ClassVar[str] = "gramian"
    #: the modes in which the method is defined.
    modes: ClassVar[tuple[Mode, ...]] = ("exact", "features")
    #: save :meth:`method_state` before each solve and restore it if the step raises.
    #: A method whose state is large and which commits it only once its result has passed
    #: the checks of :meth:`_check_result` (DB-MTL) turns this off.
    guards_state: ClassVar[bool] = True

    # one-time checks of the arguments (see the module docstring); set on the instance
    _warned_heads = False  # exact mode: a head in shared= was warned about
    _shared_checked = False  # features mode: shared= was compared with the features' body
    _body_unsharded = False  # features mode: the body's sharding was looked at
    _body_fsdp = False  # features mode: the body is sharded by fully_shard, which reduces it
    _bypass_checked = False  # features mode: no loss reaches the body besides the features

    #: why the method refuses ``tasks_per_step=`` below K (``None``: it takes it), for a
    #: method whose state or step a subset would break; see :meth:`sampling_refusal`.
    tasks_per_step_refusal: ClassVar[str | None] = None
    #: the method's weights are per task (the update sums the tasks: PCGrad, Nash-MTL, ...),
    #: not shares summing to about one; a subset step then multiplies them by K/m.
    weights_per_task: ClassVar[bool] = False

    def __init__(
        self,
        tasks: Tasks,
        *,
        task_specific: Literal["unweighted", "weighted"] = "unweighted",
        tasks_per_step: int | None = None,
        tasks_seed: int = 0,
        jacobian_free: bool | Literal["auto"] = False,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if not isinstance(jacobian_free, bool) and jacobian_free != "auto":
            raise ValueError(f"jacobian_free must be True, False or 'auto', got {jacobian_free!r}")
        if jacobian_free is True:
            reason = self.jacobian_free_refusal() or unsupported_reason()
            if reason is not None:
                raise BalancerUsageError(
                    f"{type(self).__name__} cannot run with jacobian_free=True: {reason}. "
                    "Leave jacobian_free=False (the exact mode with J stored), or use the "
                    "features mode (features=z or tb.fork), which stores only the gradients "
                    "of the features"
                )
        self.jacobian_free = jacobian_free
        if task_specific not in ("unweighted", "weighted"):
            raise ValueError(
                f"task_specific must be 'unweighted' or 'weighted', got {task_specific!r}"
            )
        self.task_specific = task_specific
        self.mode: Mode | None = None
        self.tasks_per_step = self._check_tasks_per_step(tasks_per_step)
        if isinstance(tasks_seed, bool) or not isinstance(tasks_seed, int):
            raise ValueError(f"tasks_seed must be an int, got {tasks_seed!r}")
        self.tasks_seed = tasks_seed
        # never advanced: its seed, rank 0's under DDP (the balancer's generators are
        # broadcast at the first synchronised call), seeds the draws of task_subset
        self._tasks_generator = torch.Generator().manual_seed(tasks_seed)

    def _check_tasks_per_step(self, m: int | None) -> int | None:
        """``tasks_per_step`` checked: ``None`` or an int in ``1..K``, refused below K by a
        method that cannot take it or together with ``diagnostics=``."""
        if m is None:
            return None
        k, name = self.num_tasks, type(self).__name__
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= k:
            raise ValueError(
                f"tasks_per_step must be an int in 1..{k} (the tasks back-propagated per step; "
                f"{k} or None: all of them), got {m!r}"
            )
        if m == k:
            return m
        why = self.sampling_refusal()
        if why is not None:
            raise BalancerUsageError(
                f"{name} does not take tasks_per_step={m} < K={k}: {why}. Leave tasks_per_step "
                "out, or use a method that takes it (MGDA, UPGrad, DualProj, CAGrad, IMTL-G, "
                "PCGrad, Aligned-MTL, ConFIG, FairGrad, Nash-MTL)"
            )
        if self._diag_every:
            raise BalancerUsageError(
                f"{name}: diagnostics= with tasks_per_step={m} < K={k} is refused: the "
                f"diagnostics are statistics of all {k} task gradients and a step computes "
                f"only {m}. Drop diagnostics= here, or diagnose with a separate run without "
                "tasks_per_step"
            )
        return m

    @classmethod
    def sampling_refusal(cls) -> str | None:
        """Why the method cannot take ``tasks_per_step`` below K (``None``: it can)."""
        if cls.task_subset is not GradientBalancer.task_subset:
            return "it samples the tasks itself (see its own setting)"
        if cls.tasks_per_step_refusal is not None:
            return cls.tasks_per_step_refusal
        if cls.needs != "gramian":
            return (
                "it needs the task Jacobian itself, not only the Gramian (task sampling solves "
                "the method on the sampled tasks' Gramian)"
            )
        if (
            cls.aggregate is not GradientBalancer.aggregate
            or cls._backward is not GradientBalancer._backward
        ):
            return "its step does not go through the engine's Gramian path"
        return None

    @classmethod
    def jacobian_free_refusal(cls) -> str | None:
        """Why the method cannot take ``jacobian_free=True`` (``None``: it can)."""
        if cls.needs != "gramian":
            return "it needs the task Jacobian itself, not only the Gramian"
        if (
            cls.aggregate is not GradientBalancer.aggregate
            or cls._backward is not GradientBalancer._backward
            or cls._task_gradients is not GradientBalancer._task_gradients
        ):
            return "its step does not go through the engine's Gramian path"
        return None

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

        The default computes the weights from the Gramian and returns ``wᵀ J``; on a step
        of a task subset, from the Gramian of the sampled rows only (the others are zero).
        """
        subset = self.current_subset
        if subset is None:
            weights = self.scaled_weights(compute_gramian(jacobian).double(), losses)
            weights = weights.to(jacobian.dtype)
            return weights @ jacobian, weights
        index = torch.tensor(subset, device=jacobian.device)
        rows = jacobian.index_select(0, index)
        gram = embed_gramian(compute_gramian(rows).double(), subset, self.num_tasks)
        weights = self.scaled_weights(gram, losses).to(jacobian.dtype)
        return weights.index_select(0, index) @ rows, weights

    def scaled_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """:meth:`gramian_weights` times :meth:`direction_scale` of ``||wᵀJ|| = sqrt(wᵀGw)``
        (for methods with :attr:`scales_direction`): the weights actually applied, computed
        without a pass over J."""
        if self._diag_due:
            self._diag_gram = gramian  # the Gramian the weights come from (diagnostics)
        weights = self.gramian_weights(gramian, losses)
        if not self.scales_direction:
            return weights
        w = weights.to(gramian.dtype)
        factor = self.direction_scale(math.sqrt(max(float(w @ gramian @ w), 0.0)))
        return weights if factor == 1.0 else weights * factor

    #: the method rescales ``wᵀJ`` by a function of its norm (:meth:`direction_scale`).
    scales_direction: ClassVar[bool] = False

    def direction_scale(self, norm: float) -> float:
        """Factor applied to a combined direction of norm ``norm`` (1: none; Nash-MTL clips).

        Methods that rescale ``wᵀJ`` by its norm set :attr:`scales_direction` and implement
        this; the norm is ``sqrt(wᵀGw)`` from the Gramian (under DDP's features mode the
        global Gramian, so every rank applies the same factor).
        """
        return 1.0

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """:meth:`weights_from_gramian` on a float64 Gramian checked to be finite."""
        # one reduction in the usual case; a finite Gramian whose sum overflows is let through
        finite = None if math.isfinite(float(gramian.sum())) else torch.isfinite(gramian)
        if finite is not None and not bool(finite.all()):
            diagonal_bad = ~torch.isfinite(gramian.diagonal())
            rows_bad = diagonal_bad if bool(diagonal_bad.any()) else (~finite).any(dim=1)
            bad = int(rows_bad.nonzero()[0])
            raise NonFiniteGradientError(
                f"the gradient of task {self.tasks[bad]!r} is not finite (its squared norm is "
                f"{float(gramian[bad, bad])}); no weights can be computed",
                task=self.tasks[bad],
            )
        if self.tasks_per_step is not None and self.current_subset is not None:
            return self.sampled_weights(gramian, losses.double(), self.current_subset)
        return self.weights_from_gramian(gramian, losses.double())

    def sampled_weights(self, gramian: Tensor, losses: Tensor, subset: list[int]) -> Tensor:
        """The K weights of a ``tasks_per_step`` step on the tasks ``subset``: the method on
        the sampled tasks' Gramian as if they were all the tasks, rescaled (K/m for
        :attr:`weights_per_task`), zero for the others (see the class docstring)."""
        k, m = self.num_tasks, len(subset)
        index = torch.tensor(subset, device=gramian.device)
        sub = gramian.index_select(0, index).index_select(1, index)
        tasks, pref = self.tasks, getattr(self, "pref", None)
        self.tasks = tuple(tasks[i] for i in subset)  # num_tasks is m in the solve
        if pref is not None:  # p_S, on the scale of an m-task default (1/m where 1/K)
            self.pref = pref[subset] * (1.0 if self.weights_per_task else k / m)
        try:
            weights = self.weights_from_gramian(sub, losses[subset])
        finally:
            self.tasks = tasks
            if pref is not None:
                self.pref = pref
        if self.weights_per_task:
            weights = weights * (k / m)
        full = weights.new_zeros(k)
        full[index.to(full.device)] = weights
        return full

    # ------------------------------------------------------------------ task subsets
    #: the tasks back-propagated in the current call, sorted (``None``: all of them); set by
    #: the engine before the per-task gradients, read by the method in its solve.
    current_subset: list[int] | None = None
    _subset_for: tuple[object, list[int] | None] | None = None  # (open accumulated step, subset)

    def task_subset(self) -> list[int] | None:
        """Hook: the indices of the tasks whose losses this call back-propagates; ``None``
        (the default) for all of them. Objective-sampling methods (SDMGrad-OS, M-ConFIG)
        override it.

        The engine calls it once per call, before any backward pass. The losses of the other
        tasks are not back-propagated at all (the cost is that of ``len(subset)`` tasks),
        their rows of J are zero (the method still sees a K×P Jacobian and a K×K Gramian),
        their task-specific parameters (heads) get no gradient in this step, and the method
        should give them weight 0 or document what its weights mean. During the solve the
        subset is :attr:`current_subset`. A subset of every task is the ordinary step.

        Contract: the result is a function of the method's state, which this call must not
        change; the method advances that state (the generator it draws from, a counter) in
        its solve (:meth:`weights_from_gramian` or :meth:`aggregate`), where a step that
        raises is rolled back. Under DDP the state, hence the subset, is the same on every
        rank (generators are broadcast from rank 0 at the first synchronised call). Under
        accumulation the first computed micro-batch of an accumulated step draws the subset
        and the others reuse it (their solves start from the step's saved state), so the
        state advances once per accumulated step. The one-time checks that look at every
        task (a head in ``shared=``, a loss bypassing the features) see only the sampled
        ones on such a step.

        With ``tasks_per_step=m < K`` (the methods that take it): m tasks drawn uniformly
        without replacement by a generator seeded from ``tasks_seed`` (rank 0's under DDP)
        and :attr:`steps`.
        """
        m = self.tasks_per_step
        if m is None or m >= self.num_tasks:
            return None
        base = self._tasks_generator.initial_seed()
        seed = (base * _SEED_MIX + self.steps) % (1 << 63)
        return sample_tasks(self.num_tasks, m, torch.Generator().manual_seed(seed))

    def _draw_subset(self) -> list[int] | None:
        """:meth:`task_subset`, checked, sorted, kept for the open accumulated step."""
        open_step, kept = self._open, self._subset_for
        if open_step is not None and kept is not None and kept[0] is open_step:
            subset = kept[1]
        else:
            drawn = self.task_subset()
            subset = None if drawn is None else sorted(int(i) for i in drawn)
            if subset is not None and (
                not subset
                or len(set(subset)) != len(subset)
                or not 0 <= subset[0] <= subset[-1] < self.num_tasks
            ):
                raise SolverError(
                    f"{type(self).__name__}.task_subset() returned {drawn!r}: expected distinct "
                    f"task indices in [0, {self.num_tasks}), at least one"
                )
            if subset is not None and len(subset) == self.num_tasks:
                subset = None
            self._subset_for = None if open_step is None else (open_step, subset)
        self.current_subset = subset
        return subset

    # ------------------------------------------------------------------ diagnostics
    _diag_due = False  # this call's step is one of the diagnosed ones
    _diag_gram: Tensor | None = None  # the Gramian the call's weights came from
    _diag_call: dict[str, Tensor] | None = None  # the call's diagnostics, until checked

    @classmethod
    def supports_diagnostics(cls) -> bool:
        # a method with a step of its own (MoDo's three batches) does not go through the
        # engine's paths that compute the diagnostics
        return cls._backward is GradientBalancer._backward

    def _begin_diagnostics(self) -> None:
        """Start of a call: is its step diagnosed? (``diagnostics=``)."""
        self._diag_gram, self._diag_call = None, None
        self._diag_due = self._diag_every > 0 and self.steps % self._diag_every == 0

    def _diagnose(self, jacobian: Tensor | None, direction: Tensor, weights: Tensor) -> None:
        """The call's diagnostics from what the method used: the Gramian its weights came
        from and ``d = wᵀJ`` (Gramian methods), or ``G = J Jᵀ`` of the Jacobian it was given
        and its own direction ``d`` (Jacobian methods: ``g_i·d = (J d)_i``)."""
        gram = self._diag_gram if self.needs == "gramian" else None
        if gram is None:
            assert jacobian is not None
            gram = compute_gramian(jacobian).double()
        k = gram.shape[0]
        # a step on a subset of the tasks (SDMGrad-OS, M-ConFIG): the statistics of the
        # sampled tasks, NaN for the others (their zero rows are no gradient of theirs)
        subset = self.current_subset if self.current_subset is not None else list(range(k))
        index = torch.tensor(subset, device=gram.device)
        sub_gram = gram.index_select(0, index).index_select(1, index)
        if self.needs == "gramian":
            call = step_diagnostics(sub_gram, weights.double().to(gram.device)[index])
        else:
            assert jacobian is not None
            d = direction.detach().double()
            rows = jacobian.detach().double().index_select(0, index.to(jacobian.device))
            call = step_diagnostics(sub_gram, task_dot_update=rows @ d, update_norm=d.norm())
        if len(subset) < k:
            call = _spread_to_tasks(call, subset, k)
        self._diag_call = call

    def _commit_diagnostics(self) -> None:
        """The call's result passed its checks: its diagnostics count for the step."""
        if self._diag_call is not None:
            self._add_diagnostics(self._diag_call)
            self._diag_call = self._diag_gram = None

    # ------------------------------------------------------------------ the step
    def backward(
        self,
        losses: Losses,
        shared: Any = None,
        features: Any = None,
        **context: Any,
    ) -> Tensor | None:
        """Compute the task gradients, combine them, fill ``.grad``; return the weights.

        Under DDP the update is that of the global batch, the same on every rank; with
        ``accumulation_steps=N`` each call adds 1/N of its micro-batch's direction. Runs
        with autocast disabled for the losses' device type, so it may be called inside an
        autocast region.

        Raises:
            NonFiniteGradientError: a task gradient (or the update) is NaN or infinite;
                nothing is written to ``.grad`` and the method's state is unchanged.
        """
        self._check_training_call()
        losses, reference = with_reference(losses)
        with autocast_disabled(reference):
            layout = fsdp_shared(shared) if features is None and "exact" in self.modes else None
            if layout is not None:  # shared= sharded by fully_shard: taskbalance.sharded
                return fsdp_exact_backward(self, losses, layout)
            return self._backward(losses, shared, features)

    def _backward(self, losses: Losses, shared: Any, features: Any) -> Tensor | None:
        """:meth:`backward` with autocast already disabled."""
        sync = self.current_sync()
        if features is None and self.jacobian_free:
            if isinstance(shared, Iterator):  # model.parameters(): read once, used twice
                shared = list(shared)
            if self._layerwise_now(losses, shared, sync):
                return self._backward_layerwise(losses, shared, sync)
        if sync is not None or self.accumulation_steps > 1:
            return self._backward_general(losses, shared, features, sync)
        begun = self.begin_step(losses)
        if begun is None:
            return None
        items, stacked = begun
        grads, use_features = self._task_gradients(items, shared, features)
        if self._diag_every:
            self._begin_diagnostics()
        with self._state_restored_on_error():
            direction, weights = aggregate_task_gradients(self, grads, stacked)
            self._check_result(direction, weights)
        if self._diag_due:
            self._diagnose(grads.jacobian, direction, weights)
            self._commit_diagnostics()
        # wᵀJ from the Gramian path is a fresh tensor; a Jacobian method's may be its state
        apply_direction(direction, grads, features=use_features, owned=self.needs == "gramian")
        apply_task_specific(grads, weights if self.task_specific == "weighted" else None)
        self.record_step(stacked, weights)
        return self.last_weights

    def _task_gradients(
        self, items: list[Tensor], shared: Any, features: Any
    ) -> tuple[TaskGradients, bool]:
        """Check the mode's arguments; return the per-task gradients and the mode."""
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
            check_not_wrapped(inputs)
        else:
            if shared is None:
                raise no_shared_error(self)
            inputs = resolve_tensors(shared)
        forked = isinstance(features, ForkedFeatures)
        where = f"{type(self).__name__}, {'forked features' if forked else mode} mode"
        body = None
        if use_features:
            body = self._check_features_body(inputs, shared, where)
        else:
            check_not_sharded(inputs, where, shared)
        self.mode = mode
        subset = self._draw_subset()
        names: tuple[str, ...] | list[str] = self.tasks
        if subset is not None:  # only the sampled tasks' losses are back-propagated
            items, names = [items[i] for i in subset], [self.tasks[i] for i in subset]
            if forked:
                views = ForkedFeatures(features[i] for i in subset)
                views.source, features = features.source, views
        if forked:
            grads = forked_task_jacobian(items, features, names)
        else:
            grads = task_jacobian(items, inputs, names, features=use_features)
        if subset is not None:
            grads = _full_task_gradients(grads, subset, self.num_tasks)
        if body is not None:
            self._check_no_bypass(grads, body, shared)
        self.warn_heads_once([(grads.inputs[j], task) for j, task in grads.single], shared)
        return grads, use_features

    def _check_no_bypass(self, grads: TaskGradients, body: list[Tensor], shared: Any) -> None:
        """Features mode, first call: no loss reaches a parameter of the body other than
        through the features (that part of its gradient would be applied unweighted, as if
        the parameter were the task's own, and never enter J)."""
        ids = {id(t) for t in body}
        for task, pairs in zip(self.tasks, grads.own):
            bypass = [p for p, _ in pairs if id(p) in ids]
            if bypass:
                raise BalancerUsageError(
                    f"the loss of task {task!r} reaches {len(bypass)} parameter"
                    f"{'s' if len(bypass) > 1 else ''} of the body "
                    f"({describe_tensors(bypass, parameter_names(shared))}) other than through "
                    "features= (e.g. a head that also reads an inner activation of the body): "
                    "that part of its gradient would skip the balancing. Feed the heads only "
                    "the features, or pass every body output they read as a feature "
                    "(features=[z, h])"
                )
        self._bypass_checked = True

    def _check_features_body(
        self, inputs: list[Tensor], shared: Any, where: str
    ) -> list[Tensor] | None:
        """Features mode, once per balancer: no FSDP parameter in the body (while FSDP can
        be in use), and ``shared=``, if given, holds nothing the features do not depend on.
        Returns the body's parameters while :meth:`_check_no_bypass` is still to run."""
        check_sharding = not self._body_unsharded and sharding_possible()
        check_shared = shared is not None and not self._shared_checked
        if not (check_sharding or check_shared or not self._bypass_checked):
            return None
        leaves = feature_leaves(inputs)
        if check_sharding:
            self._body_fsdp = fsdp_body(leaves, where, shared)
            if self._body_fsdp:
                check_fsdp_setting(self.distributed)
            self._body_unsharded = True
        if check_shared:
            given = resolve_tensors(shared)
            self._shared_checked = True
            body = {id(t) for t in leaves}
            ignored = [t for t in given if id(t) not in body]
            if ignored:
                listed = describe_tensors(ignored, parameter_names(shared))
                warn(
                    "shared= is not used when features= is given: the update goes from the "
                    "features back through everything that computes them, and each parameter "
                    "after the features gets its own task's gradient (task_specific="
                    f"{self.task_specific!r}). shared= holds {len(ignored)} tensor(s) that the "
                    f"features do not depend on ({listed}), "
                    "so they are not treated as shared; pass shared= the module that computes "
                    "the features (e.g. model.body), or leave shared= out"
                )
        return None if self._bypass_checked else leaves

    def warn_heads_once(self, single: Sequence[tuple[Tensor, int]], shared: Any) -> None:
        """Warn, once per balancer, about shared tensors that one task alone reaches
        (``(tensor, task index)`` pairs; nothing when there are none): they look like a
        head passed in ``shared=``."""
        if not single or self._warned_heads:
            return
        self._warned_heads = True
        names = parameter_names(shared)
        by_task: dict[int, list[Tensor]] = {}
        for tensor, task in single:
            by_task.setdefault(task, []).append(tensor)
        listed = "; ".join(
            f"task {self.tasks[task]!r}: {describe_tensors(tensors, names, limit=4)}"
            for task, tensors in by_task.items()
        )
        warn(
            f"shared= holds {len(single)} tensor(s) that only one task's loss reaches "
            f"({listed}); they look like a head. In shared= a head enters the Gramian and "
            "gets the combined, weighted update instead of its own task's gradient, which "
            "changes both the heads' updates and the weights: pass only the trunk as "
            "shared= (e.g. model.body or model.shared_parameters()). Warned once"
        )

    def _backward_layerwise(self, losses: Losses, shared: Any, sync: Sync | None) -> Tensor | None:
        """:meth:`backward` in the exact mode with ``jacobian_free=True`` (no J stored).

        Under DDP each layer's K gradients are averaged over the ranks before their product
        enters G (the same K×P numbers as the mode that stores J sends, one layer at a
        time), the heads' gradients with them; each rank writes its own ``wᵀJ^r``, averaged
        when the step closes (:meth:`touch`)."""
        if shared is None:
            raise no_shared_error(self)
        boundary, items, local = self.open_call(losses)
        try:  # under DDP the global losses: every rank skips together
            stacked = self._check_finite(local if sync is None else sync.mean([local])[0])
        except _SkipStepError as err:
            self._skip(err)
            self._end_call(None, None, boundary, sync)
            return None
        inputs = resolve_tensors(shared)
        check_not_sharded(inputs, f"{type(self).__name__}, exact mode", shared)
        self.mode = "exact"
        k = self.num_tasks
        subset = self._draw_subset()
        index = list(range(k)) if subset is None else subset
        names = [self.tasks[i] for i in index]
        own_params, reached = task_parameters(
            [items[i] for i in index], inputs, names, features=False
        )
        self._warn_single(reached, index, shared)
        hooked = hooked_parameters([*inputs, *(p for own in own_params for p in own)])
        if hooked:
            raise BalancerUsageError(
                f"{type(self).__name__}(jacobian_free=True): "
                f"{describe_tensors(hooked, parameter_names(shared))} "
                f"{'has a gradient hook' if len(hooked) == 1 else 'have gradient hooks'} "
                "(Tensor.register_hook). Without J the hook would see the K tasks' gradients "
                "batched, or not run at all where a layer's share of the Gramian comes from "
                "its input and output gradients, and the result would differ from the mode "
                "that stores J. Use jacobian_free=False (or 'auto', which then stores J)"
            )
        grads = layerwise_gradients(
            [items[i] for i in index],
            inputs,
            own_params,
            sync=sync,
        )
        if sync is not None:  # the heads' gradients of the global batch
            flat = [g for pairs in grads.own for _, g in pairs]
            rest = iter(sync.mean(flat) if flat else [])
            grads.own = [[(p, next(rest)) for p, _ in pairs] for pairs in grads.own]
        gram = grads.gram if subset is None else embed_gramian(grads.gram, subset, k)
        with self._state_restored_on_error():
            self._restore_micro()
            try:
                weights = self.scaled_weights(gram, stacked).to(stacked.dtype)
            except NonFiniteGradientError as err:
                # the batched backward spreads one task's inf to the others (0·inf = nan):
                # name the task from its own gradient (the graph is still there)
                bad = first_non_finite([items[i] for i in index], inputs)
                if bad is None:
                    raise
                task = self.tasks[index[bad]]
                raise NonFiniteGradientError(
                    f"the gradient of task {task!r} is not finite; no weights can be computed",
                    task=task,
                ) from err
            self._check_result(weights, weights)  # a Gramian method: no direction to check
        if self._diag_due:
            self._diagnose(None, weights, weights)  # from the Gramian and the weights alone
            self._commit_diagnostics()
        scale = self.micro_scale()
        sampled = weights[torch.tensor(index, device=weights.device)]
        for param, piece in grads.direction(sampled):
            accumulate_grad(param, piece if scale is None else piece * scale, owned=True)
            if sync is not None:
                self.touch([param])  # this rank's wᵀJ^r: averaged when the step closes
        heads = TaskGradients(grads.direct_jacobian, inputs, grads.own)
        if subset is not None:  # the sampled tasks' heads at their places among the K
            heads = _full_task_gradients(heads, subset, k)
        apply_task_specific(heads, weights if self.task_specific == "weighted" else None, scale)
        self._end_call(stacked, weights, boundary, sync)
        return self.last_weights

    #: ``jacobian_free="auto"``: the choice made at the first exact-mode call (``None``: not
    #: made yet); ``True`` is the mode without J
    auto_jacobian_free: bool | None = None

    def _layerwise_now(self, losses: Losses, shared: Any, sync: Sync | None) -> bool:
        """Whether this exact-mode call runs without J (``jacobian_free`` is set)."""
        if self.jacobian_free is True:
            return True
        if shared is None:
            return False
        if self.auto_jacobian_free is None:
            choice, why = False, ""
            reason = self.jacobian_free_refusal() or unsupported_reason()
            inputs = resolve_tensors(shared)
            if reason is not None:
                why = reason
            elif sharded_tensors(inputs):
                why = "shared= is sharded by FSDP"
            elif hooked_parameters(inputs):
                why = "shared parameters have gradient hooks"
            else:
                items = [t for t in self.split_separate(losses) if t.requires_grad]
                held, total = held_per_task(items, inputs)
                if sync is not None:  # every rank takes the same choice: the sums over ranks
                    sizes = torch.tensor([held, total], dtype=torch.float64)
                    held, total = (int(v) for v in sync.all_reduce([sizes])[0].tolist())
                choice = held < total
                why = f"the layers' outputs hold {held} numbers per task, J {total}"
            self.auto_jacobian_free = choice
            logger.info(
                "%s(jacobian_free='auto'): the exact mode %s (%s)",
                type(self).__name__,
                "without J" if choice else "with J stored",
                why,
            )
        return self.auto_jacobian_free

    def _warn_single(self, reached: list[list[Tensor]], index: list[int], shared: Any) -> None:
        """The jacobian-free mode's check for a head passed in ``shared=``: a shared tensor
        that exactly one task's loss reaches (warned once, as in the exact mode)."""
        if self._warned_heads or len(index) < 2:
            return
        by: dict[int, tuple[Tensor, list[int]]] = {}
        for row, tensors in enumerate(reached):
            for t in tensors:
                by.setdefault(id(t), (t, []))[1].append(index[row])
        self.warn_heads_once([(t, tasks[0]) for t, tasks in by.values() if len(tasks) == 1], shared)

    # ------------------------------------------------------------------ DDP and accumulation
    def open_call(self, losses: Losses) -> tuple[bool, list[Tensor], Tensor]:
        """Start a call of the general paths (DDP, accumulation, the mode without J, FSDP's
        exact mode): ``(whether it closes the step, the K losses, their detached stack)``;
        the call's diagnostics are begun."""
        boundary = self._begin_call(rerun=False)
        self.last_step_skipped = False
        items = self.split_separate(losses)
        local = detached_stack(items)
        if self._diag_every:
            self._begin_diagnostics()
        return boundary, items, local

    def _backward_general(
        self, losses: Losses, shared: Any, features: Any, sync: Sync | None
    ) -> Tensor | None:
        """:meth:`backward` under DDP and/or gradient accumulation."""
        boundary, items, local = self.open_call(losses)
        try:
            if sync is None:
                stacked = self._check_finite(local)
                grads, use_features = self._task_gradients(items, shared, features)
                with self._state_restored_on_error():
                    self._restore_micro()
                    direction, weights = aggregate_task_gradients(self, grads, stacked)
                    self._check_result(direction, weights)
                if self._diag_due:
                    self._diagnose(grads.jacobian, direction, weights)
            else:
                grads, use_features = self._task_gradients(items, shared, features)
                with self._state_restored_on_error():
                    stacked, direction, weights = self._aggregate_across(
                        grads, local, use_features, sync
                    )
                    self._check_result(direction, weights)
        except _SkipStepError as err:
            self._skip(err)
            self._end_call(None, None, boundary, sync)
            return None
        if self._diag_due:
            self._commit_diagnostics()
        scale = self.micro_scale()
        if scale is not None:
            direction = direction * scale
        own_weights = weights if self.task_specific == "weighted" else None
        if sync is not None and use_features and self._body_fsdp:
            # one ordinary backward: FSDP reduce-scatters (averages) the body's gradients
            apply_direction(direction, grads, features=True)
            self.touch(p for pairs in grads.own for p, _ in pairs)  # the replicated heads
        elif sync is not None and use_features:
            # local body and head gradients; averaged over the ranks when the step closes
            leaves = feature_leaves(grads.inputs)
            for leaf, grad in zip(leaves, backprop_to_leaves(direction, grads.inputs, leaves)):
                if grad is not None:
                    accumulate_grad(leaf, grad, owned=True)
                    self.touch([leaf])
            self.touch(p for pairs in grads.own for p, _ in pairs)
        else:
            owned = self.needs == "gramian" or scale is not None
            apply_direction(direction, grads, features=use_features, owned=owned)
        apply_task_specific(grads, own_weights, scale)
        self._end_call(stacked, weights, boundary, sync)
        return self.last_weights

    def _aggregate_across(
        self, grads: TaskGradients, local: Tensor, features: bool, sync: Sync
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(global losses, this rank's direction, weights)`` with the ranks' gradients.

        Exact mode: J is averaged in place (the engine owns it), then the losses and the
        task-specific gradients in one more all-reduce (``grads`` then holds the averages).
        Features mode: the Gramian ``(1/R²) Σ_r J^r J^rᵀ`` and the losses in one all-reduce
        (K² + K numbers); the
        direction is this rank's ``wᵀJ^r``, R times its block of the global direction, as
        the gradients it produces are averaged afterwards. Methods that need J itself
        all-gather it. Raises the skip signal on every rank if a global loss is not finite.
        """
        jac = grads.jacobian
        world = sync.world_size
        if not features:
            wire = jac.dtype if jac.dtype in (torch.float32, torch.float64) else torch.float64
            own = [g for pairs in grads.own for _, g in pairs]
            sync.mean_(jac)
            reduced = sync.mean([local.to(wire), *own])
            stacked = self._check_finite(reduced[0].to(local.dtype))
            rest = iter(reduced[1:])
            grads.own = [[(p, next(rest)) for p, _ in pairs] for pairs in grads.own]
            self._restore_micro()
            direction, weights = self.aggregate(grads.jacobian, stacked)
            if self._diag_due:  # from the averaged J, the same on every rank
                self._diagnose(grads.jacobian, direction, weights)
            return stacked, direction, weights
        if self.needs == "gramian":
            gram = grads.gramian().double()  # the fork mode's factored one where it has it
            loss_sum, gram_sum = sync.all_reduce([local.double(), gram], [1.0 / world, 1.0])
            stacked = self._check_finite(loss_sum.to(local.dtype))
            gram = gram_sum / (world * world)
            self._restore_micro()
            weights = self.scaled_weights(gram, stacked).to(jac.dtype)
            direction = weights @ jac
            if self._diag_due:  # from the global Gramian, the same on every rank
                self._diagnose(None, direction, weights)
            return stacked, direction, weights
        stacked = self._check_finite(sync.mean([local])[0])
        full, offset = sync.all_gather_columns(jac)
        self._restore_micro()
        direction, weights = self.aggregate(full / world, stacked)
        self._check_result(direction, weights)  # the global direction: one verdict for all
        if self._diag_due:  # the global J and direction
            self._diagnose(full / world, direction, weights)
        return stacked, direction[offset : offset + jac.shape[1]] * world, weights

    @contextlib.contextmanager
    def _state_restored_on_error(self) -> Iterator[None]:
        """Run the solve; if it raises, put the method's state back as it was before.

        A method advances its state while it computes the weights (PCGrad's and GradVac's
        draws, GradVac's targets, Nash-MTL's warm start, ...), before the engine's final
        check of the result; a step that raises must not leave that trace. The saved state
        is what :meth:`method_state` returns (small for every method that keeps this on).
        """
        saved = _clone(self.method_state()) if self.guards_state else None
        try:
            yield
        except BaseException:
            if saved is not None:
                self.load_method_state(saved)
            raise

    def _check_result(self, direction: Tensor, weights: Tensor) -> None:
        if weights.shape != (self.num_tasks,):
            raise SolverError(
                f"{type(self).__name__} returned weights of shape {tuple(weights.shape)}, "
                f"expected ({self.num_tasks},)"
            )
        # a finite Gramian (checked in aggregate) and finite weights give a finite wᵀJ;
        # methods that build the direction from J themselves are checked in full.
        direction_ok = self.needs != "jacobian" or bool(torch.isfinite(direction).all())
        weights_ok = math.isfinite(float(weights.sum())) or bool(torch.isfinite(weights).all())
        if not weights_ok or not direction_ok:
            raise NonFiniteGradientError(
                f"{type(self).__name__} produced a non-finite update (weights "
                f"{weights.tolist()}); the task gradients may be non-finite"
            )


class PerTensorBalancer(GradientBalancer):
    """A Jacobian method whose statistics are taken per shared tensor (LR annealing's code
    variant, MetaBalance): exact mode only, and :meth:`tensor_sizes` tells which columns of
    J belong to which tensor."""

    needs: ClassVar[str] = "jacobian"
    modes: ClassVar[tuple[Mode, ...]] = ("exact",)
    #: the numels of the shared tensors of the last J the engine formed
    _sizes: Sequence[int] = ()

    def _task_gradients(
        self, items: list[Tensor], shared: Any, features: Any
    ) -> tuple[TaskGradients, bool]:
        grads, use_features = super()._task_gradients(items, shared, features)
        self._sizes = [t.numel() for t in grads.inputs]
        return grads, use_features

    def tensor_sizes(self, width: int) -> list[int]:
        """The tensors' numels for a J of ``width`` columns; one block of ``width`` when J
        did not come from the engine (``aggregate`` called directly)."""
        return list(self._sizes) if sum(self._sizes) == width else [width]


def _spread_to_tasks(values: dict[str, Tensor], subset: list[int], k: int) -> dict[str, Tensor]:
    """Diagnostics of the sampled tasks ``subset`` placed among all ``k``: per-task and
    per-pair entries of the other tasks NaN, the one-value statistics as they are."""
    from taskbalance.diagnostics import PREFIX

    out = dict(values)
    for name in (f"{PREFIX}/norm", f"{PREFIX}/align"):
        full = torch.full((k,), float("nan"), dtype=values[name].dtype)
        full[subset] = values[name].cpu()
        out[name] = full
    pairs = torch.triu_indices(k, k, offset=1)
    position = {task: i for i, task in enumerate(subset)}
    sub_pairs = torch.triu_indices(len(subset), len(subset), offset=1)
    lookup = {(int(a), int(b)): n for n, (a, b) in enumerate(sub_pairs.T.tolist())}
    cos = torch.full((pairs.shape[1],), float("nan"), dtype=values[f"{PREFIX}/cos"].dtype)
    for n, (a, b) in enumerate(pairs.T.tolist()):
        if a in position and b in position:
            cos[n] = values[f"{PREFIX}/cos"][lookup[(position[a], position[b])]]
    out[f"{PREFIX}/cos"] = cos
    return out
