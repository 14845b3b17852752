"""The exact mode without J: the Gramian accumulated layer by layer (``jacobian_free=True``).

The exact mode (:func:`taskbalance.gradients.task_jacobian`) stores J, K×P floats: 4 GB for
a 100M-parameter trunk at K = 10. The Gramian methods need only ``G = J Jᵀ`` (K×K) and the
update ``d = wᵀJ``, and both are sums over the parameters, so they can be built one layer
at a time from quantities of the size of the activations:

1. **Boundaries.** The autograd graph of the losses is walked once. For each parameter, its
   *boundary* is the first node above it that is not a plain rearrangement of the
   parameter (a transpose, view, cast, ...): for ``nn.Linear`` the ``addmm`` that takes the
   layer's input, for a convolution the convolution. Parameters whose paths meet at a
   boundary (a layer's weight and bias) form a *group*; every path from a loss to a group's
   parameters crosses one of its boundaries.
2. **Output gradients.** One backward pass batched over the K tasks (``is_grads_batched``,
   grad outputs the rows of the identity) gives, at every boundary output, δ_i = ∂L_i/∂y for
   each task i: K times the size of the layers' outputs, not of their parameters.
3. **Per layer.** For each group, one batched backward from its boundaries to its
   parameters alone (a layer's own weight-gradient product) gives the group's K per-task
   gradients ``J_g`` (K × P_g), which add ``J_g J_gᵀ`` to G and are freed. The peak is one
   layer's K gradients. A Linear layer whose batch has fewer rows than the layer is wide
   skips its weight gradients: ``g_i·g_j = ⟨δ_i, (x xᵀ) δ_j⟩`` from its input x
   (:func:`linear_gramian`; single process).
4. **Update.** With the weights w, each group's share of ``d = wᵀJ`` is the same small
   backward from its boundaries with grad outputs ``Σ_i w_i δ_i``: no K-fold work, no J.

G is the same sum of products as ``J Jᵀ`` (to float rounding), and d is exactly ``wᵀJ``.
The walk needs no hook and no change to the model: it reads the graph autograd built.

When a group cannot be handled this way, its parameters are differentiated directly in
step 2 (their K gradients are stored, a J over those parameters only), which is exact as
well: a group whose boundaries lie on each other's paths (a weight used in two layers one
after the other: the output gradient of the later use already flows into the earlier one),
and a parameter used in the loss with nothing but rearrangements in between. Parameters
after the boundaries' K-fold output gradients (task-specific heads) are handled in the same
pass: a head's group is differentiated with its own task's δ only.

Cost (measured in ``benchmarks/jacobian_free.py``, docs/jacobian_free.md): step 2 is the
activation half of K backward passes, step 3 the weight half (or the cheaper product above),
step 4 one more weight half; memory is the K output gradients of every boundary plus one
group's K gradients, against K×P for J.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from taskbalance.errors import BalancerUsageError
from taskbalance.gradients import DONATED_BUFFERS, gramian, jacobian_dtype, split_direction

#: autograd nodes that only rearrange or convert one tensor: followed from a parameter up to
#: the first node that combines it with something else (the boundary). Any other node with a
#: parameter below it is a boundary: the choice only changes the memory, never the result.
REARRANGING = frozenset(
    {
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "ExpandBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "ToCopyBackward0",
        "CloneBackward0",
    }
)


@dataclass
class Group:
    """Parameters whose every path to the losses crosses the outputs ``edges``."""

    params: list[Tensor]
    edges: list[GradientEdge] = field(default_factory=list)
    #: the K-batched output gradients at ``edges`` (``None`` where no task reaches one)
    deltas: list[Tensor | None] = field(default_factory=list)
    #: the task owning every parameter of the group (a head), ``None`` for shared ones
    task: int | None = None

    def live(self) -> list[tuple[GradientEdge, Tensor]]:
        """``(edge, output gradients)`` of the boundaries some task reaches."""
        return [(e, d) for e, d in zip(self.edges, self.deltas) if d is not None]


@dataclass
class LayerwiseGradients:
    """What :func:`layerwise_gradients` leaves for the update: G, the groups to send the
    update through, the directly differentiated parameters and the heads' gradients."""

    gram: Tensor  # (m, m) float64, m the tasks back-propagated
    groups: list[Group]  # shared groups (their update goes through their boundaries)
    direct: list[Tensor]  # shared parameters differentiated directly
    direct_jacobian: Tensor  # (m, sum of their sizes)
    own: list[list[tuple[Tensor, Tensor]]]  # per task (param, grad): the heads
    unreached: list[Tensor]  # shared parameters no task reaches (zero update)

    def direction(self, weights: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, its slice of wᵀJ)`` for every shared parameter; ``weights`` are
        those of the m tasks back-propagated. Frees the boundaries' graphs."""
        out: list[tuple[Tensor, Tensor]] = []
        for group in self.groups:
            live = group.live()
            group.deltas = []  # the K output gradients are no longer needed
            grads: Sequence[Tensor | None] = [None] * len(group.params)
            if live:  # no task reaching the group: a zero update, as with J stored
                outs = [torch.tensordot(weights.to(d.dtype), d, dims=1) for _, d in live]
                grads = _grad([e for e, _ in live], group.params, outs, allow_unused=True)
            for p, g in zip(group.params, grads):
                out.append((p, g if g is not None else torch.zeros_like(p)))
        if self.direct:
            flat = weights.to(self.direct_jacobian.dtype) @ self.direct_jacobian
            out.extend(zip(self.direct, split_direction(flat, self.direct)))
        out.extend((p, torch.zeros_like(p)) for p in self.unreached)
        return out


#: the first torch whose ``autograd.grad`` takes gradient edges as outputs (step 3)
MIN_TORCH = (2, 5)


def unsupported_reason() -> str | None:
    """Why this torch cannot run the mode (``None``: it can)."""
    try:
        found = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return None  # a development build: assume it is recent
    if found < MIN_TORCH:
        return (
            f"it needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (torch.autograd.grad from a "
            f"layer's output edges), and this is torch {torch.__version__}"
        )
    return None


def held_per_task(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> tuple[int, int]:
    """``(numbers this mode holds per task, numbers J holds per task)`` for ``losses``:
    the outputs of the shared parameters' boundaries (their output gradients are kept for
    every task until the update) plus the parameters differentiated directly, against P.

    What ``jacobian_free="auto"`` decides by: the mode without J when the first is the
    smaller (layers with fewer outputs than parameters: Linear layers on a batch with fewer
    rows than their width), J stored otherwise (convolutions, whose outputs outnumber their
    parameters). Shapes only: no backward pass.
    """
    parents = _parents([loss.grad_fn for loss in losses])
    _, nodes, direct, _ = _groups(inputs, parents)
    held = sum(p.numel() for p in direct)
    for node in set().union(*nodes) if nodes else ():
        for meta in getattr(node, "_input_metadata", ()) or ():
            held += math.prod(meta.shape)
    return held, sum(p.numel() for p in inputs)


def hooked_parameters(params: Sequence[Tensor]) -> list[Tensor]:
    """Those of ``params`` with a gradient hook (``Tensor.register_hook``): refused, since
    the mode without J runs them on batched gradients, or not at all (a Linear layer's
    product), and so would not give what the mode that stores J gives."""
    return [p for p in params if getattr(p, "_backward_hooks", None)]


def first_non_finite(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> int | None:
    """The first loss whose own gradient w.r.t. ``inputs`` is not finite (``None``: none).

    For the error message only: in the batched backward a task's infinite gradient reaches
    the other tasks' rows too (``0 · inf`` is NaN), so G cannot tell whose it was. One
    backward per task, with the graph kept."""
    for i, loss in enumerate(losses):
        grads = _grad(loss, list(inputs), retain_graph=True, allow_unused=True)
        if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            return i
    return None


@dataclass
class LinearLayer:
    """A group that is exactly one Linear layer: its input x (B×in) and output gradients
    δ (m×B×out), and whether it has a bias (:func:`linear_layer`)."""

    x: Tensor
    delta: Tensor
    bias: bool

    def cheaper(self, rows: int) -> bool:
        """Whether, with ``rows`` batch rows in all, G from x and δ costs less than from the
        m weight gradients (roughly: fewer rows than the layer is wide)."""
        m, _, out = self.delta.shape
        width = self.x.shape[1]
        b = rows
        return b * b * width + m * b * out * (b + m) < m * width * out * (b + m)

    def gramian(self, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
        """``g_i·g_j = ⟨δ_i, (x xᵀ) δ_j⟩`` for the weight and ``(Σ_b δ_i)·(Σ_b δ_j)`` for
        the bias, times ``scale²`` (the gradient being ``scale · δᵀx``)."""
        m = self.delta.shape[0]
        x = self.x.detach().to(dtype)
        d = self.delta.to(dtype)
        spread = torch.matmul(x @ x.T, d)  # (m, B, out): (x xᵀ) δ_j
        gram = (d.reshape(m, -1) @ spread.reshape(m, -1).T).double()
        if self.bias:
            sums = d.sum(1)
            gram += (sums @ sums.T).double()
        return gram * (scale * scale) if scale != 1.0 else gram


def linear_layer(group: Group, delta: Tensor) -> LinearLayer | None:
    """The group as a :class:`LinearLayer` when it is exactly an ``addmm`` (or ``mm``) of
    its input with its weight's transpose (plus its bias), on 2-D input (a 3-D input's
    ``addmm`` has its rows flattened already); ``None`` otherwise. Shapes and graph only:
    the same answer on every DDP rank for the same model."""
    if len(group.edges) != 1 or group.edges[0].output_nr != 0:
        return None
    node = group.edges[0].node
    kind = type(node).__name__
    children = node.next_functions
    if kind == "AddmmBackward0" and len(children) == 3:
        if node._saved_alpha != 1 or node._saved_beta != 1:  # type: ignore[attr-defined]
            return None
        bias_node, transpose, x = children[0][0], children[2][0], node._saved_mat1  # type: ignore[attr-defined]
    elif kind == "MmBackward0" and len(children) == 2:
        bias_node, transpose, x = None, children[1][0], node._saved_self  # type: ignore[attr-defined]
    else:
        return None
    if type(transpose).__name__ != "TBackward0":
        return None
    weight_node = transpose.next_functions[0][0]
    owners = {id(getattr(n, "variable", None)): n for n in (weight_node, bias_node) if n}
    params = {id(p): p for p in group.params}
    if set(owners) != set(params) or len(params) != (1 if bias_node is None else 2):
        return None
    weight = params[id(getattr(weight_node, "variable", None))]
    if weight.dim() != 2 or x.dim() != 2 or delta.dim() != 3:
        return None
    return LinearLayer(x, delta, bias_node is not None)


def _gather_rows(sync: Any, t: Tensor) -> Tensor:
    """``t`` (rows first) concatenated over the ranks along its first dimension."""
    flat = t.reshape(t.shape[0], -1).T  # columns: the rows
    full, _ = sync.all_gather_columns(flat)
    return full.T.reshape(-1, *t.shape[1:])


def _linear_gramians(
    layers: dict[int, LinearLayer], dtype: torch.dtype, sync: Any
) -> dict[int, Tensor]:
    """The shares of G of the Linear layers (by group index) taken from x and δ where that is
    cheaper. Under DDP (``sync``) the rows of every rank: the ranks' row counts in one
    all-reduce (the same choice everywhere), then x and δ all-gathered for each layer taken,
    and the global gradient ``(1/R) Σ_r δ_rᵀ x_r`` is that of the gathered rows over R."""
    if not layers:
        return {}
    order = sorted(layers)
    rows = torch.tensor([layers[i].x.shape[0] for i in order], dtype=torch.float64)
    if sync is not None:
        rows = sync.all_reduce([rows])[0]
    out = {}
    for i, total in zip(order, rows.tolist()):
        layer = layers[i]
        if not layer.cheaper(int(total)):
            continue
        if sync is None:
            out[i] = layer.gramian(dtype)
            continue
        delta = _gather_rows(sync, layer.delta.transpose(0, 1)).transpose(0, 1)
        whole = LinearLayer(_gather_rows(sync, layer.x.detach()), delta, layer.bias)
        out[i] = whole.gramian(dtype, scale=1.0 / sync.world_size)
    return out


def _grad(*args: Any, **kwargs: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``, with the fix for a trunk compiled with donated buffers."""
    try:
        return torch.autograd.grad(*args, **kwargs)
    except RuntimeError as err:
        if "donated buffers" in str(err):  # inductor's default: see the message
            raise BalancerUsageError(DONATED_BUFFERS) from err
        raise


def _parents(roots: Sequence[object]) -> dict[object, list[object]]:
    """``{node: the nodes with an edge to it}`` over the graph below ``roots``."""
    parents: dict[object, list[object]] = {}
    seen: set[object] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:  # type: ignore[attr-defined]
            if child is None:
                continue
            above = parents.setdefault(child, [])
            if not above or above[-1] is not node:
                above.append(node)
            stack.append(child)
    return parents


def _live_children(node: object) -> list[object]:
    return [c for c, _ in node.next_functions if c is not None]  # type: ignore[attr-defined]


def _boundaries(start: object, parents: dict[object, list[object]]) -> set[object] | None:
    """The boundary nodes above ``start`` (a parameter's accumulation node), or ``None``
    when a path reaches a loss through rearrangements alone."""
    found: set[object] = set()
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        above = parents.get(node)
        if not above:
            if node is not start:
                return None  # a loss made of the parameter: no output to stop at
            continue
        for parent in above:
            if parent in seen:
                continue
            seen.add(parent)
            if type(parent).__name__ in REARRANGING and len(_live_children(parent)) == 1:
                stack.append(parent)
            else:
                found.add(parent)
    return found


def _reaches(source: object, targets: set[object]) -> bool:
    """Whether a path leads down from ``source`` to one of ``targets`` (not itself)."""
    seen: set[object] = set()
    stack = _live_children(source)
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(_live_children(node))
    return False


def _groups(
    params: Sequence[Tensor], parents: dict[object, list[object]]
) -> tuple[list[list[Tensor]], list[set[object]], list[Tensor], list[Tensor]]:
    """Group ``params`` by shared boundaries (union-find); returns the groups, their
    boundary nodes, the parameters to differentiate directly and those the graph does
    not use."""
    bounds: list[set[object] | None] = []
    unused: list[Tensor] = []
    for p in params:
        node = _accumulator(p, parents)
        if node is None:
            unused.append(p)
            bounds.append(set())
        else:
            bounds.append(_boundaries(node, parents))
    root = list(range(len(params)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    owner: dict[object, int] = {}
    for i, found in enumerate(bounds):
        for node in found or ():
            j = owner.setdefault(node, i)
            if j != i:
                root[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i, found in enumerate(bounds):
        if found:
            members.setdefault(find(i), []).append(i)
    groups, edges, direct = [], [], [params[i] for i, f in enumerate(bounds) if f is None]
    for idx in members.values():
        nodes: set[object] = set().union(*(bounds[i] or set() for i in idx))
        if len(nodes) > 1 and any(_reaches(n, nodes - {n}) for n in nodes):
            direct.extend(params[i] for i in idx)  # one use feeds another: see the docstring
            continue
        groups.append([params[i] for i in idx])
        edges.append(nodes)
    return groups, edges, direct, unused


def _accumulator(p: Tensor, parents: dict[object, list[object]]) -> object | None:
    """The node of parameter ``p`` (a leaf's accumulation node) if the graph uses it."""
    node = get_gradient_edge(p).node
    return node if node in parents else None


def _outputs(node: object) -> list[GradientEdge]:
    n = len(getattr(node, "_input_metadata", ()) or ()) or 1
    return [GradientEdge(node, k) for k in range(n)]  # type: ignore[arg-type]


def layerwise_gradients(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    own_params: Sequence[Sequence[Tensor]],
    *,
    sync: Any = None,
) -> LayerwiseGradients:
    """G, the groups and the heads' gradients of the m ``losses`` (see the module docstring).

    ``inputs`` are the shared parameters; ``own_params[i]`` the task-specific parameters of
    loss i (found and checked by the caller). The graph is kept for :meth:`direction`.
    Under DDP (``sync``, a :class:`taskbalance.distributed.Sync`) every block of the shared
    parameters' per-task gradients is averaged over the ranks before its product enters G,
    and a Linear layer's share is taken from the rows of every rank; the collectives run in
    the same order on every rank (the order of the parameters, groups and graph being the
    same there for the same model).
    """
    reduce = None if sync is None else sync.mean_
    m = len(losses)
    roots = [loss.grad_fn for loss in losses]
    parents = _parents(roots)
    shared_groups, shared_nodes, direct, unreached = _groups(inputs, parents)
    groups = [Group(params) for params in shared_groups]
    node_sets = list(shared_nodes)
    own: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(m)]
    head_direct: list[tuple[int, Tensor]] = []
    for task, params in enumerate(own_params):
        head_groups, head_nodes, head_rest, _ = _groups(params, parents)
        for params_g, nodes in zip(head_groups, head_nodes):
            groups.append(Group(params_g, task=task))
            node_sets.append(nodes)
        head_direct.extend((task, p) for p in head_rest)
    # step 2: the K output gradients at every boundary, and the direct parameters' rows
    edges = [[e for node in nodes for e in _outputs(node)] for nodes in node_sets]
    flat_edges = [e for group_edges in edges for e in group_edges]
    targets: list[Tensor | GradientEdge] = [*flat_edges, *direct, *(p for _, p in head_direct)]
    eye = torch.eye(m, dtype=losses[0].dtype, device=losses[0].device)
    stacked = torch.stack(list(losses))
    found = _grad(
        stacked, targets, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    out = iter(found)
    for group, group_edges in zip(groups, edges):
        group.edges = list(group_edges)
        group.deltas = [next(out) for _ in group_edges]
    direct_rows = [next(out) for _ in direct]
    for task, p in head_direct:
        g = next(out)
        if g is not None:
            own[task].append((p, g[task]))
    dtype = jacobian_dtype(inputs) if inputs else torch.float32
    device = losses[0].device
    gram = torch.zeros(m, m, dtype=torch.float64, device=device)
    # the directly differentiated shared parameters: a J over them alone
    pieces = [
        (g.reshape(m, -1) if g is not None else torch.zeros(m, p.numel(), device=device)).to(dtype)
        for p, g in zip(direct, direct_rows)
    ]
    direct_jac = (
        torch.cat(pieces, dim=1) if pieces else torch.zeros(m, 0, dtype=dtype, device=device)
    )
    if pieces:
        if reduce is not None:
            reduce(direct_jac)
        gram += gramian(direct_jac).double()
    # step 3: each group's K gradients, one group at a time
    shared: list[Group] = []
    linear: dict[int, LinearLayer] = {}
    for group in groups:
        live = group.live()
        if group.task is not None:
            i = group.task
            if live:
                grads = _grad(
                    [e for e, _ in live],
                    group.params,
                    [d[i] for _, d in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                own[i].extend((p, g) for p, g in zip(group.params, grads) if g is not None)
            continue
        shared.append(group)
        if len(live) == 1:
            layer = linear_layer(group, live[0][1])
            if layer is not None:
                linear[len(shared) - 1] = layer
    # a Linear layer's share from its input and output gradients, where that is cheaper
    factored = _linear_gramians(linear, dtype, sync)
    for index, group in enumerate(shared):
        if index in factored:
            gram += factored[index]
            continue
        live = group.live()
        if live:
            grads = _grad(
                [e for e, _ in live],
                group.params,
                [d for _, d in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        elif reduce is None:
            continue
        else:
            grads = (None,) * len(group.params)  # zeros, still reduced with the other ranks
        for p, g in zip(group.params, grads):  # Σ over the group's tensors: no copy of all
            if g is None:
                if reduce is None:
                    continue
                g = torch.zeros((m, *p.shape), dtype=dtype, device=device)  # ranks may differ
            rows = g.reshape(m, -1).to(dtype)
            if reduce is not None:
                reduce(rows)
            gram += gramian(rows).double()
    return LayerwiseGradients(
        gram=gram,
        groups=shared,
        direct=direct,
        direct_jacobian=direct_jac,
        own=own,
        unreached=unreached,
    )
