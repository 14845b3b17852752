"""Gradient diagnostics: the conflict structure between tasks, from the Gramian.

Pure functions, tensor in, tensor out, computed in float64 on the Gramian's device without
a host synchronisation. ``G = J Jᵀ`` is the K×K
Gramian of the task gradients (``G_ij = g_i·g_j``) and ``w`` the weights actually applied,
so that the update is ``d = wᵀJ``: then ``||d||² = wᵀGw`` and ``g_i·d = (Gw)_i``, and every
quantity below needs G and w only (K² numbers, never J). A method whose update is not
``wᵀJ`` (a Jacobian method such as GradDrop) gives :func:`update_alignment` the products
``J d`` and ``||d||`` directly.

Zero gradients. A task whose gradient is exactly zero (``G_ii = 0``: its loss does not
reach the shared part in this step, or an objective-sampling method left it out) has no
direction. The conventions, the same in every function: its cosines and its alignment are
``0``; it is left out of the norm ratio and of the conflict fraction. No function returns
NaN, and only :func:`loss_ratios` can return ``inf`` (a loss that started at exactly zero
and is no longer zero).

:class:`taskbalance.balancer.Balancer` records these values per step with
``diagnostics=True`` (see ``docs/diagnostics.md``); :func:`plot_diagnostics` draws them.
Loss-weighting methods, which form no task gradient, get their Gramian from
:func:`task_gramian` on the diagnosed steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from taskbalance.distributed import Sync
    from taskbalance.history import History

#: the prefix of every diagnostics column in a history and in the Lightning logs.
PREFIX = "diag"


def _gram(gramian: Tensor) -> Tensor:
    gramian = torch.as_tensor(gramian).detach().to(torch.float64)
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"the Gramian must be a square K×K matrix, got {tuple(gramian.shape)}")
    return gramian


def gradient_norms(gramian: Tensor) -> Tensor:
    """Each task's gradient norm, ``||g_i|| = sqrt(G_ii)``, shape ``(K,)``.

    A diagonal entry that rounding made slightly negative counts as 0.
    """
    return _gram(gramian).diagonal().clamp(min=0.0).sqrt()


def cosine_matrix(gramian: Tensor) -> Tensor:
    """Pairwise cosines ``cos_ij = G_ij / (||g_i|| ||g_j||)``, shape ``(K, K)``.

    ``cos_ij = 0`` when ``g_i`` or ``g_j`` is zero (so the diagonal is 1 for a non-zero
    gradient and 0 for a zero one); values are clamped to ``[-1, 1]`` against rounding.
    """
    gram = _gram(gramian)
    norms = gradient_norms(gram)
    outer = norms[:, None] * norms[None, :]
    nonzero = outer > 0
    cos = gram / torch.where(nonzero, outer, torch.ones_like(outer))
    return torch.where(nonzero, cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)


def norm_ratio(gramian: Tensor) -> Tensor:
    """``max_i ||g_i|| / min_i ||g_i||`` over the tasks with a non-zero gradient (0-d).

    Tasks with a zero gradient are left out (their norm is reported by
    :func:`gradient_norms`); the ratio is ``1`` when fewer than two tasks have a non-zero
    gradient. Always finite and at least 1.
    """
    norms = gradient_norms(gramian)
    nonzero = norms > 0
    smallest = torch.where(nonzero, norms, torch.full_like(norms, float("inf"))).min()
    ratio = norms.max() / smallest  # 0 / inf = 0 when every gradient is zero
    return torch.where(nonzero.sum() >= 2, ratio, torch.ones_like(ratio))  # no host sync


def conflict_fraction(gramian: Tensor) -> Tensor:
    """The fraction of conflicting pairs, ``#{i < j : cos_ij < 0} / #{i < j}`` (0-d).

    Only pairs of two non-zero gradients count (in the numerator and the denominator);
    ``0`` when there is no such pair (fewer than two non-zero gradients). ``cos_ij < 0``
    is decided on the sign of ``G_ij``.
    """
    gram = _gram(gramian)
    k = gram.shape[0]
    nonzero = gram.diagonal() > 0
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=gram.device), diagonal=1)
    pairs = upper & nonzero[:, None] & nonzero[None, :]
    count = pairs.sum().to(torch.float64)
    conflicts = ((gram < 0) & pairs).sum().to(torch.float64)
    return conflicts / count.clamp(min=1.0)  # 0 / 1 without a pair; no host sync


def update_alignment(task_dot_update: Tensor, norms: Tensor, update_norm: Tensor) -> Tensor:
    """Each task's alignment with the applied update, ``g_i·d / (||g_i|| ||d||)``, ``(K,)``.

    Args:
        task_dot_update: ``g_i·d`` per task (``(Gw)_i``, or ``(J d)_i``).
        norms: ``||g_i||`` per task (:func:`gradient_norms`).
        update_norm: ``||d||`` (0-d).

    ``0`` for a task with a zero gradient and for every task when ``d = 0``; clamped to
    ``[-1, 1]`` against rounding. A negative value means the step increased that task's
    loss to first order (it was hurt by the update).
    """
    dots = torch.as_tensor(task_dot_update).detach().to(torch.float64).reshape(-1)
    norms = torch.as_tensor(norms).detach().to(dots)
    scale = norms * torch.as_tensor(update_norm).detach().to(dots)
    nonzero = scale > 0
    out = dots / torch.where(nonzero, scale, torch.ones_like(scale))
    return torch.where(nonzero, out, torch.zeros_like(out)).clamp(-1.0, 1.0)


def alignment(gramian: Tensor, weights: Tensor) -> Tensor:
    """:func:`update_alignment` for the update ``d = wᵀJ``: ``(Gw)_i / (||g_i|| sqrt(wᵀGw))``.

    ``wᵀGw`` that rounding made slightly negative counts as 0 (then every alignment is 0).
    """
    gram = _gram(gramian)
    w = torch.as_tensor(weights).detach().to(gram).reshape(-1)
    if w.numel() != gram.shape[0]:
        raise ValueError(f"expected {gram.shape[0]} weights, got {w.numel()}")
    gw = gram @ w
    return update_alignment(gw, gradient_norms(gram), (w @ gw).clamp(min=0.0).sqrt())


def loss_ratios(losses: Tensor, initial: Tensor) -> Tensor:
    """``L_i / L_i(0)``, shape ``(K,)``.

    Where ``L_i(0) = 0`` the ratio is ``1`` if ``L_i = 0`` as well, else ``inf`` (a loss
    that started at zero has no scale to compare with; ``inf`` says it is no longer zero).
    Meant for non-negative losses; for others it is the plain quotient.
    """
    now = torch.as_tensor(losses).detach().to(torch.float64).reshape(-1)
    first = torch.as_tensor(initial).detach().to(now).reshape(-1)
    if first.numel() != now.numel():
        raise ValueError(f"expected {now.numel()} initial losses, got {first.numel()}")
    zero = first == 0
    ratio = now / torch.where(zero, torch.ones_like(first), first)
    at_zero = torch.where(now == 0, torch.ones_like(now), torch.full_like(now, float("inf")))
    return torch.where(zero, at_zero, ratio)


def pair_labels(tasks: Sequence[str]) -> list[str]:
    """The names of the pairs ``i < j`` in the order of :func:`upper_pairs`: ``"<a>-<b>"``."""
    return [f"{a}-{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]


def upper_pairs(matrix: Tensor) -> Tensor:
    """The entries ``i < j`` of a K×K matrix, row by row, shape ``(K(K-1)/2,)``."""
    k = matrix.shape[0]
    rows, cols = torch.triu_indices(k, k, offset=1, device=matrix.device)
    return matrix[rows, cols]


def step_diagnostics(
    gramian: Tensor,
    weights: Tensor | None = None,
    *,
    task_dot_update: Tensor | None = None,
    update_norm: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every per-step diagnostic but the loss ratios, keyed by the history's column groups.

    ``diag/cos`` (the pairs ``i < j``), ``diag/norm`` (per task), ``diag/norm_ratio``,
    ``diag/conflict_fraction`` (one value each), ``diag/align`` (per task). The alignment
    is that of ``d = wᵀJ`` from ``weights``, or of the update given by ``task_dot_update``
    (``J d``) and ``update_norm`` (``||d||``) for a method whose update is not ``wᵀJ``.
    """
    gram = _gram(gramian)
    norms = gradient_norms(gram)
    if task_dot_update is not None and update_norm is not None:
        align = update_alignment(task_dot_update, norms, update_norm)
    elif weights is not None:
        align = alignment(gram, weights)
    else:
        raise ValueError("give the weights, or task_dot_update and update_norm")
    return {
        f"{PREFIX}/cos": upper_pairs(cosine_matrix(gram)),
        f"{PREFIX}/norm": norms,
        f"{PREFIX}/norm_ratio": norm_ratio(gram).reshape(1),
        f"{PREFIX}/conflict_fraction": conflict_fraction(gram).reshape(1),
        f"{PREFIX}/align": align,
    }


def task_gramian(
    losses: Sequence[Tensor],
    tasks: Sequence[str],
    *,
    shared: Any = None,
    features: Any = None,
    sync: Sync | None = None,
) -> tuple[Tensor, str | None]:
    """The float64 Gramian ``J Jᵀ`` of the task gradients, keeping the losses' graph, and
    a description of the tensors of ``shared=`` that only one task reaches (``None`` when
    there is none: in exact mode such a tensor looks like a head passed as shared).

    For the diagnostics of a loss-weighting method (which computes no task gradient of its
    own): the engine's exact mode with ``shared=`` (J over the shared parameters) or its
    features mode with ``features=`` (J over the shared representation; a
    :func:`taskbalance.fork` result gives the forked mode). The graph is kept, so the
    combined loss can be backpropagated afterwards; ``.grad`` is not touched. Under DDP
    (``sync``) the Gramian is the one the gradient methods use: that of the rank-averaged
    J in the exact mode, ``(1/R²) Σ_r J^r J^rᵀ`` in the features mode; the same on every
    rank. Runs with autocast off for the losses' device type.

    Raises:
        BalancerUsageError: neither ``shared=`` nor ``features=``, features that do not
            require grad, or a misuse the engine refuses (a loss that does not reach the
            shared part, a parameter used by two tasks but not in ``shared=``).
    """
    from taskbalance.errors import BalancerUsageError
    from taskbalance.gradients import (
        ForkedFeatures,
        autocast_disabled,
        describe_tensors,
        forked_task_jacobian,
        gramian,
        parameter_names,
        resolve_tensors,
        task_jacobian,
    )
    from taskbalance.sharded import fsdp_shared, fsdp_task_gramian

    names = list(tasks)
    single = None
    with autocast_disabled(losses[0] if losses else None):
        if isinstance(features, ForkedFeatures):
            jac = forked_task_jacobian(list(losses), features, names).jacobian
        elif features is not None:
            inputs = [features] if isinstance(features, Tensor) else list(features)
            if not all(isinstance(z, Tensor) and z.requires_grad for z in inputs):
                raise BalancerUsageError(
                    "features must be tensors that require grad (the shared body's output, "
                    "computed with autograd enabled)"
                )
            jac = task_jacobian(list(losses), inputs, names, features=True).jacobian
        elif shared is not None:
            layout = fsdp_shared(shared)
            if layout is not None:  # sharded by fully_shard: FSDP's backward gives the shards
                return fsdp_task_gramian(layout, list(losses), names, sync)
            inputs = resolve_tensors(shared)
            grads = task_jacobian(list(losses), inputs, names, features=False, retain_graph=True)
            jac = grads.jacobian
            if grads.single:
                found = [inputs[j] for j, _ in grads.single]
                single = describe_tensors(found, parameter_names(shared), limit=4)
        else:
            raise BalancerUsageError("give shared= or features= to compute the task gradients")
        if sync is None:
            return gramian(jac).double(), single
        if features is None:  # the Gramian of the global batch's J, as in the exact mode
            return gramian(sync.mean_(jac)).double(), single
        world = sync.world_size
        return sync.all_reduce([gramian(jac).double()], 1.0)[0] / (world * world), single


def summarize(history: History) -> dict[str, Any]:
    """A few numbers that sum up the diagnostics of ``history`` (``taskbalance diagnose``).

    Over the diagnosed rows (the others hold NaN): ``"diagnosed"`` (their number),
    ``"mean_conflict_fraction"``, ``"median_norm_ratio"`` (the lower median),
    ``"negative_alignment"``: for each task, on how many of them its alignment with the
    applied update was below 0 (the step hurt it to first order), most often first.

    Raises:
        ValueError: the history holds no diagnostics, or no diagnosed row.
    """
    if f"{PREFIX}/cos" not in history.extra_names:
        raise ValueError(
            "the history holds no diagnostics: build the balancer with diagnostics=True "
            "(or diagnostics=n for every n-th step)"
        )
    ratio = history.extra(f"{PREFIX}/norm_ratio")[:, 0]
    keep = ~torch.isnan(ratio)
    if not bool(keep.any()):
        raise ValueError("the history holds no diagnosed step")
    conflict = history.extra(f"{PREFIX}/conflict_fraction")[keep, 0]
    negative = (history.extra(f"{PREFIX}/align")[keep] < 0).sum(dim=0).tolist()
    order = sorted(range(len(history.tasks)), key=lambda i: (-negative[i], i))
    return {
        "diagnosed": int(keep.sum()),
        "mean_conflict_fraction": float(conflict.mean()),
        "median_norm_ratio": float(ratio[keep].median()),
        "negative_alignment": {history.tasks[i]: int(negative[i]) for i in order},
    }


def plot_diagnostics(history: History, path: str | Path) -> Path:
    """Draw the diagnostics recorded in ``history`` into one PNG at ``path``; return it.

    Four panels over the training steps: the pairwise cosines (one line per pair, or a
    heatmap pairs × steps when there are more than 6 tasks), the max/min gradient-norm
    ratio (log scale), the fraction of conflicting pairs, and each task's alignment with
    the applied update. Steps without diagnostics (``diagnostics=n`` with ``n > 1``) are
    left out. Draws with matplotlib's Agg canvas (no display needed, pyplot untouched).

    Raises:
        ValueError: the history holds no diagnostics (the balancer was built without
            ``diagnostics=``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = history.extra_names
    if f"{PREFIX}/cos" not in names:
        raise ValueError(
            "the history holds no diagnostics: build the balancer with diagnostics=True "
            "(or diagnostics=n for every n-th step)"
        )
    cos = history.extra(f"{PREFIX}/cos")
    ratio = history.extra(f"{PREFIX}/norm_ratio")[:, 0]
    conflict = history.extra(f"{PREFIX}/conflict_fraction")[:, 0]
    align = history.extra(f"{PREFIX}/align")
    keep = ~torch.isnan(ratio)
    steps = torch.tensor(history.steps, dtype=torch.float64)[keep]
    cos, ratio, conflict, align = cos[keep], ratio[keep], conflict[keep], align[keep]
    pairs = history.extra_columns(f"{PREFIX}/cos")
    tasks = history.tasks

    fig = Figure(figsize=(8, 11))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True)
    ax = axes[0]
    if len(tasks) > 6:
        extent = (float(steps[0]), float(steps[-1]) if len(steps) > 1 else float(steps[0]) + 1)
        image = ax.imshow(
            cos.T.numpy(),
            aspect="auto",
            cmap="RdBu",
            vmin=-1.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(extent[0], extent[1], len(pairs) - 0.5, -0.5),
        )
        fig.colorbar(image, ax=ax, label="cosine")
        ax.set_ylabel(f"pair (of {len(pairs)})")
    else:
        for j, pair in enumerate(pairs):
            ax.plot(steps.numpy(), cos[:, j].numpy(), label=pair)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("cosine")
        ax.legend(fontsize="small", ncol=2)
    ax.set_title("pairwise cosine of the task gradients")
    axes[1].plot(steps.numpy(), ratio.numpy())
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max/min norm")
    axes[1].set_title("gradient norm ratio")
    axes[2].plot(steps.numpy(), conflict.numpy())
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_ylabel("fraction")
    axes[2].set_title("conflicting pairs (cos < 0)")
    for i, task in enumerate(tasks):
        axes[3].plot(steps.numpy(), align[:, i].numpy(), label=task)
    axes[3].axhline(0.0, color="grey", linewidth=0.8)
    axes[3].set_ylim(-1.05, 1.05)
    axes[3].set_ylabel("cos(g_i, d)")
    axes[3].set_title("alignment of each task with the applied update")
    axes[3].set_xlabel("step")
    if len(tasks) <= 12:
        axes[3].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
