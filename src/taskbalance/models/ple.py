"""Progressive Layered Extraction (PLE) and its single-level form, CGC.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020. Each extraction level holds
task-specific experts (one bank per task) and shared experts. Task ``k``'s gate mixes its
own experts and the shared ones; at every level but the last a shared gate mixes *all*
experts of the level and feeds the next level's shared experts. Customized Gate Control
(CGC) is a single level; towers sit on the last level's task outputs.

Shapes: input ``(B, in_features)``; every expert outputs ``expert_hidden[-1] = D``
features; a task gate outputs ``(B, num_specific + num_shared)``, the shared gate
``(B, K num_specific + num_shared)``, rows summing to 1; output
``{task: (B, out_features[task])}``.

What is shared: below the last level the shared gate routes every task's experts into the
common path, so all parameters there are reached by every task loss and are in
``shared_parameters()`` (task gates too, except those of the level just below the last,
which feed their own task only). ``task_parameters(t)``: tower ``t``, the last level's
experts and gate of ``t`` and (PLE) ``t``'s gate one level below. ``features(x)`` is the
list ``[S, h_1, ..., h_K]``: the last level's shared experts ``S`` ``(B, num_shared, D)``
and each task's input to the last level ``h_k`` ``(B, D)``; for CGC it is ``[S]`` and the
task inputs are ``x`` itself, so call ``heads(z, x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import ExpertBank, OutFeatures, mix, mlp, module_params, out_sizes


class ExtractionLevel(nn.Module):
    """One level: ``specific[t]`` and ``shared`` expert banks, ``gates[t]`` and (when
    ``with_shared_gate``) a ``shared_gate`` over every expert of the level."""

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[str],
        num_specific: int,
        num_shared: int,
        expert_hidden: Sequence[int],
        with_shared_gate: bool,
    ) -> None:
        super().__init__()
        self.specific = nn.ModuleDict(
            {t: ExpertBank(num_specific, in_features, expert_hidden) for t in tasks}
        )
        self.shared = ExpertBank(num_shared, in_features, expert_hidden)
        self.gates = nn.ModuleDict(
            {t: nn.Linear(in_features, num_specific + num_shared) for t in tasks}
        )
        total = len(tasks) * num_specific + num_shared
        self.shared_gate = nn.Linear(in_features, total) if with_shared_gate else None

    def forward(
        self, inputs: dict[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Task inputs ``{t: (B, in)}`` and the shared input -> next level's inputs."""
        shared = self.shared(shared_input)
        own = {t: bank(inputs[t]) for t, bank in self.specific.items()}
        out = {t: mix(self.gates[t](inputs[t]), torch.cat([own[t], shared], 1)) for t in own}
        if self.shared_gate is None:
            return out, None
        every = torch.cat([*own.values(), shared], 1)
        return out, mix(self.shared_gate(shared_input), every)


class PLE(nn.Module):
    """PLE with ``num_levels`` extraction levels (CGC: one level) and one tower per task.

    Args:
        in_features: input width.
        tasks: number of tasks or their names.
        num_levels: extraction levels (1 gives CGC).
        num_specific_experts: experts per task per level.
        num_shared_experts: shared experts per level.
        expert_hidden: layer widths of every expert.
        tower_hidden: hidden widths of each tower.
        out_features: output width, for all tasks or per task name.
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        num_levels: int = 2,
        num_specific_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {num_levels}")
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        width = int(expert_hidden[-1])
        self.levels = nn.ModuleList(
            ExtractionLevel(
                in_features if i == 0 else width, self.tasks, num_specific_experts,
                num_shared_experts, expert_hidden, with_shared_gate=i < num_levels - 1,
            )
            for i in range(num_levels)
        )  # fmt: skip
        self.towers = nn.ModuleDict({t: mlp(width, tower_hidden, n) for t, n in sizes.items()})

    def _below_last(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        inputs, shared = dict.fromkeys(self.tasks, x), x
        for level in list(self.levels)[:-1]:
            inputs, shared = level(inputs, shared)
        return inputs, shared

    def gate_weights(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Per level, ``{task: (B, n_spec + n_shared)}`` (and ``"shared"``) gate outputs."""
        out = []
        inputs, shared = dict.fromkeys(self.tasks, x), x
        for level in self.levels:
            gates = {t: level.gates[t](inputs[t]).softmax(-1) for t in self.tasks}
            if level.shared_gate is not None:
                gates["shared"] = level.shared_gate(shared).softmax(-1)
            out.append(gates)
            inputs, shared = level(inputs, shared)
        return out

    def features(self, x: Tensor) -> list[Tensor]:
        """``[S, h_1, ..., h_K]`` (PLE) or ``[S]`` (CGC): see the module docstring."""
        if len(self.levels) == 1:
            return [self.levels[0].shared(x)]
        inputs, shared = self._below_last(x)
        return [self.levels[-1].shared(shared), *(inputs[t] for t in self.tasks)]

    def heads(self, z: Sequence[Tensor], x: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs from :meth:`features`; CGC (one level) needs the input ``x``."""
        last, shared = self.levels[-1], z[0]
        if len(self.levels) == 1 and x is None:
            raise ValueError("CGC heads(z, x) need the input x for the task experts and gates")
        out = {}
        for k, t in enumerate(self.tasks):
            h = x if len(self.levels) == 1 else z[1 + k]
            experts = torch.cat([last.specific[t](h), shared], 1)
            out[t] = self.towers[t](mix(last.gates[t](h), experts))
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(x), x)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Tower, last-level experts and gate of ``task`` (and its gate one level below)."""
        last = self.levels[-1]
        own = [self.towers[task], last.specific[task], last.gates[task]]
        if len(self.levels) > 1:
            own.append(self.levels[-2].gates[task])
        return module_params(*own)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not task-specific (see the module docstring)."""
        own = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in own]


class CGC(PLE):
    """Customized Gate Control: :class:`PLE` with a single extraction level (same keyword
    arguments, without ``num_levels``)."""

    def __init__(self, in_features: int, tasks: Tasks, **kw: Any) -> None:
        super().__init__(in_features, tasks, num_levels=1, **kw)
