"""The fork mode with linear heads: the Gramian and ``wᵀJ`` from per-task factors, no J.

In the fork mode (``zs = tb.fork(z, K)``, head i fed ``zs[i]``) row i of J is
``dL_i/dz`` (B×D for a B×D representation). When the only use of ``zs[i]`` in task i's
graph is as the left factor of a matrix product — an ``nn.Linear`` (autograd's ``addmm``
node, or ``mm`` without a bias), ``zs[i] @ W``, ``torch.addmm(b, zs[i], W, alpha=a)`` — that
row is a product of two small matrices:

    dL_i/dz = a δ_i M_iᵀ

with ``δ_i`` (B×o_i) the gradient at the product's output and ``M_i`` (D×o_i) the matrix
the view was multiplied by (the transposed weight, as autograd saved it for its backward).
With ``Δ = [a_1 δ_1, …, a_K δ_K]`` (B×S) and ``M = [M_1, …, M_K]`` (D×S), ``S = Σ o_i``:

* ``G_ij = Σ_b a_i a_j δ_i[b] M_iᵀ M_j δ_j[b]ᵀ``, the sum of the (i, j) block of
  ``(ΔᵀΔ) ⊙ (MᵀM)``: ``S²(B + D)`` multiply-adds instead of ``K² B D`` (for the usual
  one-output heads, ``G = (ΔᵀΔ) ⊙ (MᵀM)`` exactly);
* ``wᵀJ = Δ diag(w) Mᵀ``: ``B S D`` multiply-adds, one matrix product;
* the backward through the heads stops at the products' outputs: the K B×D gradients
  ``δ_i M_iᵀ`` are never computed (the heads' own parameters still get theirs from the
  same pass, as before).

J is formed only when something asks for it (:attr:`FactoredTaskGradients.jacobian`: a
method that needs J itself, a step on a subset of the tasks, the diagnostics, DDP): the
results are the same either way, to float rounding.

**When it is used.** :func:`factors_of` recognises the structure from each task's autograd
graph, as walked for the fork mode's checks (:func:`walk_task`): the view ``zs[i]`` has
exactly one consumer edge in the graph of loss i, and it is the left factor of an
``AddmmBackward0`` or ``MmBackward0`` node with a real floating-point right factor saved
and a real ``alpha``, on a 2-D representation. Anything else — a head that starts with
another operation, uses its view twice (a skip connection), a 3-D representation, a head
under autocast (the view is cast first), a compiled head, ``tb.fork(z, K,
factored=False)`` — takes the general path (J stacked from the K view gradients), for all
tasks of the step. So does a step whose heads are wide enough that the factored Gramian
would cost more than the plain one (``S²(B + D) > K² B D``, e.g. 40 heads with a
512 → 64 first layer on a batch of 256).

**Where δ_i is read.** A pre-hook on the product's node sees the gradient after any hook
the user put on the product's output (``y.register_hook``): exactly what the node uses.
A node that does not run (a frozen first layer: nothing behind it needs a gradient) is
asked for as an input of ``autograd.grad`` instead (a ``GradientEdge``); the engine
applies the output's hooks before capturing it then. (A captured gradient of a node that
does run is taken before those hooks, which is why it is not used for those.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taskbalance.gradients import TaskGradients, _reachable_leaves, jacobian_dtype

if TYPE_CHECKING:
    from taskbalance.aggregation.base import GradientBalancer

#: autograd nodes of ``y = a · left @ right (+ b)``: the node's name, the position of the
#: left factor among its inputs, and whether it saves ``alpha``.
PRODUCT_NODES: dict[str, tuple[int, bool]] = {
    "AddmmBackward0": (1, True),
    "MmBackward0": (0, False),
}

#: one task's factor: the product's node, its ``alpha``, its right factor M_i (D×o_i).
Factor = tuple[Any, float, Tensor]


def walk_task(
    root: Tensor, stop: set[object]
) -> tuple[list[Tensor], set[object], list[tuple[object, int, object]]]:
    """``(leaves, hit, into)`` of ``root``'s graph, not looking past the ``stop`` nodes.

    ``leaves`` and ``hit`` are those of :func:`taskbalance.gradients._reachable_leaves`
    (the leaf tensors requiring grad, and the stop nodes reached); ``into`` lists every
    edge of the graph that enters a stop node, as ``(consumer node, input position, stop
    node)``. One walk: each node is expanded once, so each edge is listed once.
    """
    hit: set[object] = set()
    into: list[tuple[object, int, object]] = []
    leaves = _reachable_leaves(root, stop, hit, into)
    return leaves, hit, into


def product_factor(consumers: Sequence[tuple[object, int]]) -> Factor | None:
    """The factor of a task whose view has these consumer edges, or ``None`` (not a
    product with the view as its sole left factor: the general path)."""
    if len(consumers) != 1:
        return None
    node, position = consumers[0]
    spec = PRODUCT_NODES.get(type(node).__name__)
    if spec is None or position != spec[0]:
        return None
    try:
        right = node._saved_mat2  # type: ignore[attr-defined]
        alpha = node._saved_alpha if spec[1] else 1  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # freed, or a layout this code does not know
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None  # a complex alpha (conjugates in the backward): not handled here
    if (
        not isinstance(right, Tensor)
        or right.dim() != 2
        or right.layout != torch.strided
        or not right.is_floating_point()
    ):
        return None
    return node, float(alpha), right.detach()


def factors_of(
    source: Tensor, consumers: Sequence[Sequence[tuple[object, int]]]
) -> list[Factor] | None:
    """Every task's factor (``consumers[i]``: the edges into view i in loss i's graph), or
    ``None`` when one task has none or the factored Gramian would cost more than J's."""
    if source.dim() != 2 or source.layout != torch.strided or not source.is_floating_point():
        return None
    factors = []
    width = source.shape[1]
    for edges in consumers:
        factor = product_factor(edges)
        if factor is None or factor[2].shape[0] != width:
            return None
        factors.append(factor)
    k, (batch, _) = len(factors), source.shape
    outputs = sum(f[2].shape[1] for f in factors)
    if outputs * outputs * (batch + width) > k * k * batch * width:
        return None  # wide heads: the stacked J's Gramian is cheaper
    return factors


def factored_gradients(
    losses: Sequence[Tensor],
    source: Tensor,
    factors: Sequence[Factor],
    own_params: Sequence[Sequence[Tensor]],
) -> FactoredTaskGradients:
    """One backward pass through the heads that stops at the products' outputs: each
    task's ``δ_i`` and its head parameters' gradients (the graph is kept for the body)."""
    caught: dict[int, Tensor] = {}

    def catcher(i: int) -> Any:
        def hook(grad_outputs: tuple[Tensor, ...]) -> None:
            caught[i] = grad_outputs[0]

        return hook

    handles = [node.register_prehook(catcher(i)) for i, (node, _, _) in enumerate(factors)]
    flat_params = [p for params in own_params for p in params]
    edges = [torch.autograd.graph.GradientEdge(node, 0) for node, _, _ in factors]
    try:
        grads = torch.autograd.grad(
            torch.stack(list(losses)).sum(),
            [*edges, *flat_params],  # type: ignore[list-item]
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    k = len(factors)
    deltas = [caught.get(i, grads[i]) for i in range(k)]
    dtype = jacobian_dtype(
        [source, *(d for d in deltas if d is not None), *(f[2] for f in factors)]
    )
    batch = source.shape[0]
    columns = []
    for (_, alpha, right), delta in zip(factors, deltas):
        if delta is None:  # no gradient reached the product: a zero row, as in J
            delta = source.new_zeros((batch, right.shape[1]), dtype=dtype)
        delta = delta.to(dtype)
        columns.append(delta if alpha == 1.0 else delta * alpha)
    own: list[list[tuple[Tensor, Tensor]]] = []
    rest = iter(grads[k:])
    for params in own_params:
        own.append([(p, g) for p, g in zip(params, rest) if g is not None])
    return FactoredTaskGradients(
        torch.cat(columns, dim=1),
        torch.cat([f[2].to(dtype) for f in factors], dim=1),
        [f[2].shape[1] for f in factors],
        source,
        own,
    )


class FactoredTaskGradients(TaskGradients):
    """Task gradients ``dL_i/dz = Δ_i M_iᵀ`` kept as their factors (see the module).

    ``deltas`` (B×S) holds ``a_i δ_i`` for every task side by side, ``mats`` (D×S) the
    ``M_i``; ``sizes[i] = o_i``. :meth:`gramian` and :meth:`combine` never form J;
    :attr:`jacobian` forms it (K × B·D) on first access.
    """

    def __init__(
        self,
        deltas: Tensor,
        mats: Tensor,
        sizes: Sequence[int],
        source: Tensor,
        own: list[list[tuple[Tensor, Tensor]]],
    ) -> None:
        self.deltas, self.mats, self.sizes = deltas, mats, list(sizes)
        self._jacobian: Tensor | None = None
        self._index: Tensor | None = None
        if any(s != 1 for s in self.sizes):  # the task of each column
            counts = torch.tensor(self.sizes, device=deltas.device)
            self._index = torch.repeat_interleave(
                torch.arange(len(self.sizes), device=deltas.device), counts
            )
        super().__init__(None, [source], own)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def jacobian(self) -> Tensor:
        """J (K × B·D), formed from the factors the first time it is asked for."""
        if self._jacobian is None:
            self._jacobian = self._form_jacobian()
        return self._jacobian

    @jacobian.setter
    def jacobian(self, value: Tensor | None) -> None:
        self._jacobian = value

    @property
    def dtype(self) -> torch.dtype:
        """J's dtype (that of the factors)."""
        return self.deltas.dtype

    def _form_jacobian(self) -> Tensor:
        k, (batch, width) = len(self.sizes), self.inputs[0].shape
        if self._index is None:  # one column per task: K outer products in one op
            left, right = self.deltas.T.contiguous(), self.mats.T.contiguous()
            return (left.unsqueeze(2) * right.unsqueeze(1)).view(k, batch * width)
        rows = []
        for delta, mat in zip(self.deltas.split(self.sizes, 1), self.mats.split(self.sizes, 1)):
            rows.append((delta @ mat.T).reshape(-1))
        return torch.stack(rows)

    def gramian(self) -> Tensor:
        """``G = J Jᵀ`` (K×K, float64) from the factors: block sums of ``(ΔᵀΔ) ⊙ (MᵀM)``.

        Summed in float64: the factors are only B×S and D×S, so this costs next to nothing,
        and the float32 rounding of the two sums (over B and over D, multiplied) would
        otherwise be larger than that of the stacked J's Gramian.
        """
        deltas, mats = self.deltas.double(), self.mats.double()
        products = (deltas.T @ deltas) * (mats.T @ mats)
        if self._index is None:
            return products
        k = len(self.sizes)
        rows = products.new_zeros((k, products.shape[1])).index_add_(0, self._index, products)
        return products.new_zeros((k, k)).index_add_(1, self._index, rows)

    def combine(self, weights: Tensor) -> Tensor:
        """``wᵀJ`` (B·D,) from the factors: ``Δ diag(w) Mᵀ``, flattened."""
        w = weights.to(device=self.deltas.device, dtype=self.deltas.dtype)
        if self._index is not None:
            w = w.index_select(0, self._index)
        return ((self.deltas * w) @ self.mats.T).reshape(-1)


def aggregate_task_gradients(
    balancer: GradientBalancer, grads: TaskGradients, losses: Tensor
) -> tuple[Tensor, Tensor]:
    """``balancer.aggregate(grads.jacobian, losses)``: ``(direction, weights)``.

    For factored gradients and a balancer whose step is the default one (weights from the
    Gramian, ``wᵀJ``, every task present), the same computation from the factors, J never
    formed; otherwise J is formed and ``aggregate`` runs as usual.
    """
    from taskbalance.aggregation.base import GradientBalancer

    if (
        isinstance(grads, FactoredTaskGradients)
        and balancer.needs == "gramian"
        and balancer.current_subset is None
        and type(balancer).aggregate is GradientBalancer.aggregate
    ):
        weights = balancer.scaled_weights(grads.gramian().double(), losses)
        weights = weights.to(grads.dtype)
        return grads.combine(weights), weights
    return balancer.aggregate(grads.jacobian, losses)
