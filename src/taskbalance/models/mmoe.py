"""Multi-gate Mixture-of-Experts (MMoE) and its one-gate variant (OMoE).

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018. Experts ``f_e`` are MLPs on the input; task
``k`` has its own gate ``g_k(x) = softmax(W_k x)`` over the experts and a tower ``h_k``:
``y_k = h_k(sum_e g_k(x)_e f_e(x))``. OMoE (the paper's ablation) uses one gate for every
task, so the gated mixture is a single shared representation.

Shapes: input ``(B, in_features)``; experts ``(B, num_experts, expert_hidden[-1])``; gate
outputs ``(B, num_experts)``, rows summing to 1; output ``{task: (B, out_features[task])}``.

What is shared: MMoE: the experts (``shared_parameters()``); the gates and towers are
task-specific. ``features(x)`` is the expert output ``(B, E, D)`` and the heads need the
input again for the gates: ``out = model.heads(z, x)``. OMoE: experts and the single gate
are shared and ``features(x)`` is the mixture ``(B, D)``; ``heads(z)`` needs no ``x``.
Either way ``out = model.heads(model.features(x), x)`` is ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import ExpertBank, OutFeatures, mix, mlp, module_params, out_sizes


class MMoE(nn.Module):
    """MMoE with ``num_experts`` MLP experts, one softmax gate per task, one tower per task.

    Args:
        in_features: input width.
        tasks: number of tasks or their names.
        num_experts: number of experts (paper's synthetic setup: 8).
        expert_hidden: layer widths of each expert (paper: one layer of 16 units).
        tower_hidden: hidden widths of each tower (paper: 8).
        out_features: output width, for all tasks or per task name.
        shared_gate: one gate for all tasks (OMoE) instead of one per task.

    Attributes: ``experts`` (:class:`~taskbalance.models._layers.ExpertBank`; layer ``l``
    weight ``(num_experts, in_l, out_l)``), ``gates`` (``{task: Linear(in_features,
    num_experts)}``, or the single key ``"shared"`` for OMoE), ``towers``.
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        self.shared_gate = shared_gate
        self.experts = ExpertBank(num_experts, in_features, expert_hidden)
        gate_names = ("shared",) if shared_gate else self.tasks
        self.gates = nn.ModuleDict({g: nn.Linear(in_features, num_experts) for g in gate_names})
        width = self.experts.out_features
        self.towers = nn.ModuleDict({t: mlp(width, tower_hidden, n) for t, n in sizes.items()})

    def _gate(self, task: str) -> nn.Linear:
        return self.gates["shared" if self.shared_gate else task]

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: (B, num_experts)}`` softmax gate outputs (the same tensor for OMoE)."""
        return {t: self._gate(t)(x).softmax(dim=-1) for t in self.tasks}

    def features(self, x: Tensor) -> Tensor:
        """MMoE: the expert outputs ``(B, E, D)``; OMoE: the gated mixture ``(B, D)``."""
        experts = self.experts(x)
        return mix(self.gates["shared"](x), experts) if self.shared_gate else experts

    def heads(self, z: Tensor, x: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs from :meth:`features`; MMoE needs the input ``x`` for its gates
        (OMoE ignores it)."""
        if self.shared_gate:
            return {t: tower(z) for t, tower in self.towers.items()}
        if x is None:
            raise ValueError("MMoE.heads(z, x) needs the input x for the per-task gates")
        return {t: tower(mix(self.gates[t](x), z)) for t, tower in self.towers.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(x), x)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts (and, for OMoE, the single gate)."""
        if self.shared_gate:
            return module_params(self.experts, self.gates["shared"])
        return list(self.experts.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s tower (and, for MMoE, its gate)."""
        if self.shared_gate:
            return list(self.towers[task].parameters())
        return module_params(self.gates[task], self.towers[task])


class OMoE(MMoE):
    """One-gate Mixture-of-Experts: :class:`MMoE` with ``shared_gate=True``."""

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
    ) -> None:
        super().__init__(
            in_features, tasks, num_experts, expert_hidden, tower_hidden, out_features, True
        )
