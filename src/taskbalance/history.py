"""Per-step record of a balancer: task losses, task weights and method-specific extras.

Size. A row costs 16·K bytes per column plus its step number, in memory and in a
checkpoint. Two bounds keep long runs small:

* checkpoints: :meth:`History.state_dict` (inside ``balancer.state_dict()``) holds the
  last :attr:`History.checkpoint_rows` rows only (default :data:`CHECKPOINT_ROWS`);
  set it to ``None`` to save every row.
* memory: :meth:`History.stream_to` writes every row to a CSV file as training goes and
  keeps only the last ``keep`` rows in memory — the way to keep a complete record of a
  long run.

What ``weights`` means: row ``n`` holds the coefficient each task's gradient ``∇L_i``
received in step ``n``'s update (``docs/state.md`` lists it per method; the scales differ
between methods: DWA's sum to K, MGDA's to 1, uncertainty weighting's are ``exp(-s_i)``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

#: rows per preallocated chunk of the history buffers.
CHUNK_ROWS = 1024
#: rows of history a checkpoint keeps by default (the most recent ones).
CHECKPOINT_ROWS = 1000


class _Column:
    """A growing ``(rows, K)`` float64 buffer, kept in preallocated chunks.

    Writing a row is one copy into an existing chunk (no allocation per step, no host
    synchronisation); a new chunk is allocated every :data:`CHUNK_ROWS` rows. Rows can be
    dropped from the front (whole chunks are freed as they empty).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.chunks: list[Tensor] = []
        self.start = 0  # position of row 0 in chunks[0]
        self.rows = 0

    def append(self, values: Tensor) -> None:
        position = self.start + self.rows
        if position == len(self.chunks) * CHUNK_ROWS:
            self.chunks.append(
                torch.empty(CHUNK_ROWS, self.k, dtype=torch.float64, device=values.device)
            )
        self.chunks[-1][position % CHUNK_ROWS].copy_(values.detach().reshape(self.k))
        self.rows += 1

    def append_missing(self) -> None:
        """Append a row of NaN (a step that did not record this column)."""
        device = self.chunks[-1].device if self.chunks else None
        self.append(torch.full((self.k,), float("nan"), dtype=torch.float64, device=device))

    def read(self, first: int = 0) -> Tensor:
        """Rows ``first`` .. end as one CPU tensor."""
        if not self.chunks or first >= self.rows:
            return torch.empty(0, self.k, dtype=torch.float64)
        skip = (self.start + first) // CHUNK_ROWS  # chunks wholly before row ``first``
        full = torch.cat([c.to("cpu") for c in self.chunks[skip:]])
        offset = self.start + first - skip * CHUNK_ROWS
        # a copy, not a view: a saved view would carry the whole buffer into a checkpoint
        return full[offset : offset + self.rows - first].clone()

    def drop_front(self, n: int) -> None:
        n = min(n, self.rows)
        self.start += n
        self.rows -= n
        while self.start >= CHUNK_ROWS:
            self.chunks.pop(0)
            self.start -= CHUNK_ROWS

    def load(self, values: Tensor) -> None:
        values = values.to(torch.float64).reshape(-1, self.k)
        self.rows, self.start = values.shape[0], 0
        self.chunks = []
        for begin in range(0, self.rows, CHUNK_ROWS):
            chunk = torch.empty(CHUNK_ROWS, self.k, dtype=torch.float64)
            part = values[begin : begin + CHUNK_ROWS]
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

    Read as ``(rows, K)`` CPU tensors: :attr:`losses`, :attr:`weights`, and
    ``extra(name)``; :attr:`steps` gives each row's step number. See the module
    docstring for the bounds on checkpoints and memory.

    Extras are per task unless :meth:`define_extra` gave them other columns (the gradient
    diagnostics: one column per pair of tasks, or a single one). A row that does not give
    an extra recorded before holds NaN in its columns (diagnostics sampled every n-th step).
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self._steps: list[int] = []
        self._losses = _Column(len(self.tasks))
        self._weights = _Column(len(self.tasks))
        self._extras: dict[str, _Column] = {}
        self._labels: dict[str, tuple[str, ...]] = {}  # extras with columns of their own
        #: rows kept by :meth:`state_dict` (the most recent); ``None``: all of them.
        self.checkpoint_rows: int | None = CHECKPOINT_ROWS
        self._keep: int | None = None
        self._stream: _CsvStream | None = None

    def define_extra(self, name: str, columns: Sequence[str]) -> None:
        """Give the extra ``name`` its own columns (default: one per task).

        The CSV names them ``<name>/<column>``, or ``<name>`` alone for a single column
        named ``""``. Call it before the extra is first appended.
        """
        self._labels[name] = tuple(str(c) for c in columns)

    def extra_columns(self, name: str) -> list[str]:
        """The column names of the extra ``name`` (the tasks unless :meth:`define_extra`)."""
        return list(self._labels.get(name, self.tasks))

    def append(self, step: int, losses: Tensor, weights: Tensor, **extras: Tensor) -> None:
        self._steps.append(step)
        self._losses.append(losses)
        self._weights.append(weights)
        for name, value in extras.items():
            column = self._extras.get(name)
            if column is None:
                width = len(self._labels.get(name, self.tasks))
                column = self._extras[name] = _Column(width)
                column.load(torch.full((len(self._steps) - 1, width), float("nan")))
            column.append(value)
        if len(extras) < len(self._extras):  # extras this row lacks: NaN
            for name, column in self._extras.items():
                if name not in extras:
                    column.append_missing()
        if self._stream is not None and len(self._steps) - self._stream.written >= CHUNK_ROWS:
            self.flush()
        if self._keep is not None and len(self._steps) >= self._keep + CHUNK_ROWS:
            self._drop_front(len(self._steps) - self._keep)

    def _drop_front(self, n: int) -> None:
        if self._stream is not None:
            self.flush()  # nothing leaves memory before it is in the file
        del self._steps[:n]
        for column in (self._losses, self._weights, *self._extras.values()):
            column.drop_front(n)
        if self._stream is not None:
            self._stream.written -= n

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

    def header(self) -> list[str]:
        """The CSV columns: ``step``, ``loss/<task>``, ``weight/<task>``, ``<extra>/<task>``
        (``<extra>/<column>`` for the extras of :meth:`define_extra`)."""
        return ["step"] + [
            f"{prefix}/{label}" if label else prefix
            for prefix in ("loss", "weight", *self._extras)
            for label in self.extra_columns(prefix)
        ]

    def rows(self, first: int = 0) -> list[dict[str, Any]]:
        """One dict per row (from row ``first``), keyed by :meth:`header`."""
        columns = {"loss": self._losses.read(first), "weight": self._weights.read(first)}
        columns.update({name: c.read(first) for name, c in self._extras.items()})
        out = []
        for i, step in enumerate(self._steps[first:]):
            row: dict[str, Any] = {"step": step}
            for prefix, values in columns.items():
                for j, label in enumerate(self.extra_columns(prefix)):
                    row[f"{prefix}/{label}" if label else prefix] = float(values[i, j])
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` as CSV and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.header())
            writer.writeheader()
            writer.writerows(self.rows())
        return path

    # ------------------------------------------------------------------ streaming
    def stream_to(self, path: str | Path, *, keep: int | None = CHECKPOINT_ROWS) -> Path:
        """Write every row to the CSV file ``path`` as training goes; keep ``keep`` in memory.

        An existing file is appended to (a resumed run continues its file): its header is
        kept and rows whose step is not after the file's last step are not written again.
        The rows recorded so far are written at once; later rows are appended in blocks of
        :data:`CHUNK_ROWS` and at :meth:`flush` (also called by :meth:`state_dict`, so a
        checkpoint never holds a row the file lacks). In memory only the last ``keep`` rows
        (at most ``keep + CHUNK_ROWS``) stay; ``keep=None`` keeps every row. The columns are
        those of the first row written (extras that appear later are not streamed).
        """
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be a non-negative int or None, got {keep!r}")
        self.close()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = _CsvStream(path)
        self._keep = keep
        self.flush()
        return path

    def flush(self) -> None:
        """Append the rows not yet in the stream's file (a no-op without :meth:`stream_to`)."""
        stream = self._stream
        if stream is None or stream.written == len(self._steps):
            return
        rows = [r for r in self.rows(stream.written) if r["step"] > stream.last_step]
        stream.write(rows, self.header)
        stream.written = len(self._steps)

    def close(self) -> None:
        """Flush and close the stream's file (streaming stops; the file stays)."""
        if self._stream is not None:
            self.flush()
            self._stream.close()
            self._stream = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The last :attr:`checkpoint_rows` rows (all with ``None``)."""
        self.flush()
        first = 0
        if self.checkpoint_rows is not None:
            first = max(len(self._steps) - self.checkpoint_rows, 0)
        return {
            "steps": self._steps[first:],
            "losses": self._losses.read(first),
            "weights": self._weights.read(first),
            "extras": {n: c.read(first) for n, c in self._extras.items()},
            "extra_columns": {n: list(c) for n, c in self._labels.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = list(state["steps"])
        self._losses.load(state["losses"])
        self._weights.load(state["weights"])
        self._extras = {}
        self._labels.update(
            {n: tuple(c) for n, c in state.get("extra_columns", {}).items()}  # older: none
        )
        for name, values in state["extras"].items():
            self._extras[name] = _Column(len(self.extra_columns(name)))
            self._extras[name].load(values)
        if self._stream is not None:
            self._stream.written = len(self._steps)  # a resumed run appends new rows only


class _CsvStream:
    """An append-only CSV file whose header is written with the first rows (or read from
    the file when it exists: then the steps it already holds are not written again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0  # rows of the history (as now held in memory) already in the file
        self.fields: list[str] | None = None
        self.last_step = -1
        self._fh: IO[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as fh:
                self.fields = next(csv.reader(fh))
            last = _last_line(path)
            if last and not last.startswith("step"):
                self.last_step = int(float(last.split(",", 1)[0]))
        self._fh = path.open("a", newline="")  # created now, so that it exists from the start

    def write(self, rows: list[dict[str, Any]], header: Any) -> None:
        if not rows or self._fh is None:
            return
        if self.fields is None:
            self.fields = header()
            csv.writer(self._fh).writerow(self.fields)
        writer = csv.DictWriter(self._fh, fieldnames=self.fields, extrasaction="ignore")
        writer.writerows(rows)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _last_line(path: Path, block: int = 1 << 16) -> str:
    """The file's last non-empty line, read from the end (the file may be large)."""
    with path.open("rb") as fh:
        fh.seek(0, 2)
        end = fh.tell()
        tail = b""
        while end > 0:
            start = max(end - block, 0)
            fh.seek(start)
            tail = fh.read(end - start) + tail
            lines = tail.strip().splitlines()
            if len(lines) > 1 or start == 0:
                return lines[-1].decode() if lines else ""
            end = start
    return ""
