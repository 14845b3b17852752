"""The gradient engine: per-task gradients, the Jacobian J and the Gramian G = J Jᵀ.

Two modes, chosen by what the caller passes to ``balancer.backward``:

* **exact** (``shared=`` only): row i of J is the gradient of L_i with respect to the
  shared parameters, flattened. One ``autograd.grad`` call per task (the arithmetic floor
  for exact per-task gradients); the last call frees the graph.
* **features** (``features=`` given; MGDA-UB style "representation" mode): row i of J is
  the gradient of L_i with respect to the shared features Z (what the shared body
  outputs), so the K backward passes run through the heads only, and the body sees one
  ordinary backward of ``Z.backward(sum_i w_i dL_i/dZ)``.

Task-specific parameters (every parameter a loss reaches that is not shared, or, in
features mode, that lies between Z and the loss) get their own task's gradient, taken in
the same backward pass as the task's row of J. By default it is **unweighted**
(``dL_i/dθ_i``, as in MGDA's and torchjd's treatment of task-specific parameters);
``task_specific="weighted"`` gives ``w_i dL_i/dθ_i`` instead, i.e. exactly the gradient of
``sum_i w_i L_i``. A parameter reached by two or more tasks that is not declared shared is
an error: its gradient would otherwise be combined by no rule at all.

In features mode ``shared=`` is not used: the update reaches every parameter the features
depend on (one backward from Z), and every parameter after Z is task-specific. The balancer
checks ``shared=`` against the features once and warns when it holds parameters the features
do not depend on (e.g. ``shared=model`` with the heads). Refused in features mode, each of
which would train silently wrong: a loss that does not depend on the features (computed from
a second forward pass or a copy; named before any other check can misread it), the same
feature given twice (the update would be multiplied), and, at the balancer's first call, a
loss that reaches a body parameter other than through the features (that part of its
gradient would skip the balancing). In exact mode a tensor of ``shared``
that only one task reaches looks like a head passed as shared: it would enter J and get the
combined update instead of its task's gradient; the balancer warns once
(:attr:`TaskGradients.single`).

Parameters sharded by FSDP: the features mode (and :func:`fork`) works on a body sharded
with ``fully_shard`` (FSDP2), heads outside it (:func:`fsdp_body`): the K per-task passes
stop at the features, and the body gets one ordinary backward, which FSDP reduce-scatters
itself. The exact mode does not use ``autograd.grad`` on a ``shared=`` sharded by
``fully_shard`` (its gradients would be taken on the unsharded copies that FSDP's
reduce-scatter never sees): :mod:`taskbalance.sharded` takes each task's gradient shard from
an ordinary backward pass that FSDP reduce-scatters, and all-reduces the K×K Gramian.
``FullyShardedDataParallel`` (FSDP1), bare DTensors and heads managed by FSDP are refused in
every mode (:func:`check_not_sharded`). The checks cost one dictionary look-up unless FSDP
or DTensor was imported and a process group is initialised.

Under DDP (see :mod:`taskbalance.distributed`) the engine reduces across ranks itself:
``torch.autograd.grad`` never runs DDP's gradient hooks, so in the features mode the body
is backpropagated with :func:`backprop_to_leaves` (no accumulation into a parameter that
DDP watches) and the resulting gradients are averaged by the balancer.

Precision: J is accumulated in the promoted dtype of the inputs, at least float32
(:func:`jacobian_dtype`), so that fp16/bf16 gradients give a float32 Gramian that neither
overflows (an fp16 ``g_i·g_j`` of scaled gradients exceeds 65504 long before the gradients
do) nor loses digits; the combined direction is cast back to each input's dtype when it is
applied. For float32 (and float64) inputs nothing is converted or copied. The balancers
run the engine with autocast disabled (:func:`autocast_disabled`), so that calling them
inside an autocast region computes the same products as outside it.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taskbalance.errors import BalancerUsageError


def jacobian_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype J is accumulated in: the promoted dtype of ``tensors``, at least float32.

    fp16 and bf16 give float32; float32 stays float32 and float64 stays float64.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def autocast_disabled(reference: Tensor | None) -> contextlib.AbstractContextManager[None]:
    """A context in which autocast is off for ``reference``'s device type.

    Inside an autocast region the engine's products (``J Jᵀ``, ``wᵀJ``) would be autocast
    to bf16/fp16 and, in exact mode, a low-precision direction could not be assigned to a
    float32 ``.grad``. ``None`` (no tensor to go by) and a device type autocast does not
    know (e.g. ``meta``) give a no-op context.
    """
    if reference is None:
        return contextlib.nullcontext()
    device_type = reference.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()  # nothing to turn off (the usual case)
    return torch.autocast(device_type=device_type, enabled=False)


#: what each argument given to :func:`resolve_tensors` must hold, for its error message.
_EXPECTED = {
    "shared": "pass the shared trunk (e.g. shared=model.body or model.shared_parameters())",
    "last_shared=": (
        "it must be the last shared layer, which every task's loss passes through (e.g. "
        "last_shared=model.body[-1], or its weight), with parameters that require grad"
    ),
}


def resolve_tensors(
    shared: nn.Module | Tensor | Iterable[Tensor], what: str = "shared"
) -> list[Tensor]:
    """The distinct tensors requiring grad in ``shared`` (a module, a tensor or an iterable).

    ``what`` names the argument in the error raised when there is none (``"shared"``,
    ``"last_shared="``).
    """
    if isinstance(shared, nn.Module):
        items: Iterable[Tensor] = shared.parameters()
    elif isinstance(shared, Tensor):
        items = [shared]
    else:
        items = shared
    seen: set[int] = set()
    out = []
    for t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must hold tensors, got a {type(t).__name__}")
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    if not out:
        hint = _EXPECTED.get(what, "")
        raise BalancerUsageError(
            f"{what} holds no tensor that requires grad" + (f"; {hint}" if hint else "")
        )
    return out


def parameter_names(module: object) -> dict[int, str]:
    """``{id(parameter): name}`` of a module's parameters (empty for anything else)."""
    if not isinstance(module, nn.Module):
        return {}
    return {id(p): name for name, p in module.named_parameters()}


def describe_tensors(tensors: Sequence[Tensor], names: dict[int, str], limit: int = 8) -> str:
    """``"body.0.weight, body.0.bias"``, or shapes where no name is known; at most ``limit``."""
    shown = [names.get(id(t)) or f"a tensor of shape {tuple(t.shape)}" for t in tensors[:limit]]
    more = len(tensors) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------- FSDP / DTensor
def sharding_possible() -> bool:
    """Whether a sharded parameter can exist at all: FSDP or DTensor imported and a process
    group initialised. Two dictionary look-ups in the usual case."""
    modules = sys.modules
    if "torch.distributed.fsdp" not in modules and "torch.distributed.tensor" not in modules:
        return False
    distributed = modules.get("torch.distributed")
    return bool(
        distributed is not None and distributed.is_available() and distributed.is_initialized()
    )


def _fsdp2_parameter_ids() -> set[int]:
    """The ids of every parameter that ``fully_shard`` (FSDP2) manages now: the sharded
    DTensors and the unsharded copies the forward uses (autograd's leaves)."""
    registry = sys.modules.get("torch.distributed._composable_state")
    mapping = getattr(registry, "_module_state_mapping", None)
    ids: set[int] = set()
    if not mapping:
        return ids
    for module, ref in list(mapping.items()):
        state = ref() if isinstance(ref, weakref.ref) else ref
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            if "FSDP" in type(state).__name__:  # a layout this code does not know: the module's
                ids.update(id(p) for p in module.parameters())
            continue
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                for attr in ("sharded_param", "_unsharded_param"):
                    param = getattr(fsdp_param, attr, None)
                    if param is not None:
                        ids.add(id(param))
    return ids


def sharded_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Those of ``tensors`` that FSDP manages (FSDP2's sharded and unsharded parameters,
    FSDP1's flat parameters and the original parameters it flattened) or that are DTensors."""
    if not sharding_possible():
        return []
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    managed = _fsdp2_parameter_ids()
    return [
        t
        for t in tensors
        if id(t) in managed
        or getattr(t, "_fsdp_flattened", False)  # FSDP1 (FlatParameter and its originals)
        or (dtensor is not None and isinstance(t, dtensor))
    ]


def check_not_sharded(tensors: Iterable[Tensor], where: str, owner: object = None) -> None:
    """Refuse parameters sharded by FSDP (or DTensors) with the fix; ``where`` names the
    method and the mode, e.g. ``"MGDA, exact mode"``; ``owner`` (a module) names them.

    For what needs each parameter's per-task gradient: GradNorm's ``W`` (any sharding), and
    the exact mode on parameters held by FSDP1 or as bare DTensors (a ``shared=`` sharded by
    ``fully_shard`` takes :mod:`taskbalance.sharded`'s path before this check)."""
    found = sharded_tensors(tensors)
    if not found:
        return
    fsdp2 = _fsdp2_parameter_ids()
    if all(id(t) in fsdp2 for t in found):  # GradNorm's W on a body sharded by fully_shard
        held = "managed by fully_shard (FSDP2)"
        fix = (
            "Use the features mode (features=z, or zs = tb.fork(z, K)), which works on a body "
            "sharded with fully_shard, or a loss-weighting method, or DDP"
        )
    else:
        held = "held by FullyShardedDataParallel (FSDP1) or as DTensors outside fully_shard"
        fix = (
            "Shard the body with torch.distributed.fsdp.fully_shard (FSDP2), under which the "
            "exact mode (shared=) and the features mode (features=z, or zs = tb.fork(z, K)) "
            "work with the heads outside it, or use DDP (DistributedDataParallel)"
        )
    raise BalancerUsageError(
        f"FSDP-sharded parameters are not supported by gradient methods yet ({where}): "
        f"{describe_tensors(found, parameter_names(owner))} "
        f"{'is' if len(found) == 1 else 'are'} {held}. The per-task gradients of these "
        "parameters would be taken on copies that FSDP's reduce-scatter never sees, and the "
        f"model would train silently wrong. {fix} (docs/scaling.md)"
    )


def fsdp_body(leaves: Sequence[Tensor], where: str, owner: object = None) -> bool:
    """Features mode: whether the body (the features' ``leaves``) is sharded by
    ``fully_shard`` (FSDP2), whose own backward then reduces its gradients.

    Raises:
        BalancerUsageError: a body parameter held by ``FullyShardedDataParallel`` (FSDP1)
            or as a DTensor outside ``fully_shard``, whose gradients the engine could not
            hand to the sharding.
    """
    if not sharding_possible():
        return False
    managed = _fsdp2_parameter_ids()
    found = [t for t in sharded_tensors(leaves) if id(t) not in managed]
    if found:
        raise BalancerUsageError(
            f"the features depend on parameters sharded other than by fully_shard ({where}): "
            f"{describe_tensors(found, parameter_names(owner))} "
            f"{'is' if len(found) == 1 else 'are'} held by FullyShardedDataParallel (FSDP1) "
            "or as DTensors. The features mode supports bodies sharded with "
            "torch.distributed.fsdp.fully_shard (FSDP2); shard the body with fully_shard, "
            "or use DDP (docs/scaling.md)"
        )
    return any(id(t) in managed for t in leaves)


def check_heads_not_sharded(params: Sequence[Sequence[Tensor]], tasks: Sequence[str]) -> None:
    """Features mode: refuse task-specific parameters (after the features) sharded by FSDP,
    before any per-task pass; ``params[i]`` are task i's. FSDP would reshard them between
    the passes and never reduce the gradients the engine gives them."""
    if not sharding_possible():
        return
    for i, own in enumerate(params):
        found = sharded_tensors(own)
        if found:
            raise BalancerUsageError(
                f"the head of task {tasks[i]!r} ({describe_tensors(found, {})}) is sharded by "
                "FSDP: in the features mode the heads take part in the K per-task passes, "
                "between which FSDP would free their unsharded copies, and their gradients "
                "are written by the engine, which FSDP's reduce-scatter never sees. Apply "
                "fully_shard to the body only (fully_shard(model.body), each of its blocks "
                f"first if you like) and keep the {len(tasks)} heads out of it (they are "
                "replicated and averaged over the ranks by the balancer); see docs/scaling.md"
            )


def _reachable_leaves(
    root: Tensor,
    stop: set[object],
    hit: set[object] | None = None,
    into: list[tuple[object, int, object]] | None = None,
) -> list[Tensor]:
    """Leaf tensors requiring grad that ``root`` depends on, not looking past ``stop`` nodes.

    The ``stop`` nodes reached are added to ``hit`` when it is given; every edge that enters
    a stop node is added to ``into`` as ``(consumer node, input position, stop node)`` when
    it is given (each node is expanded once, so each edge is listed once). A pass-through
    node (:data:`PASS_THROUGH`) is followed only along the edge of the output it was reached
    by.
    """
    if root.grad_fn is None:
        return [root] if root.requires_grad else []
    leaves: list[Tensor] = []
    seen: set[object] = set()
    kinds = _NODE_KINDS
    stack: list[tuple[object, int]] = [(root.grad_fn, root.output_nr)]
    while stack:
        node, which = stack.pop()
        if node is None:
            continue
        kind = kinds.get(type(node))
        if kind is None:
            kind = _node_kind(node)
        mark = (node, which) if kind == _THROUGH else node
        if mark in seen:
            continue
        if node in stop:
            if hit is not None:
                hit.add(node)
            continue
        seen.add(mark)
        if kind == _LEAF:
            leaves.append(node.variable)
            continue
        edges = node.next_functions
        first = 0
        if kind == _THROUGH:  # only the edge of the output it was reached by
            edges, first = edges[which : which + 1], which
        if into is not None:
            for position, edge in enumerate(edges, first):
                if edge[0] in stop:
                    into.append((node, position, edge[0]))
        stack.extend(edges)
    return leaves


_INNER, _LEAF, _THROUGH = 0, 1, 2
#: the kind of each autograd node type met so far (the walk runs every step: no name lookups)
_NODE_KINDS: dict[type, int] = {}


def _node_kind(node: object) -> int:
    """:data:`_LEAF` for a leaf's ``AccumulateGrad`` node, :data:`_THROUGH` for a
    :data:`PASS_THROUGH` node, :data:`_INNER` otherwise; remembered per node type."""
    cls = type(node)
    if cls.__name__ in PASS_THROUGH:
        kind = _THROUGH
    elif hasattr(cls, "variable"):
        kind = _LEAF
    else:
        kind = _INNER
    _NODE_KINDS[cls] = kind
    return kind


#: autograd nodes that pass output k's gradient to input k only, while autograd links every
#: output to every input: DDP's ``_DDPSink``, which wraps all outputs of a DDP forward with
#: ``find_unused_parameters=True`` or ``static_graph=True``. Followed edge by edge, so that a
#: task's loss does not seem to reach the other tasks' heads.
PASS_THROUGH = frozenset({"_DDPSinkBackward"})


def check_not_wrapped(features: Sequence[Tensor]) -> None:
    """Refuse features that come out of DDP's output wrapper (``_DDPSink``): the heads used
    the tensor before the wrapper, so the losses do not depend on this one."""
    for z in features:
        if type(z.grad_fn).__name__ in PASS_THROUGH:
            raise BalancerUsageError(
                "features= is an output of a DistributedDataParallel forward with "
                "find_unused_parameters=True or static_graph=True: DDP re-wraps its outputs, "
                "so the heads did not use this tensor. Wrap only the shared body in DDP "
                "(heads outside it), or use find_unused_parameters=False; see docs/scaling.md"
            )


def _check_distinct(inputs: Sequence[Tensor]) -> None:
    """Refuse a feature tensor given twice (its columns repeated in J, the update sent back
    through it once per copy: a multiple of the right one)."""
    first: dict[int, int] = {}
    for i, t in enumerate(inputs):
        j = first.setdefault(id(t), i)
        if j != i:
            raise BalancerUsageError(
                f"features[{i}] is features[{j}]: a tensor given twice counts its gradient "
                "twice (its columns repeat in J and the update is backpropagated once per "
                "copy). Pass it once (features=z); for one view per task use "
                "zs = tb.fork(z, K) and features=zs"
            )


def _check_not_nested(inputs: Sequence[Tensor], nodes: set[object]) -> None:
    """Refuse feature tensors of which one is computed from another (paths counted twice)."""
    for i, t in enumerate(inputs):
        if t.grad_fn is None:
            continue
        hit: set[object] = set()
        _reachable_leaves(t, nodes - {t.grad_fn}, hit)
        if hit:
            raise BalancerUsageError(
                f"features[{i}] is computed from another of the features; the gradient paths "
                "through it would be counted twice. Pass only the outermost representations "
                "(e.g. concatenate or flatten independent branches)"
            )


#: columns per block in :func:`gramian` (a block of K rows then stays in cache).
GRAMIAN_BLOCK = 1024


def gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ`` (K×K) as a sum over column blocks of :data:`GRAMIAN_BLOCK`, in one call.

    For a wide J (K×P, P up to millions) one ``J @ J.T`` is a K×K product with a long inner
    dimension, slow on CPU. The blocks are the batch of one ``bmm`` (a strided view of J, no
    copy): each K×block piece stays in cache, and the batch is split over the threads in a
    single parallel region. Measured on the benchmark VM (2 cores, K=10, float32, median
    of 15 calls), 1024-column blocks against 4096: P=131k 0.21 vs 0.25 ms with 2 threads
    (1 thread 0.44 vs 0.54); P=659k 1.18 vs 1.49 ms (1 thread 1.90 vs 2.46); one
    ``J @ J.T`` at P=659k: 4.3 ms.
    """
    k, p = jacobian.shape
    if p <= 2 * GRAMIAN_BLOCK:
        return jacobian @ jacobian.T
    if jacobian.stride(1) != 1:
        jacobian = jacobian.contiguous()
    blocks = p // GRAMIAN_BLOCK
    width = blocks * GRAMIAN_BLOCK
    batch = jacobian[:, :width].view(k, blocks, GRAMIAN_BLOCK).transpose(0, 1)
    out = torch.bmm(batch, batch.transpose(1, 2)).sum(0)
    if width < p:
        rest = jacobian[:, width:]
        out.addmm_(rest, rest.T)
    return out


@dataclass
class TaskGradients:
    """Output of :func:`task_jacobian`."""

    jacobian: Tensor  # (K, P): row i = flattened d L_i / d inputs
    inputs: list[Tensor]  # the tensors differentiated against (shared params or features)
    own: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)  # per task (param, grad)
    #: exact mode, K >= 2: ``(input index, task index)`` of each shared tensor that exactly
    #: one task reaches (it looks like a head); found from the gradients autograd left None.
    single: list[tuple[int, int]] = field(default_factory=list)

    def gramian(self) -> Tensor:
        return gramian(self.jacobian)


def task_parameters(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], tasks: Sequence[str], *, features: bool
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Each loss's task-specific parameters, checked, and the ``inputs`` it reaches.

    Returns ``(own, reached)``: ``own[i]`` the leaves loss i reaches that are not among
    ``inputs`` (its head), ``reached[i]`` the inputs it reaches (exact mode; in the features
    mode the walk stops at the features). Raises for a parameter reached by two tasks that
    is not in ``inputs``, and in the features mode for a loss that does not depend on the
    features and for sharded heads.
    """
    k = len(losses)
    for i, task in enumerate(tasks):
        if not losses[i].requires_grad:
            raise BalancerUsageError(
                f"loss of task {task!r} does not require grad: a gradient method needs "
                "losses computed from the model with autograd enabled"
            )
    stop = {t.grad_fn for t in inputs if t.grad_fn is not None} if features else set()
    if features and len(inputs) > 1:
        _check_distinct(inputs)
        _check_not_nested(inputs, stop)
    input_ids = {id(t) for t in inputs}
    owners: dict[int, int] = {}
    own_params: list[list[Tensor]] = []
    reached: list[list[Tensor]] = []
    for i in range(k):
        hit: set[object] = set()
        leaves = _reachable_leaves(losses[i], stop, hit)
        params = [p for p in leaves if id(p) not in input_ids]
        if features and not hit and len(params) == len(leaves):
            # checked first: otherwise the body it reaches reads as an undeclared shared part
            raise BalancerUsageError(_not_from_features(tasks[i]))
        for p in params:
            if id(p) in owners and owners[id(p)] != i:
                raise BalancerUsageError(
                    f"a parameter of shape {tuple(p.shape)} is used by tasks "
                    f"{tasks[owners[id(p)]]!r} and {tasks[i]!r} but is not in shared; "
                    "pass it as shared (or give the features after it)" + compile_hint(losses)
                )
            owners[id(p)] = i
        own_params.append(params)
        reached.append([p for p in leaves if id(p) in input_ids])
    if features:
        check_heads_not_sharded(own_params, tasks)
    return own_params, reached


def task_jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    tasks: Sequence[str],
    *,
    features: bool,
    retain_graph: bool = False,
) -> TaskGradients:
    """Per-task gradients of the K scalar ``losses`` w.r.t. ``inputs``, plus task-specific grads.

    ``features=True`` keeps the graph for the body backward that follows; otherwise the
    graph is freed by the last task's pass, unless ``retain_graph=True`` (the diagnostics
    of a loss-weighting method, whose combined loss is backpropagated afterwards).
    """
    k = len(losses)
    own_params, _ = task_parameters(losses, inputs, tasks, features=features)
    total = sum(t.numel() for t in inputs)
    # fp16/bf16 gradients are widened to float32 as they are copied into J (no extra copy)
    jac = torch.empty(k, total, dtype=jacobian_dtype(inputs), device=inputs[0].device)
    own: list[list[tuple[Tensor, Tensor]]] = []
    unreached: list[tuple[int, Tensor]] = []  # (task, shared tensor) pairs autograd left None

    def zeros(i: int, t: Tensor, row: Tensor) -> Tensor:
        unreached.append((i, t))  # runs only for a None gradient: nothing on the usual path
        return row.new_zeros(t.numel())

    for i in range(k):
        targets = list(inputs) + own_params[i]
        retain = features or retain_graph or i < k - 1
        try:
            grads = torch.autograd.grad(losses[i], targets, retain_graph=retain, allow_unused=True)
        except RuntimeError as err:
            if "donated buffers" in str(err):  # a trunk compiled by inductor: see the message
                raise BalancerUsageError(DONATED_BUFFERS) from err
            raise
        shared_grads = grads[: len(inputs)]
        if all(g is None for g in shared_grads):
            what = "features" if features else "shared parameters"
            raise BalancerUsageError(
                f"loss of task {tasks[i]!r} does not depend on the {what}"
                + compile_hint(losses[i : i + 1])
            )
        row = jac[i]
        pieces = [
            g.reshape(-1) if g is not None else zeros(i, t, row)
            for t, g in zip(inputs, shared_grads)
        ]
        # one copy into the row (fp16/bf16 widened to J's dtype on the way)
        if len(pieces) == 1:
            row.copy_(pieces[0])
        else:
            torch.cat(pieces, out=row)
        own.append([(p, g) for p, g in zip(own_params[i], grads[len(inputs) :]) if g is not None])
    single = _reached_by_one_task(unreached, inputs, k) if unreached and not features else []
    return TaskGradients(jac, list(inputs), own, single)


def _reached_by_one_task(
    unreached: list[tuple[int, Tensor]], inputs: Sequence[Tensor], k: int
) -> list[tuple[int, int]]:
    """``(input index, task)`` of the inputs that all tasks but one leave unreached."""
    if k < 2:
        return []
    missing: dict[int, set[int]] = {}
    for i, t in unreached:
        missing.setdefault(id(t), set()).add(i)
    out = []
    for j, t in enumerate(inputs):
        tasks = missing.get(id(t))
        if tasks is not None and len(tasks) == k - 1:
            out.append((j, next(i for i in range(k) if i not in tasks)))
    return out


def _not_from_features(task: str, fix: str = "z = body(x); heads(z); features=z") -> str:
    return (
        f"the loss of task {task!r} does not depend on features= (was it computed from a "
        "second forward pass or a copy?); pass features= the very tensor the heads were "
        f"computed from ({fix})"
    )


#: autograd's node for a graph compiled by ``torch.compile`` (AOTAutograd): one node that
#: links each output of the graph to every input, so the tasks' paths through it merge.
COMPILED_NODE = "CompiledFunctionBackward"


#: the error for a compiled trunk whose backward refuses ``retain_graph=True``.
DONATED_BUFFERS = (
    "the shared trunk is compiled by torch.compile with donated buffers (inductor's default), "
    "whose backward refuses retain_graph=True; the exact mode (shared=) backpropagates every "
    "task's loss through the trunk and must retain its graph between the tasks. Set "
    "torch._functorch.config.donated_buffer = False before the first compiled call, or use "
    "the features mode (features=z, or tb.fork), which goes through the trunk once; see "
    "docs/compile.md"
)


def compile_hint(roots: Sequence[Tensor]) -> str:
    """The fix for tasks merged by a ``torch.compile`` graph, if ``roots``' graphs go
    through one (empty otherwise). Looked for only once a check has failed."""
    stack = [t.grad_fn for t in roots]
    seen: set[object] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == COMPILED_NODE:
            return (
                ". The losses come out of a torch.compile graph: autograd sees a compiled "
                "graph as one node that links each of its outputs to all of its inputs, so a "
                "graph that also computes the heads hides which task uses what. If it does, "
                "compile only the shared trunk (model.body = torch.compile(model.body)) and "
                "run the heads outside it; see docs/compile.md"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
    return ""


def accumulate_grad(param: Tensor, grad: Tensor, *, owned: bool = False) -> None:
    """``param.grad += grad`` (or set it), as ``backward`` would.

    ``owned``: ``grad`` is a fresh tensor nobody else holds, so it can become ``.grad``
    without a copy.
    """
    if param.grad is None:
        param.grad = grad.detach() if owned else grad.detach().clone()
    else:
        param.grad.add_(grad)


def split_direction(direction: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The flat direction ``(P,)`` cut into pieces shaped like ``inputs``, in their dtypes.

    A piece is a view of ``direction`` where the dtypes agree (float32 inputs: no copy) and
    a converted copy where they do not (fp16/bf16 inputs, whose J is float32).
    """
    pieces = []
    offset = 0
    for t in inputs:
        n = t.numel()
        piece = direction[offset : offset + n].view_as(t)
        pieces.append(piece if piece.dtype == t.dtype else piece.to(t.dtype))
        offset += n
    return pieces


def feature_leaves(inputs: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that the features depend on (the body's parameters),
    in a deterministic order (the same on every rank for the same model)."""
    found: dict[int, Tensor] = {}
    for t in inputs:
        for leaf in _reachable_leaves(t, set()):
            found.setdefault(id(leaf), leaf)
    return list(found.values())


def backprop_to_leaves(
    direction: Tensor, inputs: Sequence[Tensor], leaves: Sequence[Tensor]
) -> list[Tensor | None]:
    """The body's parameter gradients for the feature direction, without touching ``.grad``.

    ``torch.autograd.grad`` instead of ``backward``: it runs no gradient-accumulation hook
    (DDP's reducer stays idle), and it frees the body's graph as ``backward`` would.
    """
    pieces = split_direction(direction, inputs)
    return list(torch.autograd.grad(list(inputs), list(leaves), pieces, allow_unused=True))


def apply_direction(
    direction: Tensor, grads: TaskGradients, *, features: bool, owned: bool = False
) -> None:
    """Send the combined direction (P,) to the shared inputs.

    Exact mode adds it to the shared parameters' ``.grad``; features mode backpropagates
    it from the features through the body (one ordinary backward). Each piece is cast to
    its input's dtype (J, hence the direction, is at least float32). ``owned``: nothing
    else holds ``direction`` (e.g. ``wᵀJ`` just computed), so its slices become ``.grad``
    without a copy; otherwise they are copied, as a method may keep the tensor in its state.
    """
    pieces = split_direction(direction, grads.inputs)
    if features:
        torch.autograd.backward(grads.inputs, grad_tensors=pieces)
    else:
        for t, piece in zip(grads.inputs, pieces):
            # a converted piece is a fresh tensor: it can become .grad without a copy
            accumulate_grad(t, piece, owned=owned or piece.dtype != direction.dtype)


def apply_task_specific(
    grads: TaskGradients, weights: Tensor | None, scale: float | None = None
) -> None:
    """Give each task-specific parameter its task's gradient (times ``weights[i]`` if given,
    times ``scale`` if given: a micro-batch's share under gradient accumulation).

    A gradient that is a product computed here, or a large one that autograd returned as a
    tensor of its own (see :func:`_sole_owner`), becomes ``.grad`` without a copy.
    """
    storages: set[int] = set()
    for i, pairs in enumerate(grads.own):
        factor = None if weights is None else weights[i]
        for p, g in pairs:
            if factor is not None:
                g = g * factor.to(g.dtype)
            if scale is not None:
                g = g * scale
            owned = factor is not None or scale is not None
            if not owned and g.numel() >= STEAL_MIN_NUMEL:
                owned = _sole_owner(g, p, storages)
            accumulate_grad(p, g, owned=owned)


#: below this many elements a task-specific gradient is copied into ``.grad``: the copy is
#: cheaper than the checks that would let it be taken as it is.
STEAL_MIN_NUMEL = 1 << 14


def _sole_owner(grad: Tensor, param: Tensor, storages: set[int]) -> bool:
    """Whether ``grad`` may become ``param.grad`` as it is, as ``backward`` would let it.

    True when ``grad`` covers the whole of a storage that no other gradient handed out in
    this step uses (``storages`` collects them: autograd may give one tensor, or views of
    one buffer, to several inputs), with ``param``'s layout, dtype and device, and no graph.
    """
    if (
        grad.layout != torch.strided
        or param.layout != torch.strided
        or grad.requires_grad
        or grad.dtype != param.dtype
        or grad.device != param.device
    ):
        return False
    storage = grad.untyped_storage()
    key = storage.data_ptr()
    if key in storages:
        return False
    storages.add(key)
    return (
        grad.storage_offset() == 0
        and storage.nbytes() == grad.numel() * grad.element_size()
        and grad.stride() == param.stride()
    )


class ForkedFeatures(list):
    """K per-task views of one shared representation, made by :func:`fork`.

    Head i must be fed ``forked[i]``; then one backward pass through all heads yields every
    task's gradient with respect to the representation separately.
    """

    source: Tensor
    #: whether the engine may keep the task gradients as factors when every head starts
    #: with a linear layer (:mod:`taskbalance.structured`); ``fork(..., factored=False)``
    factored: bool = True


def fork(features: Tensor, tasks: int, *, factored: bool = True) -> ForkedFeatures:
    """Split the shared representation into one view per task (the fast features mode).

    ``zs = taskbalance.fork(z, K)``; feed head i with ``zs[i]``; then
    ``balancer.backward(losses, features=zs)``. Each view is a distinct autograd node, so
    ``dL_i/dz`` for every task comes out of a single backward pass through the heads
    instead of K passes. The result is the same as with ``features=z``.

    When every head starts with a linear layer on its view (a 2-D representation), the
    engine keeps each ``dL_i/dz`` as the product of the gradient at that layer's output and
    its weight, and forms the Gramian and ``wᵀJ`` from these factors without J
    (:mod:`taskbalance.structured`); ``factored=False`` always stacks J instead. The
    results are the same to float rounding.
    """
    if not isinstance(features, Tensor) or not features.requires_grad:
        raise BalancerUsageError("fork() needs the shared representation, a tensor requiring grad")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be a positive int, got {tasks!r}")
    if not isinstance(factored, bool):
        raise ValueError(
            f"factored must be True or False, got {factored!r}: True (the default) lets the "
            "engine skip J for heads that start with a linear layer, False always forms J"
        )
    forked = ForkedFeatures(features.view_as(features) for _ in range(tasks))
    forked.source = features
    forked.factored = factored
    return forked


def forked_task_jacobian(
    losses: Sequence[Tensor], forked: ForkedFeatures, tasks: Sequence[str]
) -> TaskGradients:
    """Per-task gradients w.r.t. the views of :func:`fork`, in one backward pass.

    The K view gradients (each shaped like the representation) are stacked into J with one
    copy; the heads' parameter gradients come out of the same pass. When every head starts
    with a linear layer on its view, the pass stops at those layers' outputs and the
    gradients are kept as factors (:func:`taskbalance.structured.factored_gradients`).
    """
    from taskbalance.structured import factored_gradients, factors_of, walk_task

    k = len(losses)
    if len(forked) != k:
        raise BalancerUsageError(f"fork() made {len(forked)} views for {k} tasks")
    source = forked.source
    view_of = {v.grad_fn: j for j, v in enumerate(forked)}
    stop = set(view_of)
    if source.grad_fn is not None:
        stop.add(source.grad_fn)
    owners: dict[int, int] = {}
    own_params: list[list[Tensor]] = []
    consumers: list[list[tuple[object, int]]] = []  # per task: the edges into its view
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            raise BalancerUsageError(f"loss of task {tasks[i]!r} does not require grad")
        params, hit, into = walk_task(loss, stop)
        consumers.append([(node, position) for node, position, view in into if view in view_of])
        if source.grad_fn in hit or any(p is source for p in params):
            # z used besides the view: that part of dL_i/dz would be lost without a word
            raise BalancerUsageError(
                f"loss of task {tasks[i]!r} uses the representation given to fork() directly, "
                f"not only through its view forked[{i}]; feed the task only its view"
            )
        reached = sorted(view_of[node] for node in hit if node in view_of)
        if not reached:
            fix = "zs = fork(z, K); head i fed zs[i]; features=zs"
            raise BalancerUsageError(_not_from_features(tasks[i], fix))
        if reached != [i]:
            raise BalancerUsageError(
                f"loss of task {tasks[i]!r} must be computed from its own view forked[{i}] "
                f"of fork() (it reaches views {reached})" + compile_hint([loss])
            )
        for p in params:
            if owners.get(id(p), i) != i:
                raise BalancerUsageError(
                    f"a parameter of shape {tuple(p.shape)} is used by tasks "
                    f"{tasks[owners[id(p)]]!r} and {tasks[i]!r} after fork()"
                )
            owners[id(p)] = i
        own_params.append(params)
    check_heads_not_sharded(own_params, tasks)
    factors = factors_of(source, consumers) if getattr(forked, "factored", True) else None
    if factors is not None:
        return factored_gradients(losses, source, factors, own_params)
    flat_params = [p for params in own_params for p in params]
    grads = torch.autograd.grad(
        torch.stack(list(losses)).sum(),
        list(forked) + flat_params,
        retain_graph=True,
        allow_unused=True,
    )
    rows = [g if g is not None else torch.zeros_like(source) for g in grads[:k]]
    dtype = jacobian_dtype(rows)
    # one copy of the K gradients into J (K, numel), widening fp16/bf16 on the way
    jac = torch.empty((k, *source.shape), dtype=dtype, device=source.device)
    torch.stack(rows, out=jac)
    own: list[list[tuple[Tensor, Tensor]]] = []
    rest = iter(grads[k:])
    for params in own_params:
        own.append([(p, g) for p, g in zip(params, rest) if g is not None])
    return TaskGradients(jac.view(k, -1), [source], own)
