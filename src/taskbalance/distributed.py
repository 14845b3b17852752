"""Cross-rank agreement of balancers under ``torch.distributed`` (DDP launched by torchrun).

Every balancer has a ``distributed=`` setting: ``"auto"`` (default), ``"off"``, ``"local"``
or a :class:`torch.distributed.ProcessGroup`. With ``"auto"`` a balancer synchronises over the
default process group whenever one is initialised — a world of one included: there the
collectives are trivial, but the representation mode must still keep out of DDP's
gradient hooks (an ordinary backward through a DDP-wrapped body would leave DDP's
reduction unfinished) — and does nothing at all without one: the single-process path is
unchanged, with no collective and no extra work. ``"off"`` never synchronises, and is
refused (:class:`~taskbalance.errors.BalancerUsageError` at the call) while a process group
of two or more ranks is initialised, where it would let the ranks' weights, and models,
drift apart unnoticed. ``"local"`` never synchronises either, anywhere: each rank balances
its own losses (e.g. when every rank trains its own model, or computes a single-process
reference inside a DDP job). A process group synchronises within that group.

What is synchronised, so that every rank takes the same weights at every step and the
update equals a single-process run on the global batch (when every rank has the same
local batch size and the losses are means over the batch, as DDP itself assumes):

* **loss values**: the K losses are averaged over the ranks (one all-reduce of K numbers)
  before the method sees them, so DWA's history, FAMO's log-loss differences, GLS's and
  IMTL-L's weights, the history and the non-finite check are the same everywhere. A
  non-finite loss on any rank therefore skips (or raises) on every rank.
* **exact mode** (``shared=``): the per-task gradients ``J`` (K×P) are averaged over the
  ranks before the Gramian (``G`` of the averaged ``J`` has the cross-rank terms that a
  sum of local Gramians lacks), packed into one all-reduce with the losses and the
  task-specific gradients. Every rank then computes the same weights and the same
  direction, which is the gradient of the global batch.
* **representation mode** (``features=`` or :func:`~taskbalance.gradients.fork`): the rows
  of ``J`` are per-sample blocks, and the feature Jacobian of the global objective
  ``(1/R) sum_r L^r`` is the concatenation of the ranks' ``J^r / R``. Its Gramian is
  ``(1/R²) sum_r J^r J^rᵀ``: one all-reduce of K×K (+K losses). Each rank backpropagates
  ``wᵀJ^r`` through its body and the body's and heads' parameter gradients are averaged,
  as DDP would. Methods that need ``J`` itself (GradDrop) all-gather it instead.
* **random draws** (PCGrad's and GradVac's visiting orders, GradDrop's uniforms, RLW's
  weights): the balancer's generators are broadcast from rank 0 at its first
  synchronised step, so they draw the same numbers on every rank from then on.
* **learnable balancer parameters** (uncertainty weighting, IMTL-L, FAMO, GradNorm): their
  gradients are computed from the averaged losses (and, for GradNorm, averaged gradient
  norms), hence identical on every rank without any communication.

Gradient methods compute per-task gradients with ``torch.autograd.grad``, which does not
run DDP's gradient hooks; the engine does the reduction itself and never lets autograd
accumulate into a parameter that DDP watches, so a DDP model's forward may be used as is
(DDP then simply sees no backward). Loss-weighting methods and GradNorm end in an ordinary
``backward``, whose parameter gradients DDP averages as usual. See ``docs/scaling.md``.

FSDP (``fully_shard``): in the representation mode the body is sharded and the heads are
replicated (:func:`taskbalance.gradients.fsdp_body`). The weights are synchronised exactly
as under DDP (K×K Gramian and K losses in one all-reduce, generators broadcast), the body
gets one ordinary ``backward`` of ``wᵀJ^r`` whose gradients FSDP itself reduce-scatters
(averaged over its ranks), and the heads' gradients are averaged by the balancer. In the
exact mode (:mod:`taskbalance.sharded`) each task's loss gets an ordinary backward that FSDP
reduce-scatters, so each rank holds its shard of every task's global-batch gradient; the
ranks' Gramians of their shards are summed (K×K and the K losses in one all-reduce, exact
since the shards partition the parameters), and each rank writes its shard of ``wᵀJ``. The
Jacobian methods all-gather the ranks' columns of J there instead, in the unsharded model's
order.

Collectives are issued from the calling thread in the same order on every rank, so every
rank must make the same balancer calls (as with DDP's own collectives), with tensors of
the same shapes: the same model structure and, for the exact mode, the same shared
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.errors import BalancerUsageError

try:  # torch.distributed is optional in some builds
    import torch.distributed as dist

    _AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None  # type: ignore[assignment]
    _AVAILABLE = False

#: the values of ``distributed=`` other than a process group.
SETTINGS = ("auto", "off", "local")


def check_setting(setting: Any) -> Any:
    """Validate a ``distributed=`` value: ``"auto"``, ``"off"``, ``"local"`` or a ProcessGroup."""
    if isinstance(setting, str):
        if setting in SETTINGS:
            return setting
    elif _AVAILABLE and isinstance(setting, dist.ProcessGroup):
        return setting
    raise ValueError(
        "distributed must be 'auto', 'off', 'local' or a torch.distributed.ProcessGroup, "
        f"got {setting!r}"
    )


def active_sync(setting: Any) -> Sync | None:
    """The :class:`Sync` to use now for ``setting``, or ``None`` when there is nothing to do.

    ``None`` for ``"off"`` and ``"local"`` and when torch.distributed is unavailable or not
    initialised.

    Raises:
        BalancerUsageError: ``"off"`` while a process group of two or more ranks is
            initialised (the ranks would silently take different weights; ``"local"`` says
            that this is meant).
    """
    if isinstance(setting, str) and setting == "local":
        return None
    if not _AVAILABLE or not dist.is_initialized():
        return None
    if isinstance(setting, str) and setting == "off":
        world = dist.get_world_size()
        if world > 1:
            raise BalancerUsageError(
                f"distributed='off' while a torch.distributed process group of {world} ranks "
                "is initialised: each rank would weight its own local losses, so the ranks "
                "would take different weights and their models would drift apart (silently "
                "where a gradient method writes .grad itself, without DDP's reduction, as in "
                "exact mode). Use distributed='auto' (the default) to keep the ranks on the "
                "same weights, or distributed='local' if every rank is meant to train on its "
                "own (docs/scaling.md)"
            )
        return None
    group = None if isinstance(setting, str) else setting
    world = dist.get_world_size(group)
    return Sync(group, world, dist.get_rank(group))


def check_fsdp_setting(setting: Any) -> None:
    """Refuse ``distributed="local"`` for a body sharded by ``fully_shard`` in a process
    group of two or more ranks: FSDP averages the body's gradients over its ranks, so
    ranks weighting their own losses would mix different objectives in one update."""
    if not (isinstance(setting, str) and setting == "local"):
        return
    if not _AVAILABLE or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    raise BalancerUsageError(
        "distributed='local' with a body sharded by fully_shard: FSDP averages the body's "
        "gradients over its ranks, so ranks that weight their own losses would combine "
        "different weights in one update (and their replicated heads would drift apart). "
        "Use distributed='auto' (the default) or the FSDP module's process group, so that "
        "every rank takes the same weights (docs/scaling.md)"
    )


class Sync:
    """Collectives over one process group, as the balancers need them.

    Every method is a collective: all ranks of the group must call it, in the same order,
    with tensors of the same shapes and dtypes.
    """

    def __init__(self, group: Any, world_size: int, rank: int) -> None:
        self.group = group
        self.world_size = world_size
        self.rank = rank

    def __repr__(self) -> str:
        return f"Sync(rank={self.rank}, world_size={self.world_size})"

    def _comm_device(self, device: torch.device) -> torch.device:
        """Where a tensor on ``device`` must be for the group's backend (NCCL: a GPU)."""
        if device.type == "cpu" and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def all_reduce(
        self, tensors: Sequence[Tensor], scales: Sequence[float] | float = 1.0
    ) -> list[Tensor]:
        """Each tensor summed over the ranks, times its scale; new tensors, inputs untouched.

        Tensors of the same dtype and device travel in one flat buffer: one collective
        per (dtype, device) present, in order of first appearance.
        """
        items = [t.detach() for t in tensors]
        factors = [float(scales)] * len(items) if isinstance(scales, (int, float)) else scales
        if len(factors) != len(items):
            raise ValueError(f"{len(factors)} scales for {len(items)} tensors")
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(items):
            buckets.setdefault((t.dtype, t.device), []).append(i)
        out: list[Tensor] = [torch.empty(0)] * len(items)
        for (_, device), indices in buckets.items():
            flat = torch.cat([items[i].reshape(-1) for i in indices])
            wire = flat.to(self._comm_device(device))
            dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.group)
            flat = wire.to(device)
            offset = 0
            for i in indices:
                n = items[i].numel()
                piece = flat[offset : offset + n].view_as(items[i])
                out[i] = piece * factors[i] if factors[i] != 1.0 else piece
                offset += n
        return out

    def mean_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over the ranks in place (no copy of a large buffer); return it."""
        device = self._comm_device(tensor.device)
        wire = tensor if device == tensor.device else tensor.to(device)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.group)
        if wire is not tensor:
            tensor.copy_(wire)
        return tensor.div_(self.world_size)

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor averaged over the ranks (one collective per dtype and device)."""
        return self.all_reduce(tensors, 1.0 / self.world_size)

    def broadcast_generator(self, generator: torch.Generator, src: int = 0) -> None:
        """Give ``generator`` the state of rank ``src``'s generator (CPU generators)."""
        state = generator.get_state()
        wire = state.to(self._comm_device(state.device))
        dist.broadcast(wire, src=self._global_rank(src), group=self.group)
        generator.set_state(wire.to(state.device))

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_gather_columns(self, matrix: Tensor) -> tuple[Tensor, int]:
        """``(cat_r matrix_r along dim 1, this rank's column offset)``; widths may differ."""
        device = self._comm_device(matrix.device)
        width = torch.tensor([matrix.shape[1]], dtype=torch.int64, device=device)
        widths = [torch.empty_like(width) for _ in range(self.world_size)]
        dist.all_gather(widths, width, group=self.group)
        sizes = [int(w.item()) for w in widths]
        widest = max(sizes)
        padded = torch.zeros(matrix.shape[0], widest, dtype=matrix.dtype, device=device)
        padded[:, : matrix.shape[1]] = matrix.detach().to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        full = torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1).to(matrix.device)
        return full, sum(sizes[: self.rank])
