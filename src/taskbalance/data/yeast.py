"""Yeast: 2,417 genes, 103 features, 14 functional classes (multi-label).

Data: A. Elisseeff and J. Weston, "A kernel method for multi-labelled classification",
NIPS 2001 (gene expression and phylogenetic-profile features of *Saccharomyces
cerevisiae* genes, labels from the functional classes of the MIPS catalogue), in the form
distributed by MULAN (Tsoumakas et al., JMLR 2011; 2,417 examples, 103 numeric features,
14 labels, label cardinality 4.237). The file comes from the PyPI wheel ``river==0.26.1``
(:data:`~taskbalance.data.fetch.RIVER`), which ships it as ``river/datasets/yeast.csv.gz``
(header ``Att1..Att103, Class1..Class14``). The wheel is fetched once with ``pip download``
into the data cache directory (see :func:`taskbalance.data.fetch.cache_dir`), never
installed; the member's SHA-256 is checked. Parsing takes well under a second, so no parsed
form is cached on disk.

Without the registry: put any ``river-0.26.1-*.whl`` into the cache directory and point
``TASKBALANCE_DATA`` (or ``data_dir=``) at it.
"""

from __future__ import annotations

import functools
import gzip
import io
from pathlib import Path

import numpy as np

from taskbalance.data.fetch import RIVER, DataFetchError, cache_dir, read_member

#: the 14 label columns, in file order.
YEAST_LABELS: tuple[str, ...] = tuple(f"Class{i}" for i in range(1, 15))
#: the 103 feature columns, in file order.
YEAST_FEATURES: tuple[str, ...] = tuple(f"Att{i}" for i in range(1, 104))
#: rows of the data set.
YEAST_ROWS = 2417

_MEMBER = "river/datasets/yeast.csv.gz"


def parse_yeast_csv(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, 103)`` float32 and labels ``(n, 14)`` int8 of a Yeast CSV with the
    header ``Att1..Att103, Class1..Class14``.

    Raises:
        ValueError: the header or a row differs from that layout, or a label is not 0/1.
    """
    header, _, body = text.partition("\n")
    names = tuple(name.strip() for name in header.split(","))
    if names != YEAST_FEATURES + YEAST_LABELS:
        raise ValueError(
            f"the Yeast header has {len(names)} columns starting {names[:3]}..., expected "
            "Att1..Att103 then Class1..Class14"
        )
    values = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    if values.shape[1] != len(names):
        raise ValueError(f"the Yeast rows have {values.shape[1]} fields, expected {len(names)}")
    labels = values[:, len(YEAST_FEATURES) :]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("the Yeast labels hold values other than 0 and 1")
    features = values[:, : len(YEAST_FEATURES)].astype(np.float32)
    return features, labels.astype(np.int8)


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = read_member(RIVER, _MEMBER, root)
    try:
        features, labels = parse_yeast_csv(gzip.decompress(raw).decode("utf-8"))
    except (ValueError, OSError, EOFError) as err:
        raise DataFetchError(f"cannot parse {_MEMBER} of {RIVER.requirement}: {err}") from err
    if features.shape != (YEAST_ROWS, len(YEAST_FEATURES)):
        raise DataFetchError(
            f"{_MEMBER} of {RIVER.requirement} has {features.shape[0]} rows, expected {YEAST_ROWS}"
        )
    return features, labels


def load_yeast(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(2417, 103)`` float32 and labels ``(2417, 14)`` int8 in {0, 1} (columns
    :data:`YEAST_LABELS`), fresh copies on every call.

    Raises:
        RegistryUnreachable: the wheel is not cached and the registry cannot be reached.
        DataFetchError: a checksum does not match, or the file is not as published.
    """
    features, labels = _load(cache_dir(data_dir).resolve())
    return features.copy(), labels.copy()


__all__ = ["YEAST_FEATURES", "YEAST_LABELS", "YEAST_ROWS", "load_yeast", "parse_yeast_csv"]
