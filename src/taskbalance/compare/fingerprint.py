"""A fingerprint of the code a comparison run depends on, stored with every cached run.

A cached run is reused only if its configuration matches; the configuration includes
:func:`code_fingerprint` of the method's class and of the problem's class, so that editing
a method (or the engine, or the problem's training loop) reruns the runs it affects instead
of silently reusing results of the old code. The fingerprint is the SHA-256 of the source
files of the two classes' modules (a problem defined outside the package included) and of
every taskbalance module they reach through their module-level names (functions, classes
and modules they import), transitively. Not followed: package ``__init__`` modules (they
re-export everything, and following them would tie every method to every other one) and
the modules that only present results (report, plots, the command line), so that a new
plot does not rerun a comparison.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from pathlib import Path
from typing import Any

PACKAGE = "taskbalance"
#: modules that shape how results are shown, not what they are
PRESENTATION = frozenset(
    {
        "taskbalance.cli",
        "taskbalance.compare.command",
        "taskbalance.compare.plots",
        "taskbalance.compare.report",
    }
)


def _module_name(value: Any) -> str | None:
    if isinstance(value, types.ModuleType):
        return value.__name__
    if inspect.isclass(value) or inspect.isfunction(value):
        return value.__module__
    return None


def _is_package(module: types.ModuleType) -> bool:
    return Path(getattr(module, "__file__", "") or "").name == "__init__.py"


def dependencies(*objects: Any) -> list[str]:
    """The modules that define ``objects`` (a problem of the user's own included) and the
    taskbalance modules they reach, transitively, through module-level names; sorted."""
    starts = {name for name in map(_module_name, objects) if name is not None}
    todo = list(starts)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name is None or name in seen or name in PRESENTATION or name == PACKAGE:
            continue
        if not name.startswith(PACKAGE + ".") and name not in starts:
            continue  # the objects' own modules count even outside the package
        module = sys.modules.get(name)
        if module is None:
            continue
        seen.add(name)
        if not _is_package(module):
            todo.extend(_module_name(value) for value in vars(module).values())
    return sorted(seen)


def code_fingerprint(*objects: Any) -> str:
    """A short hex digest of the source of :func:`dependencies` of ``objects``."""
    digest = hashlib.sha256()
    for name in dependencies(*objects):
        path = getattr(sys.modules[name], "__file__", None)
        digest.update(name.encode())
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
