"""History: per-step losses, weights and extras; rows, CSV, state round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import taskbalance as tb
from conftest import save_load
from taskbalance.history import CHECKPOINT_ROWS, CHUNK_ROWS


def filled() -> tb.History:
    hist = tb.History(["seg", "depth"])
    hist.append(
        0, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.5]), sigma=torch.tensor([1.0, 3.0])
    )
    hist.append(
        1, torch.tensor([0.5, 4.0]), torch.tensor([1.0, 1.0]), sigma=torch.tensor([2.0, 5.0])
    )
    return hist


def test_empty_history() -> None:
    hist = tb.History(["a", "b", "c"])
    assert len(hist) == 0
    assert hist.steps == []
    assert hist.losses.shape == (0, 3)
    assert hist.weights.shape == (0, 3)
    assert hist.rows() == []
    assert hist.extra_names == []


def test_columns_are_cpu_float64_steps_by_tasks() -> None:
    hist = filled()
    assert len(hist) == 2
    assert hist.steps == [0, 1]
    expected_losses = torch.tensor([[1.0, 2.0], [0.5, 4.0]], dtype=torch.float64)
    assert torch.equal(hist.losses, expected_losses)
    assert torch.equal(hist.weights, torch.tensor([[0.5, 1.5], [1.0, 1.0]], dtype=torch.float64))
    assert torch.equal(hist.extra("sigma"), torch.tensor([[1.0, 3.0], [2.0, 5.0]]).double())
    assert hist.extra_names == ["sigma"]
    assert hist.losses.device.type == "cpu"


def test_unknown_extra_raises_key_error() -> None:
    with pytest.raises(KeyError, match="sigma"):
        filled().extra("alpha")


def test_appended_values_are_copies() -> None:
    hist = tb.History(["a"])
    losses = torch.tensor([1.0])
    weights = torch.tensor([2.0])
    hist.append(0, losses, weights)
    losses.fill_(9.0)
    weights.fill_(9.0)
    assert hist.losses.item() == 1.0
    assert hist.weights.item() == 2.0


def test_rows() -> None:
    rows = filled().rows()
    assert rows == [
        {
            "step": 0,
            "loss/seg": 1.0,
            "loss/depth": 2.0,
            "weight/seg": 0.5,
            "weight/depth": 1.5,
            "sigma/seg": 1.0,
            "sigma/depth": 3.0,
        },
        {
            "step": 1,
            "loss/seg": 0.5,
            "loss/depth": 4.0,
            "weight/seg": 1.0,
            "weight/depth": 1.0,
            "sigma/seg": 2.0,
            "sigma/depth": 5.0,
        },
    ]
    assert all(isinstance(v, float) for row in rows for k, v in row.items() if k != "step")


def test_to_csv(tmp_path: Path) -> None:
    path = filled().to_csv(tmp_path / "sub" / "history.csv")
    assert path == tmp_path / "sub" / "history.csv"
    with path.open() as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        rows = list(reader)
    assert header == [
        "step",
        "loss/seg",
        "loss/depth",
        "weight/seg",
        "weight/depth",
        "sigma/seg",
        "sigma/depth",
    ]
    assert len(rows) == 2
    assert rows[1]["step"] == "1"
    assert float(rows[1]["loss/depth"]) == 4.0
    assert float(rows[0]["weight/depth"]) == 1.5
    assert float(rows[1]["sigma/seg"]) == 2.0


def test_to_csv_without_extras(tmp_path: Path) -> None:
    bal = tb.StaticWeighting(["a", "b"], weights=[3.0, 1.0])
    bal([torch.tensor(1.0), torch.tensor(2.0)])
    path = bal.history.to_csv(tmp_path / "h.csv")  # type: ignore[union-attr]
    lines = path.read_text().splitlines()
    assert lines[0] == "step,loss/a,loss/b,weight/a,weight/b"
    assert lines[1] == "0,1.0,2.0,3.0,1.0"


def test_state_round_trip() -> None:
    hist = filled()
    other = tb.History(["seg", "depth"])
    other.load_state_dict(save_load(hist.state_dict()))
    assert other.steps == hist.steps
    assert torch.equal(other.losses, hist.losses)
    assert torch.equal(other.weights, hist.weights)
    assert torch.equal(other.extra("sigma"), hist.extra("sigma"))
    assert other.rows() == hist.rows()
    # appending after a load continues the table
    other.append(
        2, torch.tensor([3.0, 3.0]), torch.tensor([1.0, 2.0]), sigma=torch.tensor([1.0, 1.0])
    )
    assert other.steps == [0, 1, 2]
    assert other.weights[2].tolist() == [1.0, 2.0]
    assert other.extra("sigma").shape == (3, 2)


def test_empty_state_round_trip() -> None:
    hist = tb.History(["a"])
    other = tb.History(["a"])
    other.load_state_dict(save_load(hist.state_dict()))
    assert len(other) == 0
    assert other.losses.shape == (0, 1)


def test_uncertainty_records_sigma() -> None:
    bal = tb.UncertaintyWeighting(["a", "b"])
    bal([torch.tensor(1.0), torch.tensor(2.0)])
    assert bal.history is not None
    assert bal.history.extra_names == ["sigma"]
    assert torch.equal(bal.history.extra("sigma"), torch.ones(1, 2, dtype=torch.float64))
    row = bal.history.rows()[0]
    assert set(row) == {"step", "loss/a", "loss/b", "weight/a", "weight/b", "sigma/a", "sigma/b"}


# ---------------------------------------------------------------------- bounds and streaming
def grown(n: int, k: int = 2) -> tuple[tb.History, torch.Tensor, torch.Tensor]:
    """A history of ``n`` rows with distinct, known values (row i: losses i + j, weights -i)."""
    hist = tb.History([str(j) for j in range(k)])
    losses = torch.arange(n, dtype=torch.float64)[:, None] + torch.arange(k)
    weights = -losses
    for i in range(n):
        hist.append(i, losses[i], weights[i])
    return hist, losses, weights


def test_a_checkpoint_keeps_the_last_rows_only() -> None:
    n = CHECKPOINT_ROWS + 1500
    hist, losses, weights = grown(n)
    state = save_load(hist.state_dict())
    assert state["steps"] == list(range(n - CHECKPOINT_ROWS, n))
    assert torch.equal(state["losses"], losses[-CHECKPOINT_ROWS:])
    assert torch.equal(state["weights"], weights[-CHECKPOINT_ROWS:])
    assert len(hist) == n  # memory keeps every row unless told otherwise


def test_checkpoint_rows_none_keeps_every_row() -> None:
    hist, losses, _ = grown(CHECKPOINT_ROWS + 10)
    hist.checkpoint_rows = None
    assert torch.equal(hist.state_dict()["losses"], losses)


def test_a_balancers_checkpoint_stays_bounded() -> None:
    bal = tb.make("equal", 3)
    for _ in range(3 * CHECKPOINT_ROWS):
        bal(torch.ones(3))
    state = bal.state_dict()
    assert len(state["history"]["steps"]) == CHECKPOINT_ROWS
    resumed = tb.make("equal", 3)
    resumed.load_state_dict(save_load(state))
    resumed(torch.ones(3))
    assert resumed.history.steps[-2:] == [3 * CHECKPOINT_ROWS - 1, 3 * CHECKPOINT_ROWS]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_streaming_writes_every_row_and_bounds_memory(tmp_path: Path) -> None:
    hist = tb.History(["a", "b"])
    hist.append(0, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    path = hist.stream_to(tmp_path / "h.csv", keep=100)
    n = 3 * CHUNK_ROWS + 7
    for i in range(1, n):
        hist.append(i, torch.tensor([float(i), i + 1.0]), torch.tensor([-float(i), 2.0]))
        assert len(hist) <= 100 + CHUNK_ROWS
    hist.close()
    rows = read_csv(path)
    assert [int(r["step"]) for r in rows] == list(range(n))
    assert [float(r["loss/a"]) for r in rows] == [float(i) for i in range(n)]
    assert [float(r["weight/a"]) for r in rows[1:]] == [-float(i) for i in range(1, n)]
    # what stays in memory is the tail, with the right values
    assert hist.steps[-1] == n - 1 and len(hist) >= 100
    assert torch.equal(hist.losses[:, 0], torch.tensor(hist.steps, dtype=torch.float64))


def test_a_checkpoint_flushes_the_stream(tmp_path: Path) -> None:
    hist = tb.History(["a"])
    path = hist.stream_to(tmp_path / "h.csv")
    for i in range(5):
        hist.append(i, torch.tensor([float(i)]), torch.tensor([1.0]))
    assert read_csv(path) == []  # buffered until a block fills
    hist.state_dict()
    assert len(read_csv(path)) == 5


def test_a_resumed_run_continues_its_file_without_repeating_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    bal = tb.make("equal", 2)
    bal.history.stream_to(path)
    for _ in range(30):
        bal(torch.ones(2))
    state = save_load(bal.state_dict())  # flushed: steps 0..29 are in the file
    for _ in range(5):
        bal(torch.ones(2))  # steps 30..34 of the first run: lost with the process
    bal.history.close()
    resumed = tb.make("equal", 2)
    resumed.load_state_dict(state)
    resumed.history.stream_to(path)
    for _ in range(10):
        resumed(2 * torch.ones(2))  # steps 30..39 again
    resumed.history.close()
    steps = [int(r["step"]) for r in read_csv(path)]
    assert steps == list(range(40))
    assert float(read_csv(path)[-1]["loss/0"]) == 2.0


def test_extras_appearing_after_rows_were_dropped_stay_aligned() -> None:
    hist = tb.History(["a", "b"])
    hist._keep = 10  # the memory bound of stream_to, without a file
    for i in range(2 * CHUNK_ROWS + 5):
        extras = {"sigma": torch.tensor([float(i), 0.0])} if i >= CHUNK_ROWS + 3 else {}
        hist.append(i, torch.tensor([float(i), 0.0]), torch.tensor([1.0, 1.0]), **extras)
    sigma = hist.extra("sigma")[:, 0]
    steps = torch.tensor(hist.steps, dtype=torch.float64)
    late = steps >= CHUNK_ROWS + 3
    assert torch.equal(sigma[late], steps[late])
    assert bool(torch.isnan(sigma[~late]).all())
    assert torch.equal(hist.losses[:, 0], steps)


@pytest.mark.parametrize("keep", [-1, 1.5, True])
def test_stream_keep_must_be_a_count(tmp_path: Path, keep: object) -> None:
    with pytest.raises(ValueError, match="keep"):
        tb.History(["a"]).stream_to(tmp_path / "h.csv", keep=keep)


def test_checkpoint_tensors_carry_no_hidden_buffer() -> None:
    hist, _, _ = grown(CHUNK_ROWS + 5)
    state = hist.state_dict()
    for values in (state["losses"], state["weights"]):
        assert values.untyped_storage().nbytes() == values.numel() * values.element_size()
