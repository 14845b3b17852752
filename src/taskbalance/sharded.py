"""The exact mode (``shared=``) of the gradient methods on a body sharded by ``fully_shard``.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the forward runs on FSDP's unsharded
copies of the parameters, and ``torch.autograd.grad`` with respect to them would give
gradients that FSDP's reduce-scatter never sees. So the per-task gradients are taken
through FSDP's own path instead:

1. **K ordinary backward passes** (``loss_i.backward(retain_graph=...)``), one per task.
   FSDP's hooks run at each: the body is all-gathered, its gradient reduce-scattered (and
   averaged over the ranks) into the sharded parameters' ``.grad`` (DTensors), and the
   copies freed again. After pass i the engine copies the local shard of every shared
   parameter's gradient into row i of this rank's ``J_s`` (K × P_local, the rank's columns
   of the global-batch Jacobian) and clears ``.grad`` for the next pass. The gradients the
   user had accumulated before the call are set aside first and put back at the end.
2. **One all-reduce** of the local Gramian ``J_s J_sᵀ`` (K×K) and the K losses: the shards
   partition the parameters, so ``G = Σ_s J_s J_sᵀ`` is the Gramian of the whole J, exact,
   and every rank computes the same weights from it.
3. Each rank adds its shard of ``d = wᵀJ_s`` to the sharded ``.grad`` (times ``1/N`` under
   ``accumulation_steps=N``), where the optimizer finds it as after any FSDP backward.

**Methods that need J itself** (``needs == "jacobian"``: GradDrop, DB-MTL, MoCo,
Excess-MTL, M-ConFIG, LR annealing, MetaBalance) get the full J instead of the Gramian: the
K losses are all-reduced first (a non-finite one skips the step on every rank before
anything else moves), then the ranks' ``J_s`` are **all-gathered** (one collective of K×P,
each rank's block padded to the widest) and assembled on every rank in the column order of
the unsharded model, which is the order of a single process's J: for each shared parameter
in the order of ``shared=``, its flattened values. FSDP shards each parameter along one
dimension (dim 0 by default) as ``torch.chunk`` does, so a rank's shard is a block of that
dimension's rows, possibly shorter than the others' or empty; the layout comes from FSDP's
parameter metadata, without a collective. ``bal.aggregate(J, losses)`` then runs as in one
process: the same J, the same global losses, the same state (DB-MTL's EMA, MoCo's Y,
M-ConFIG's momenta: K×P in that order, equal on every rank and to one process's), and
GradDrop's uniforms, drawn per column from a generator broadcast from rank 0, are one
process's draws. The per-tensor methods (LR annealing's ``"code"`` variant, MetaBalance)
are given the numels of the unsharded tensors. The full direction is checked, the
diagnostics come from the full J and that direction, and each rank writes the columns of
its own shards. **Memory**: every rank holds the whole K×P J (twice, while it is assembled
from the gathered blocks), which is the memory FSDP otherwise saves; the Gramian methods
keep K×P/R.

**Heads** (task-specific parameters, every parameter a loss reaches that is not in
``shared=``) must be outside ``fully_shard``: plain modules, replicated on every rank. Pass
i gives head i its task's gradient (the others' losses do not reach it), which the engine
takes out of ``.grad``, weights (``task_specific="weighted"``) and scales like the exact
mode does, and the balancer averages over the ranks at the end of the step (as in the
features mode under FSDP). A head inside ``fully_shard`` is refused: FSDP's
reduce-scatter would hand its gradient shard to no rule of the engine's.

Refused, each with the fix: a parameter sharded by ``fully_shard`` that a loss reaches and
``shared=`` does not hold (a head inside FSDP, or a part of the body left out of
``shared=``), ``shared=`` mixing sharded and unsharded parameters, hybrid or 2-D meshes
(HSDP, FSDP with tensor parallelism), gradient sync turned off on the body
(``set_requires_gradient_sync(False)``: use ``accumulation_steps=``) or an unsharded
gradient it left unreduced, a balancer whose process group is not the size of FSDP's,
``distributed="local"`` on two or more ranks, the methods with a step of their own
(MoDo), and ``jacobian_free=True``.

The diagnostics of a loss-weighting method (``diagnostics=``, ``shared=`` sharded) take the
task Gramian the same way (:func:`fsdp_task_gramian`: the K passes with the graph kept, every
``.grad`` put back as it was, the heads' gradients dropped, so heads inside ``fully_shard``
are fine there), before the method's own backward of the combined loss.

Cost per step, with P the body's parameters and R the ranks: K backward passes through the
body (the exact mode's K passes, as everywhere), each with FSDP's all-gather and
reduce-scatter of P (K times those of a plain FSDP step), one all-reduce of K² + K numbers,
and the heads' ``P_h`` averaged at the end of the step. The memory of J is K·P/R per rank.
A method that needs J itself: the K losses all-reduced, then an all-gather of J (K·P
numbers received per rank, K·P/R sent), instead of the K² + K all-reduce; K·P of J on every
rank (2·K·P while it is assembled).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taskbalance.balancer import Losses, _SkipStepError
from taskbalance.distributed import Sync, check_fsdp_setting
from taskbalance.errors import BalancerUsageError
from taskbalance.gradients import (
    TaskGradients,
    _reachable_leaves,
    apply_task_specific,
    compile_hint,
    describe_tensors,
    jacobian_dtype,
    parameter_names,
    resolve_tensors,
    sharding_possible,
)
from taskbalance.gradients import gramian as compute_gramian

if TYPE_CHECKING:
    from taskbalance.aggregation.base import GradientBalancer


def _fsdp2_params() -> dict[int, tuple[Any, Any]]:
    """``{id(tensor): (FSDPParam, its parameter group)}`` for every parameter ``fully_shard``
    manages now, keyed by both its sharded parameter and its unsharded copy (autograd's
    leaf in the forward)."""
    registry = sys.modules.get("torch.distributed._composable_state")
    mapping = getattr(registry, "_module_state_mapping", None)
    found: dict[int, tuple[Any, Any]] = {}
    if not mapping:
        return found
    for ref in list(mapping.values()):
        state = ref() if isinstance(ref, weakref.ref) else ref
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            for fsdp_param in getattr(group, "fsdp_params", ()):
                for attr in ("sharded_param", "_unsharded_param"):
                    param = getattr(fsdp_param, attr, None)
                    if param is not None:
                        found[id(param)] = (fsdp_param, group)
    return found


@dataclass
class ShardedShared:
    """``shared=`` resolved under ``fully_shard``: its tensors, their FSDP parameters (in
    the order of ``shared=``, each once) and the map of every FSDP-managed tensor."""

    shared: Any
    tensors: list[Tensor]
    params: list[Any]
    managed: dict[int, tuple[Any, Any]] = field(repr=False)


def fsdp_shared(shared: Any) -> ShardedShared | None:
    """``shared=`` as parameters sharded by ``fully_shard``, or ``None`` when none of its
    tensors is (the ordinary exact mode, which refuses FSDP1 and bare DTensors itself).
    Costs nothing unless FSDP or DTensor was imported and a process group is initialised.

    Raises:
        BalancerUsageError: ``shared=`` mixes parameters sharded by ``fully_shard`` with
            others.
    """
    if shared is None or not sharding_possible():
        return None
    managed = _fsdp2_params()
    if not managed:
        return None
    tensors = resolve_tensors(shared)
    if not any(id(t) in managed for t in tensors):
        return None
    outside = [t for t in tensors if id(t) not in managed]
    if outside:
        raise BalancerUsageError(
            f"shared= mixes parameters sharded by fully_shard with {len(outside)} that are "
            f"not ({describe_tensors(outside, parameter_names(shared))}): the exact mode "
            "under FSDP takes every shared gradient from FSDP's reduce-scatter, and these "
            "would get none. Apply fully_shard to the module that holds them too (e.g. "
            "fully_shard(model.body) after its blocks), or leave them out of shared="
        )
    params: list[Any] = []
    seen: set[int] = set()
    for t in tensors:
        fsdp_param = managed[id(t)][0]
        if id(fsdp_param) not in seen:
            seen.add(id(fsdp_param))
            params.append(fsdp_param)
    return ShardedShared(shared, tensors, params, managed)


def _check_method(bal: GradientBalancer) -> None:
    """Refuse the methods whose step does not go through this module's path."""
    from taskbalance.aggregation.base import GradientBalancer

    name = type(bal).__name__
    if getattr(bal, "jacobian_free", False):
        raise BalancerUsageError(
            f"{name}(jacobian_free=True) on a body sharded by fully_shard: the layer-by-layer "
            "Gramian does not go through FSDP's reduce-scatter. Leave jacobian_free=False "
            "(under fully_shard each rank stores only its K×P/R shard of J), or use the "
            "features mode (features=z or tb.fork)"
        )
    if type(bal)._backward is not GradientBalancer._backward:
        raise BalancerUsageError(
            f"{name} has a step of its own, which does not go through the exact mode's path "
            "for a body sharded by fully_shard. Use the features mode (features=z or "
            "zs = tb.fork(z, K)) or DDP; see docs/scaling.md"
        )


def _check_groups(layout: ShardedShared, world: int | None) -> None:
    """Refuse FSDP settings under which the rank's gradient shards are not a partition of
    the global-batch gradient: hybrid or 2-D meshes, gradient sync off, another group size."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo

    names = parameter_names(layout.shared)
    for fsdp_param in layout.params:
        param = fsdp_param.sharded_param
        mesh_info = fsdp_param.mesh_info
        what = describe_tensors([param], names)
        if isinstance(mesh_info, DDPMeshInfo) or param.device_mesh.ndim != 1:
            raise BalancerUsageError(
                f"{what} is sharded on a mesh of {param.device_mesh.ndim} dimensions (HSDP, "
                "or FSDP with tensor parallelism): the exact mode under fully_shard supports "
                "a 1-D mesh, where the ranks' shards partition each parameter. Use a 1-D mesh "
                "(fully_shard's default), or the features mode (features=z or tb.fork)"
            )
        size = mesh_info.shard_mesh_size
        if world is not None and size != world:
            raise BalancerUsageError(
                f"{what} is sharded over {size} ranks but the balancer synchronises {world}: "
                "the weights come from the Gramian summed over FSDP's ranks. Give the "
                "balancer FSDP's process group (distributed=group), or leave distributed= at "
                "'auto' when FSDP uses the default group"
            )
    for fsdp_param in layout.params:
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        pending = getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None or (
            unsharded is not None and unsharded.grad is not None
        )
        if pending:
            raise BalancerUsageError(
                f"{describe_tensors([fsdp_param.sharded_param], names)} holds an unsharded "
                "gradient that FSDP has not reduce-scattered yet (a backward run with "
                "set_requires_gradient_sync(False)): FSDP would add it to the first task's "
                "gradient shard. Run that backward with gradient sync on (set_requires_"
                "gradient_sync(True) before it), or accumulate with the balancer's "
                "accumulation_steps=N"
            )
    for group in {id(g): g for _, g in (layout.managed[id(t)] for t in layout.tensors)}.values():
        if not getattr(group, "reduce_grads", True):
            raise BalancerUsageError(
                "gradient sync is off on the sharded body (set_requires_gradient_sync(False)): "
                "the exact mode under fully_shard takes each task's gradient shard from "
                "FSDP's reduce-scatter, which would not run. For gradient accumulation give "
                "the balancer accumulation_steps=N (each call then adds 1/N of its "
                "micro-batch's direction) and keep gradient sync on"
            )


@dataclass
class _Plan:
    """Who each loss reaches: ``own[i]`` task i's heads (plain leaves), ``single`` the shared
    FSDP parameters one task alone reaches (``(index in params, task)``), ``other`` the
    sharded parameters outside ``shared=`` (``strict=False`` only)."""

    own: list[list[Tensor]]
    single: list[tuple[int, int]]
    other: list[Tensor] = field(default_factory=list)


def _plan(
    layout: ShardedShared, losses: Sequence[Tensor], tasks: Sequence[str], strict: bool = True
) -> _Plan:
    """Walk each loss's graph (nothing is computed): every leaf it reaches is a shared
    FSDP parameter or a plain head of this task alone; anything else is refused, except,
    with ``strict=False`` (a Gramian for the diagnostics, no gradient written), sharded
    parameters outside ``shared=``, listed in :attr:`_Plan.other`."""
    shared_params = {id(p): j for j, p in enumerate(layout.params)}
    reached: dict[int, set[int]] = {}
    owners: dict[int, int] = {}
    own: list[list[Tensor]] = []
    other: dict[int, Tensor] = {}
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            raise BalancerUsageError(f"loss of task {tasks[i]!r} does not require grad")
        mine: list[Tensor] = []
        hits_shared = False
        for leaf in _reachable_leaves(loss, set()):
            entry = layout.managed.get(id(leaf))
            if entry is None:
                if owners.get(id(leaf), i) != i:
                    raise BalancerUsageError(
                        f"a parameter of shape {tuple(leaf.shape)} is used by tasks "
                        f"{tasks[owners[id(leaf)]]!r} and {tasks[i]!r} but is not in shared "
                        "(and not sharded by fully_shard); shard it with the body and pass it "
                        "as shared" + compile_hint([loss])
                    )
                owners[id(leaf)] = i
                mine.append(leaf)
                continue
            j = shared_params.get(id(entry[0]))
            if j is None and not strict:
                other.setdefault(id(entry[0]), entry[0].sharded_param)
                continue
            if j is None:
                raise BalancerUsageError(
                    f"the loss of task {tasks[i]!r} reaches a parameter sharded by fully_shard "
                    f"that shared= does not hold (shape {tuple(entry[0].sharded_param.shape)}"
                    "): a head inside fully_shard, or a part of the body left out of shared=. "
                    "Its gradient shard would be written by FSDP's reduce-scatter and combined "
                    "by no rule. Apply fully_shard to the body only (fully_shard(model.body), "
                    f"each of its blocks first if you like), keep the {len(losses)} heads out "
                    "of it (replicated; the balancer averages them over the ranks), and pass "
                    "shared=model.body; see docs/scaling.md"
                )
            hits_shared = True
            reached.setdefault(j, set()).add(i)
        if not hits_shared:
            raise BalancerUsageError(
                f"loss of task {tasks[i]!r} does not depend on the shared parameters"
                + compile_hint([loss])
            )
        own.append(mine)
    single = (
        [(j, next(iter(ts))) for j, ts in sorted(reached.items()) if len(ts) == 1]
        if len(losses) >= 2
        else []
    )
    return _Plan(own, single, list(other.values()))


def _set_aside(tensors: Sequence[Tensor]) -> list[Tensor | None]:
    """Take the ``.grad`` of ``tensors`` out (returned, in order), leaving ``None``."""
    saved = []
    for t in tensors:
        saved.append(t.grad)
        t.grad = None
    return saved


def _put_back(tensors: Sequence[Tensor], saved: Sequence[Tensor | None]) -> None:
    for t, grad in zip(tensors, saved):
        t.grad = grad


def _capture(
    layout: ShardedShared,
    plan: _Plan,
    losses: Sequence[Tensor],
    dtype: torch.dtype,
    retain_graph: bool = False,
) -> tuple[Tensor, list[list[tuple[Tensor, Tensor]]]]:
    """The K (or subset) backward passes: ``(J_s, each task's head gradients)``. Expects
    every ``.grad`` involved to be ``None``; leaves them ``None`` (but those of
    :attr:`_Plan.other`). ``retain_graph``: keep the graph after the last pass too."""
    sharded = [p.sharded_param for p in layout.params]
    locals_ = [p.to_local() for p in sharded]
    width = sum(t.numel() for t in locals_)
    device = locals_[0].device if locals_ else torch.device("cpu")
    jac = torch.zeros(len(losses), width, dtype=dtype, device=device)
    own: list[list[tuple[Tensor, Tensor]]] = []
    last = len(losses) - 1
    for i, loss in enumerate(losses):
        torch.autograd.backward(loss, retain_graph=retain_graph or i < last)
        offset = 0
        for param, local in zip(sharded, locals_):
            n = local.numel()
            grad = param.grad
            if grad is not None:
                piece = grad.to_local() if hasattr(grad, "to_local") else grad
                jac[i, offset : offset + n].copy_(piece.reshape(-1))
                param.grad = None
            offset += n
        pairs = []
        for head in plan.own[i]:
            if head.grad is not None:
                pairs.append((head, head.grad))
                head.grad = None
        own.append(pairs)
    return jac, own


def _write_direction(layout: ShardedShared, direction: Tensor) -> None:
    """Add each sharded parameter's piece of this rank's direction to its ``.grad``."""
    from torch.distributed.tensor import DTensor

    offset = 0
    for fsdp_param in layout.params:
        param = fsdp_param.sharded_param
        local = param.to_local()
        n = local.numel()
        piece = direction[offset : offset + n].view(local.shape).to(local.dtype)
        offset += n
        if param.grad is not None:
            existing = param.grad
            (existing.to_local() if isinstance(existing, DTensor) else existing).add_(piece)
            continue
        param.grad = DTensor.from_local(
            piece,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )


def _chunk_spans(size: int, world: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each rank's rows of a dimension of ``size`` rows: the split of
    ``torch.chunk`` (chunks of ``ceil(size / world)``, the last ranks' shorter or empty),
    which ``fully_shard`` uses."""
    chunk = -(-size // world)
    spans = []
    for rank in range(world):
        start = min(size, rank * chunk)
        spans.append((start, min(size, start + chunk) - start))
    return spans


@dataclass
class _Blocks:
    """Where each rank's columns of J sit among those of the unsharded model: per shared
    parameter (in the order of ``shared=``, the canonical order of a single process's J) its
    unsharded shape, the dimension FSDP shards it along and each rank's ``(start, length)``
    along that dimension (``spans[j][rank]``)."""

    shapes: list[torch.Size]
    dims: list[int]
    spans: list[list[tuple[int, int]]]

    def sizes(self) -> list[int]:
        """The numels of the unsharded parameters (the column blocks of the full J)."""
        return [shape.numel() for shape in self.shapes]

    def width(self, rank: int) -> int:
        """The number of columns of J that ``rank`` holds."""
        return sum(
            spans[rank][1] * (shape.numel() // shape[dim] if shape[dim] else 0)
            for shape, dim, spans in zip(self.shapes, self.dims, self.spans)
        )


def _blocks(layout: ShardedShared, sync: Sync | None) -> _Blocks:
    """The layout of the ranks' shards of ``shared=`` in the unsharded model's columns, from
    FSDP's parameter metadata (no collective). The shards are all-gathered in the rank order
    of the balancer's group, whose size :func:`_check_groups` has checked to be FSDP's; that
    FSDP gave this rank the shard this layout assigns it is checked here (else an internal
    error, never seen: J's columns would be assembled in the wrong order)."""
    from torch.distributed.tensor import Shard

    world = 1 if sync is None else sync.world_size
    rank = 0 if sync is None else sync.rank
    shapes, dims, all_spans = [], [], []
    for fsdp_param in layout.params:
        param = fsdp_param.sharded_param
        (placement,) = param.placements
        dim = placement.dim if isinstance(placement, Shard) else -1
        spans = _chunk_spans(param.shape[dim], world) if dim >= 0 else []
        expected = list(param.shape)
        if spans:
            expected[dim] = spans[rank][1]
        mesh_rank = fsdp_param.mesh_info.shard_mesh_rank
        if not spans or mesh_rank != rank or tuple(param.to_local().shape) != tuple(expected):
            raise RuntimeError(  # pragma: no cover - FSDP2 on a 1-D mesh shards as torch.chunk
                f"taskbalance: FSDP's shard {tuple(param.to_local().shape)} (placement "
                f"{placement!r}, mesh rank {mesh_rank}) of a parameter of shape "
                f"{tuple(param.shape)} is not the one expected on rank {rank} of {world} "
                f"({tuple(expected)}); please report this with your torch version"
            )
        shapes.append(param.shape)
        dims.append(dim)
        all_spans.append(spans)
    return _Blocks(shapes, dims, all_spans)


def _gather_jacobian(jac: Tensor, blocks: _Blocks, sync: Sync | None) -> Tensor:
    """The full K×P Jacobian, in the unsharded model's column order, on every rank: one
    all-gather of the ranks' ``K × P_local`` shards (padded to the widest), then each rank's
    rows of each parameter copied into place (uneven shards and empty ones included)."""
    k = jac.shape[0]
    world = 1 if sync is None else sync.world_size
    widths = [blocks.width(r) for r in range(world)]
    if sync is None or world == 1:
        parts = [jac]
    else:
        import torch.distributed as dist

        device = sync._comm_device(jac.device)
        padded = torch.zeros(k, max(widths), dtype=jac.dtype, device=device)
        padded[:, : jac.shape[1]] = jac.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=sync.group)
        parts = [part.to(jac.device) for part in gathered]
    full = jac.new_empty(k, sum(blocks.sizes()))
    offsets = [0] * world
    base = 0
    for shape, dim, spans in zip(blocks.shapes, blocks.dims, blocks.spans):
        n = shape.numel()
        target = full[:, base : base + n].view(k, *shape)
        for rank, (start, length) in enumerate(spans):
            local = list(shape)
            local[dim] = length
            width = math.prod(local)
            piece = parts[rank][:, offsets[rank] : offsets[rank] + width]
            target.narrow(1 + dim, start, length).copy_(piece.view(k, *local))
            offsets[rank] += width
        base += n
    return full


def _local_direction(direction: Tensor, blocks: _Blocks, rank: int) -> Tensor:
    """This rank's columns of the full direction ``(P,)``, in the order of its shards (a new
    tensor: a Jacobian method's direction may be its state)."""
    pieces = []
    base = 0
    for shape, dim, spans in zip(blocks.shapes, blocks.dims, blocks.spans):
        n = shape.numel()
        start, length = spans[rank]
        pieces.append(direction[base : base + n].view(shape).narrow(dim, start, length))
        base += n
    return torch.cat([piece.reshape(-1) for piece in pieces]) if pieces else direction[:0].clone()


def fsdp_exact_backward(
    bal: GradientBalancer, losses: Losses, layout: ShardedShared
) -> Tensor | None:
    """:meth:`GradientBalancer.backward` in the exact mode on ``shared=`` sharded by
    ``fully_shard`` (see the module docstring); returns the weights, ``None`` for a skipped
    step. Every check runs before the first backward pass, so a refused call writes
    nothing; a call that raises later puts the gradients set aside back."""
    from taskbalance.aggregation.base import PerTensorBalancer

    _check_method(bal)
    check_fsdp_setting(bal.distributed)
    sync = bal.current_sync()
    _check_groups(layout, None if sync is None else sync.world_size)
    # a method that needs J itself: the ranks' columns all-gathered in the canonical order
    blocks = _blocks(layout, sync) if bal.needs == "jacobian" else None
    boundary, items, local = bal.open_call(losses)
    bal.mode = "exact"
    k = bal.num_tasks
    heads: list[Tensor] = []
    saved: list[Tensor | None] = []
    sharded: list[Tensor] = []
    try:
        stacked = bal._check_finite(local) if sync is None else None
        subset = bal._draw_subset()
        rows = list(range(k)) if subset is None else subset
        plan = _plan(layout, [items[i] for i in rows], [bal.tasks[i] for i in rows])
        sharded = [p.sharded_param for p in layout.params]
        bal.warn_heads_once([(sharded[j], rows[i]) for j, i in plan.single], layout.shared)
        heads = [h for own in plan.own for h in own]
        saved = _set_aside(sharded + heads)
        dtype = jacobian_dtype(sharded)
        jac_rows, own_rows = _capture(layout, plan, [items[i] for i in rows], dtype)
        if subset is None:
            jac, own = jac_rows, own_rows
        else:  # the sampled tasks' rows; zero rows and no heads for the others
            jac = jac_rows.new_zeros(k, jac_rows.shape[1])
            jac[torch.tensor(rows, device=jac.device)] = jac_rows
            own = [[] for _ in range(k)]
            for row, task in enumerate(rows):
                own[task] = own_rows[row]
        if blocks is None:
            gram = compute_gramian(jac).double()
            if sync is not None:
                scales = [1.0 / sync.world_size, 1.0]
                loss_sum, gram = sync.all_reduce([local.double(), gram], scales)
                stacked = bal._check_finite(loss_sum.to(local.dtype))
        elif sync is not None:  # the losses first: a skipped step gathers nothing
            loss_sum = sync.all_reduce([local.double()], 1.0 / sync.world_size)[0]
            stacked = bal._check_finite(loss_sum.to(local.dtype))
        assert stacked is not None
        with bal._state_restored_on_error():
            bal._restore_micro()
            if blocks is None:
                weights = bal.scaled_weights(gram, stacked).to(jac.dtype)
                direction = weights @ jac
                full = None  # diagnostics from the global Gramian, the same on every rank
            else:  # the full J, the same on every rank, as one process's
                full = _gather_jacobian(jac, blocks, sync)
                if isinstance(bal, PerTensorBalancer):  # the unsharded tensors' numels
                    bal._sizes = blocks.sizes()
                direction, weights = bal.aggregate(full, stacked)
            bal._check_result(direction, weights)
            if bal._diag_due:
                bal._diagnose(full, direction, weights)
        if blocks is not None:
            direction = _local_direction(direction, blocks, 0 if sync is None else sync.rank)
    except _SkipStepError as err:
        _put_back(sharded + heads, saved)
        bal._skip(err)
        bal._end_call(None, None, boundary, sync)
        return None
    except BaseException:
        _put_back(sharded + heads, saved)
        raise
    _put_back(sharded + heads, saved)
    if bal._diag_due:
        bal._commit_diagnostics()
    scale = bal.micro_scale()
    if scale is not None:
        direction = direction * scale
    _write_direction(layout, direction)
    grads = TaskGradients(jac, sharded, own)
    apply_task_specific(grads, weights if bal.task_specific == "weighted" else None, scale)
    if sync is not None:
        bal.touch(heads)  # replicated: averaged over the ranks when the step closes
    bal._end_call(stacked, weights, boundary, sync)
    return bal.last_weights


def fsdp_task_gramian(
    layout: ShardedShared, losses: Sequence[Tensor], tasks: Sequence[str], sync: Sync | None
) -> tuple[Tensor, str | None]:
    """The float64 Gramian of the task gradients over ``shared=`` sharded by ``fully_shard``,
    for the diagnostics of a loss-weighting method: ``Σ_s J_s J_sᵀ`` from the K backward
    passes of :func:`fsdp_exact_backward` (the same on every rank), the graph kept and every
    ``.grad`` as it was. Also the description of the shared tensors one task alone reaches
    (``None``: none). Heads may be inside ``fully_shard`` here: their gradients are dropped.
    """
    _check_groups(layout, 1 if sync is None else sync.world_size)
    plan = _plan(layout, losses, tasks, strict=False)
    sharded = [p.sharded_param for p in layout.params]
    touched = sharded + [h for own in plan.own for h in own] + plan.other
    saved = _set_aside(touched)
    try:
        jac, _ = _capture(layout, plan, losses, jacobian_dtype(sharded), retain_graph=True)
    finally:
        _put_back(touched, saved)
    gram = compute_gramian(jac).double()
    if sync is not None:
        gram = sync.all_reduce([gram])[0]
    single = None
    if plan.single:
        found = [sharded[j] for j, _ in plan.single]
        single = describe_tensors(found, parameter_names(layout.shared), limit=4)
    return gram, single
