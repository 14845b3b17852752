"""Building blocks shared by the models: task-name handling, MLPs, batched expert banks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks, task_names

#: one output width for every task, or one per task name.
OutFeatures = int | Mapping[str, int]


def out_sizes(tasks: Tasks, out_features: OutFeatures) -> dict[str, int]:
    """``{task: output width}`` for ``tasks`` (a count or names)."""
    names = task_names(tasks)
    if isinstance(out_features, Mapping):
        missing = [t for t in names if t not in out_features]
        if missing:
            raise ValueError(f"out_features has no width for tasks {missing}")
        sizes = {t: int(out_features[t]) for t in names}
    else:
        sizes = dict.fromkeys(names, int(out_features))
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"output widths must be positive, got {sizes}")
    return sizes


def mlp(in_features: int, hidden: Sequence[int], out: int | None = None) -> nn.Sequential:
    """``Linear -> ReLU`` for each width in ``hidden``, then a plain ``Linear`` to ``out``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if out is not None:
        layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def unique(params: Iterable[Tensor]) -> list[Tensor]:
    """Parameters in order, each once."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class ExpertBank(nn.Module):
    """``num_experts`` independent MLPs (``Linear -> ReLU`` per width in ``hidden``) run as
    one batched matmul per layer.

    Layer ``l`` holds ``weight_l`` of shape ``(num_experts, in_l, out_l)`` and ``bias_l`` of
    shape ``(num_experts, out_l)``, initialised like :class:`torch.nn.Linear` (uniform in
    ``±1/sqrt(in_l)``). Input ``(B, in_features)``; output ``(B, num_experts, hidden[-1])``.
    """

    def __init__(self, num_experts: int, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError("an expert bank needs at least one expert and one layer")
        self.num_experts = num_experts
        self.out_features = int(hidden[-1])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        width = in_features
        for h in hidden:
            bound = 1.0 / math.sqrt(width)
            self.weights.append(
                nn.Parameter(torch.empty(num_experts, width, h).uniform_(-bound, bound))
            )
            self.biases.append(nn.Parameter(torch.empty(num_experts, h).uniform_(-bound, bound)))
            width = h

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weights[0], self.biases[0]
        e, i, o = w.shape
        # one (B, in) @ (in, E*out) matmul: faster than a batched einsum on CPU
        h = torch.relu(torch.addmm(b.reshape(-1), x, w.permute(1, 0, 2).reshape(i, e * o)))
        h = h.view(-1, e, o)
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = torch.relu(torch.einsum("bei,eio->beo", h, w) + b)
        return h


def mix(gate_logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax the gate logits ``(B, E)`` and mix the experts ``(B, E, D)`` into ``(B, D)``."""
    return (torch.softmax(gate_logits, dim=-1).unsqueeze(-1) * experts).sum(1)


def module_params(*modules: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the given modules, in order, as a list (safe to reuse every step)."""
    return [p for m in modules for p in m.parameters()]
