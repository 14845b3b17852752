"""Hard parameter sharing ("shared bottom"): one shared MLP, one tower per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997; the shared-bottom baseline of
Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (one hidden layer of 113 units, towers of 8 units, in the
synthetic experiment).

Shapes: input ``(B, in_features)``; shared representation ``z = model.features(x)`` of
shape ``(B, shared_hidden[-1])``; output ``{task: (B, out_features[task])}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import OutFeatures, mlp, out_sizes


class HardParameterSharing(nn.Module):
    """A shared bottom MLP (``Linear -> ReLU`` per width of ``shared_hidden``) and, per task,
    a tower MLP (``Linear -> ReLU`` per width of ``tower_hidden``, then a ``Linear``).

    Args:
        in_features: input width.
        tasks: number of tasks or their names (outputs are keyed by name; ``"0"``, ``"1"``...
            for a count).
        shared_hidden: widths of the shared bottom's layers (at least one).
        tower_hidden: hidden widths of each tower (may be empty: a linear head).
        out_features: output width, for all tasks or per task name.

    ``shared_parameters()`` is the bottom; ``task_parameters(t)`` is tower ``t``. For
    feature-level gradient methods use ``z = model.features(x)``, ``out = model.heads(z, x)``
    and pass ``features=z``.
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        shared_hidden: Sequence[int] = (113,),
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
    ) -> None:
        super().__init__()
        if not shared_hidden:
            raise ValueError("shared_hidden needs at least one layer")
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        self.bottom = mlp(in_features, shared_hidden)
        self.towers = nn.ModuleDict(
            {t: mlp(shared_hidden[-1], tower_hidden, n) for t, n in sizes.items()}
        )

    def features(self, x: Tensor) -> Tensor:
        """The shared representation ``(B, shared_hidden[-1])``."""
        return self.bottom(x)

    def heads(self, z: Tensor, x: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs from the shared representation (``x`` is accepted and unused)."""
        return {t: tower(z) for t, tower in self.towers.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared bottom's parameters."""
        return list(self.bottom.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Tower ``task``'s parameters."""
        return list(self.towers[task].parameters())
