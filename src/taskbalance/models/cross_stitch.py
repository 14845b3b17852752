"""Cross-stitch networks (fully connected version).

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016. One column (network) per task; after each hidden layer a learnable
cross-stitch unit mixes the columns' activations, ``x̃_i = Σ_j α_ij x_j`` with one ``K x K``
matrix per layer. The paper stitches AlexNet columns for two tasks and initialises
``(α_S, α_D) = (0.9, 0.1)``; here ``α_ii = alpha_self`` and ``α_ij = (1 - alpha_self) /
(K - 1)`` (rows sum to 1; a single task gets ``[[1]]``). The paper also trains α with a
larger learning rate: :meth:`CrossStitchNetwork.stitch_parameters` gives them for a
separate optimizer parameter group.

Shapes: input ``(B, in_features)``; every column layer ``l`` outputs ``(B, hidden[l])``;
``stitches[l]`` is ``(K, K)``; output ``{task: (B, out_features[task])}``.

What is shared: once stitched with non-zero off-diagonal α, every column's hidden layers
(and every α) reach every task's loss, so ``shared_parameters()`` is all columns and all
stitch units and ``task_parameters(t)`` is column ``t``'s output layer;
:meth:`CrossStitchNetwork.column_parameters` lists column ``t``'s hidden layers. There is
no single shared representation (each task reads its own stitched activation), so no
``features`` split is offered: use ``shared=model.shared_parameters()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import OutFeatures, module_params, out_sizes


def stitch_init(k: int, alpha_self: float) -> Tensor:
    """The ``(k, k)`` initial cross-stitch matrix: ``alpha_self`` on the diagonal."""
    if k == 1:
        return torch.ones(1, 1)
    off = (1.0 - alpha_self) / (k - 1)
    return torch.full((k, k), off) + (alpha_self - off) * torch.eye(k)


class CrossStitchNetwork(nn.Module):
    """One MLP column per task with cross-stitch units after every hidden layer.

    Args:
        in_features: input width.
        tasks: number of tasks or their names.
        hidden: hidden widths of every column (a stitch unit after each).
        out_features: output width, for all tasks or per task name.
        alpha_self: initial weight of a column's own activation (paper: 0.9).
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        hidden: Sequence[int] = (64, 64),
        out_features: OutFeatures = 1,
        alpha_self: float = 0.9,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden needs at least one layer")
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        widths = [in_features, *hidden]
        self.columns = nn.ModuleDict(
            {
                t: nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden)))
                for t in self.tasks
            }
        )
        k = len(self.tasks)
        self.stitches = nn.ParameterList(nn.Parameter(stitch_init(k, alpha_self)) for _ in hidden)
        self.outputs = nn.ModuleDict({t: nn.Linear(hidden[-1], n) for t, n in sizes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hs = [x] * len(self.tasks)
        for i, alpha in enumerate(self.stitches):
            acts = torch.stack([torch.relu(self.columns[t][i](h)) for t, h in zip(self.tasks, hs)])
            hs = list(torch.einsum("ij,jbh->ibh", alpha, acts).unbind(0))
        return {t: self.outputs[t](h) for t, h in zip(self.tasks, hs)}

    def stitch_parameters(self) -> list[nn.Parameter]:
        """The cross-stitch matrices α, one ``(K, K)`` per hidden layer."""
        return list(self.stitches)

    def column_parameters(self, task: str) -> list[nn.Parameter]:
        """Column ``task``'s hidden layers (shared in the gradient sense: see the module doc)."""
        return list(self.columns[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every column's hidden layers and every stitch unit."""
        return module_params(self.columns, self.stitches)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Column ``task``'s output layer."""
        return list(self.outputs[task].parameters())
