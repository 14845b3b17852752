"""History: per-step losses, weights and extras; rows, CSV, state round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import taskbalance as tb
from conftest import save_load


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
