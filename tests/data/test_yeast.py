"""Yeast (MULAN): parsing, the loader's checks, and the real file (registry)."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from taskbalance.data import fetch
from taskbalance.data import yeast as yeast_mod
from taskbalance.data.fetch import DataFetchError, RegistryArchive
from taskbalance.data.yeast import YEAST_LABELS, load_yeast, parse_yeast_csv

HEADER = ",".join([f"Att{i}" for i in range(1, 104)] + [f"Class{i}" for i in range(1, 15)])


def row(value: float, labels: list[int]) -> str:
    return ",".join([str(value + i / 1000) for i in range(103)] + [str(v) for v in labels])


LABELS_A = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
LABELS_B = [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
TEXT = f"{HEADER}\n{row(0.5, LABELS_A)}\n{row(-0.25, LABELS_B)}\n"


def test_label_names() -> None:
    assert YEAST_LABELS[0] == "Class1" and YEAST_LABELS[-1] == "Class14"
    assert len(YEAST_LABELS) == 14


def test_parse_splits_features_and_labels() -> None:
    features, labels = parse_yeast_csv(TEXT)
    assert features.shape == (2, 103) and features.dtype == np.float32
    assert labels.shape == (2, 14) and labels.dtype == np.int8
    assert labels.tolist() == [LABELS_A, LABELS_B]
    assert features[0, 0] == np.float32(0.5) and features[0, 102] == np.float32(0.602)
    assert features[1, 1] == np.float32(-0.249)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (TEXT.replace("Att1,", "A1,", 1), r"header.*expected Att1\.\.Att103 then Class1"),
        (TEXT.replace(",Class14", ""), r"header has 116 columns"),
        (f"{HEADER}\n{row(0.5, [*LABELS_A[:-1], 2])}\n", r"labels hold values other than 0 and 1"),
        (f"{HEADER}\n{row(0.5, LABELS_A[:-1])}\n", r"rows have 116 fields, expected 117"),
    ],
)
def test_parse_rejects_other_layouts(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_yeast_csv(text)


@pytest.fixture
def fake_river(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake river wheel holding a two-row yeast.csv.gz, put into the cache by hand."""
    member = gzip.compress(TEXT.encode())
    root = tmp_path / "cache"
    root.mkdir()
    with zipfile.ZipFile(root / "river-0.26.1-py3-none-any.whl", "w") as zf:
        zf.writestr("river/datasets/yeast.csv.gz", member)
    archive = RegistryArchive(
        "river",
        "0.26.1",
        "wheel",
        1,
        members={"river/datasets/yeast.csv.gz": hashlib.sha256(member).hexdigest()},
    )
    monkeypatch.setattr(yeast_mod, "RIVER", archive)

    def no_pip(args: list[str], timeout: float) -> tuple[int, str]:
        raise AssertionError("pip must not run: the wheel is in the cache")

    monkeypatch.setattr(fetch, "_run_pip", no_pip)
    yeast_mod._load.cache_clear()
    yield root
    yeast_mod._load.cache_clear()


def test_file_with_another_row_count_is_refused(fake_river: Path) -> None:
    with pytest.raises(
        DataFetchError, match=r"yeast\.csv\.gz of river==0\.26\.1 has 2 rows, expected 2417"
    ):
        load_yeast(fake_river)


def test_loader_returns_fresh_copies(fake_river: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yeast_mod, "YEAST_ROWS", 2)
    features, labels = load_yeast(fake_river)
    assert labels.tolist() == [LABELS_A, LABELS_B]
    features[:] = 0
    labels[:] = 0
    again, again_labels = load_yeast(fake_river)
    assert again[0, 0] == np.float32(0.5) and again_labels.tolist() == [LABELS_A, LABELS_B]


def test_unparsable_member_is_a_data_fetch_error(
    fake_river: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = b"not gzip"
    with zipfile.ZipFile(fake_river / "river-0.26.1-py3-none-any.whl", "w") as zf:
        zf.writestr("river/datasets/yeast.csv.gz", member)
    archive = RegistryArchive(
        "river",
        "0.26.1",
        "wheel",
        1,
        members={"river/datasets/yeast.csv.gz": hashlib.sha256(member).hexdigest()},
    )
    monkeypatch.setattr(yeast_mod, "RIVER", archive)
    with pytest.raises(DataFetchError, match=r"cannot parse river/datasets/yeast\.csv\.gz"):
        load_yeast(fake_river)


# ------------------------------------------------------------------ the real file
@pytest.mark.registry
def test_real_yeast_shapes_and_labels(yeast: tuple[np.ndarray, np.ndarray]) -> None:
    features, labels = yeast
    assert features.shape == (2417, 103) and features.dtype == np.float32
    assert labels.shape == (2417, 14) and labels.dtype == np.int8
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert (labels.sum(axis=0) > 0).all()  # every label has positives
    assert np.isfinite(features).all()
    # MULAN's figure: label cardinality 4.237 (10,241 labels on 2,417 genes)
    assert int(labels.sum()) == 10_241
    assert abs(labels.sum(axis=1).mean() - 4.237) < 5e-4
    assert labels.sum(axis=1).min() >= 1  # every gene has at least one class
