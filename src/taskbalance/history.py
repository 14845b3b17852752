"""Per-step record of a balancer: task losses, task weights and method-specific extras."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: rows per preallocated chunk of the history buffers.
CHUNK_ROWS = 1024


class _Column:
    """A growing ``(rows, K)`` float64 buffer, kept in preallocated chunks.

    Writing a row is one copy into an existing chunk (no allocation per step, no host
    synchronisation); a new chunk is allocated every :data:`CHUNK_ROWS` rows.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.chunks: list[Tensor] = []
        self.rows = 0

    def append(self, values: Tensor) -> None:
        row = self.rows % CHUNK_ROWS
        if row == 0:
            self.chunks.append(
                torch.empty(CHUNK_ROWS, self.k, dtype=torch.float64, device=values.device)
            )
        self.chunks[-1][row].copy_(values.detach().reshape(self.k))
        self.rows += 1

    def read(self) -> Tensor:
        if not self.chunks:
            return torch.empty(0, self.k, dtype=torch.float64)
        full = torch.cat([c.to("cpu") for c in self.chunks])
        return full[: self.rows]

    def load(self, values: Tensor) -> None:
        values = values.to(torch.float64).reshape(-1, self.k)
        self.rows = values.shape[0]
        self.chunks = []
        for start in range(0, self.rows, CHUNK_ROWS):
            chunk = torch.empty(CHUNK_ROWS, self.k, dtype=torch.float64)
            part = values[start : start + CHUNK_ROWS]
            chunk[: part.shape[0]] = part
            self.chunks.append(chunk)


class History:
    """What a balancer saw and decided at every step.

    Row ``n`` holds the losses of step ``n``, the weights used for that step's update and
    the method's per-task extras (e.g. uncertainty weighting's ``sigma``) as they were
    when the weights were computed, i.e. before the step's own update of the method's
    parameters. Values are written into preallocated float64 chunks on the device they
    come from (no host synchronisation during training) and moved to the CPU only when
    read.

    Read as ``(steps, K)`` CPU tensors: :attr:`losses`, :attr:`weights`, and
    ``extra(name)``.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self._steps: list[int] = []
        self._losses = _Column(len(self.tasks))
        self._weights = _Column(len(self.tasks))
        self._extras: dict[str, _Column] = {}

    def append(self, step: int, losses: Tensor, weights: Tensor, **extras: Tensor) -> None:
        self._steps.append(step)
        self._losses.append(losses)
        self._weights.append(weights)
        for name, value in extras.items():
            column = self._extras.get(name)
            if column is None:
                column = self._extras[name] = _Column(len(self.tasks))
                column.load(torch.full((len(self._steps) - 1, len(self.tasks)), float("nan")))
            column.append(value)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def losses(self) -> Tensor:
        return self._losses.read()

    @property
    def weights(self) -> Tensor:
        return self._weights.read()

    @property
    def extra_names(self) -> list[str]:
        return list(self._extras)

    def extra(self, name: str) -> Tensor:
        if name not in self._extras:
            raise KeyError(f"no extra {name!r} recorded; recorded: {self.extra_names}")
        return self._extras[name].read()

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
        return {
            "steps": list(self._steps),
            "losses": self.losses,
            "weights": self.weights,
            "extras": {n: c.read() for n, c in self._extras.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = list(state["steps"])
        self._losses.load(state["losses"])
        self._weights.load(state["weights"])
        self._extras = {}
        for name, values in state["extras"].items():
            self._extras[name] = _Column(len(self.tasks))
            self._extras[name].load(values)
