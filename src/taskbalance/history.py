"""Per-step record of a balancer: task losses, task weights and method-specific extras."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class History:
    """What a balancer saw and decided at every step.

    Values are kept as detached tensors on the device they came from (no host
    synchronisation during training) and moved to the CPU only when read.

    Attributes read as ``(steps, K)`` CPU tensors: :attr:`losses`, :attr:`weights`,
    and ``extra(name)`` for method-specific per-task values (e.g. ``"sigma"``).
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self._steps: list[int] = []
        self._losses: list[Tensor] = []
        self._weights: list[Tensor] = []
        self._extras: dict[str, list[Tensor]] = {}

    def append(self, step: int, losses: Tensor, weights: Tensor, **extras: Tensor) -> None:
        self._steps.append(step)
        self._losses.append(losses.detach().clone())
        self._weights.append(weights.detach().clone())
        for name, value in extras.items():
            column = self._extras.setdefault(name, [])
            column.append(value.detach().clone())

    def __len__(self) -> int:
        return len(self._steps)

    @staticmethod
    def _stack(rows: list[Tensor], k: int) -> Tensor:
        if not rows:
            return torch.empty(0, k)
        return torch.stack([r.to("cpu", torch.float64) for r in rows])

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def losses(self) -> Tensor:
        return self._stack(self._losses, len(self.tasks))

    @property
    def weights(self) -> Tensor:
        return self._stack(self._weights, len(self.tasks))

    @property
    def extra_names(self) -> list[str]:
        return list(self._extras)

    def extra(self, name: str) -> Tensor:
        if name not in self._extras:
            raise KeyError(f"no extra {name!r} recorded; recorded: {self.extra_names}")
        return self._stack(self._extras[name], len(self.tasks))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per step: ``step``, ``loss/<task>``, ``weight/<task>``, ``<extra>/<task>``."""
        columns = {"loss": self.losses, "weight": self.weights}
        columns.update({name: self.extra(name) for name in self._extras})
        out = []
        for i, step in enumerate(self._steps):
            row: dict[str, Any] = {"step": step}
            for prefix, values in columns.items():
                for j, task in enumerate(self.tasks):
                    row[f"{prefix}/{task}"] = float(values[i, j])
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` as CSV and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        header = ["step"] + [
            f"{p}/{t}" for p in ["loss", "weight", *self._extras] for t in self.tasks
        ]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def state_dict(self) -> dict[str, Any]:
        k = len(self.tasks)
        return {
            "steps": list(self._steps),
            "losses": self._stack(self._losses, k),
            "weights": self._stack(self._weights, k),
            "extras": {n: self._stack(v, k) for n, v in self._extras.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = list(state["steps"])
        self._losses = list(state["losses"].unbind(0)) if len(self._steps) else []
        self._weights = list(state["weights"].unbind(0)) if len(self._steps) else []
        self._extras = {n: list(v.unbind(0)) for n, v in state["extras"].items()}
