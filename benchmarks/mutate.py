"""Mutation testing of one method file against its own test file.

A mutant is the method file with one small, plausible bug: a comparison flipped or moved
across its boundary (``<`` → ``<=``), an arithmetic operator swapped (``+`` ↔ ``-``,
``*`` ↔ ``/``, ``**`` → ``*``), a unary minus or ``not`` dropped, a constant changed
(``0`` → ``1``, ``1`` → ``0``/``2``, ``2`` → ``1``, ``x`` → ``2x``, ``True`` ↔ ``False``),
``min`` ↔ ``max`` (``argmin``, ``amin`` ...), ``sum`` ↔ ``mean``, an ``abs`` / ``sqrt``
dropped, a state update (``self.x = ...``, ``x += ...``, an in-place ``x.mul_(...)``)
skipped, or a weights function returning equal weights of the same total
(``w * 0 + w.mean()``). Each mutant is run against the method's test file only
(``pytest -x -q -n 0 -p no:randomly -m "not reproduction" --hypothesis-seed=0
tests/<area>/test_<method>.py``):
a failing test *kills* it; a mutant the tests pass on *survives*, and is either a gap in
the tests or equivalent to the original (docs/mutation.md lists each one and which).

The source tree is never touched: ``src/``, ``tests/`` and ``pyproject.toml`` are copied
into a temporary directory, each mutant is written there (and the original text put back
after it), the tests run there with ``PYTHONPATH`` pointing at the copy, and the
directory is removed at the end, on Ctrl-C (or SIGTERM) included. The tests run with one thread
(``OMP_NUM_THREADS=1``), at ``nice`` 10, one mutant at a time. Hypothesis draws with a
fixed seed (``--hypothesis-seed=0``) and its example database is cleared before each
mutant: every mutant meets the same examples, so a measurement can be repeated (with fresh
random draws a mutant near a tolerance is killed in one run and not in the next).

Mutants are chosen deterministically: every mutation site of the file (code inside
``raise``, ``assert``, f-strings, warning and logging calls and ``__repr__`` is left
alone) gets one variant picked by a hash of its position, every equal-weights mutant is
kept, and the rest are a sample seeded by the file's path, ``--max`` in all.

Usage::

    python benchmarks/mutate.py src/taskbalance/aggregation/mgda.py      # 20 mutants
    python benchmarks/mutate.py --quick src/taskbalance/weighting/dwa.py  # 6 mutants
    python benchmarks/mutate.py --all --json runs/mutation.json           # every method file
    python benchmarks/mutate.py --list src/taskbalance/weighting/dwa.py   # mutants, no run
    python benchmarks/mutate.py --only 3,7 --show src/taskbalance/weighting/dwa.py
    python benchmarks/mutate.py --only 6 --tests tests/test_learnable.py src/.../famo.py

``make mutate FILE=src/taskbalance/aggregation/mgda.py [QUICK=1] [MAX=n]`` runs the first
form.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import difflib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path("src/taskbalance")
METHOD_DIRS = (PACKAGE / "weighting", PACKAGE / "aggregation")

#: test files of the files whose tests are not named after them (solver helpers).
TESTS_OF: dict[str, tuple[str, ...]] = {
    "src/taskbalance/aggregation/_qp.py": ("tests/aggregation/test_qp.py",),
    "src/taskbalance/aggregation/_simplex.py": ("tests/aggregation/test_qp.py",),
    "src/taskbalance/aggregation/_dual_cone.py": (
        "tests/aggregation/test_qp.py",
        "tests/aggregation/test_upgrad.py",
    ),
    "src/taskbalance/aggregation/_cagrad_solver.py": ("tests/aggregation/test_cagrad.py",),
    "src/taskbalance/aggregation/_margin_qp.py": ("tests/aggregation/test_pcd.py",),
    "src/taskbalance/aggregation/_fallback_solve.py": (
        "tests/aggregation/test_nash_mtl.py",
        "tests/aggregation/test_fairgrad.py",
    ),
    "src/taskbalance/aggregation/sdmgrad_os.py": ("tests/aggregation/test_sdmgrad.py",),
}

DEFAULT_MAX = 20
QUICK_MAX = 6

COMPARE_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.Pow: (ast.Mult,),
    ast.FloorDiv: (ast.Div,),
}
#: function / method names swapped for one another.
NAME_SWAPS: dict[str, str] = {
    "min": "max",
    "max": "min",
    "argmin": "argmax",
    "argmax": "argmin",
    "amin": "amax",
    "amax": "amin",
    "minimum": "maximum",
    "maximum": "minimum",
    "sum": "mean",
    "mean": "sum",
}
#: calls replaced by their argument (``abs(x)``, ``np.sqrt(x)``) or receiver (``x.abs()``).
DROPPED_CALLS = frozenset({"abs", "sqrt"})
#: in-place tensor updates whose statement may be skipped.
INPLACE = re.compile(r"^[a-z]+_$")
#: calls whose arguments are messages, not method logic.
MESSAGE_CALLS = frozenset(
    {"warn", "warning", "info", "debug", "error", "exception", "log", "_warn", "warn_once"}
)
SKIPPED_FUNCTIONS = frozenset({"__repr__", "extra_repr", "__str__"})
#: calls that build a constant tensor: returning equal weights instead is no mutation.
CONSTANT_TENSORS = frozenset({"ones", "ones_like", "full", "full_like", "zeros", "zeros_like"})


@dataclass
class Mutant:
    """One mutation: the source span it replaces and the text put there."""

    index: int
    kind: str
    line: int
    description: str
    start: tuple[int, int]  # (line, byte column) of the replaced span
    end: tuple[int, int]
    replacement: str
    outcome: str = ""  # killed / survived / timeout
    killed_by: str = ""
    seconds: float = 0.0


@dataclass
class FileResult:
    path: str
    tests: list[str]
    sites: int
    mutants: list[Mutant] = field(default_factory=list)
    baseline_seconds: float = 0.0

    @property
    def killed(self) -> int:
        return sum(m.outcome in ("killed", "timeout") for m in self.mutants)


# ----------------------------------------------------------------------- finding mutants


def _func_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _const_variants(value: object) -> list[object]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return {0: [1], 1: [0, 2], 2: [1]}.get(value, [value + 1])
    if isinstance(value, float):
        if value == 0.0:
            return [1.0]
        if value == 1.0:
            return [0.0, 2.0]
        return [value * 2]
    return []


class _Finder(ast.NodeVisitor):
    """Collects ``(kind, node, new node or None, description)`` for every mutation site."""

    def __init__(self) -> None:
        self.sites: list[tuple[str, ast.AST, list[tuple[ast.AST | str, str]]]] = []
        self._function: list[str] = []

    # --- scopes that are left alone
    def visit_Raise(self, node: ast.Raise) -> None:
        return

    def visit_Assert(self, node: ast.Assert) -> None:
        return

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        return  # annotations

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name in SKIPPED_FUNCTIONS:
            return
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self._function.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self._function.pop()

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.visit_FunctionDef(node)  # type: ignore[arg-type]

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant):
            return  # docstring
        call = node.value
        if isinstance(call, ast.Call) and _func_name(call) in MESSAGE_CALLS:
            return
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and INPLACE.match(call.func.attr)
            and self._function
        ):
            self.sites.append(("skip", node, [("pass", f"skip in-place .{call.func.attr}(...)")]))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _func_name(node)
        if name in MESSAGE_CALLS:
            return
        if name in NAME_SWAPS:
            new = copy.deepcopy(node)
            if isinstance(new.func, ast.Name):
                new.func.id = NAME_SWAPS[name]
            else:
                assert isinstance(new.func, ast.Attribute)
                new.func.attr = NAME_SWAPS[name]
            self.sites.append(("call", node, [(new, f"{name} -> {NAME_SWAPS[name]}")]))
        elif name in DROPPED_CALLS:
            if isinstance(node.func, ast.Attribute) and not node.args and not node.keywords:
                receiver = node.func.value
                if not (isinstance(receiver, ast.Name) and receiver.id in ("np", "math", "torch")):
                    self.sites.append(("call", node, [(receiver, f"drop .{name}()")]))
            elif len(node.args) == 1 and not node.keywords:
                self.sites.append(("call", node, [(node.args[0], f"drop {name}(...)")]))
        for keyword in node.keywords:
            if keyword.arg == "stacklevel":
                continue
            self.visit(keyword.value)
        self.visit(node.func)
        for arg in node.args:
            self.visit(arg)

    def visit_Compare(self, node: ast.Compare) -> None:
        variants: list[tuple[ast.AST | str, str]] = []
        for i, op in enumerate(node.ops):
            for swap in COMPARE_SWAPS.get(type(op), ()):
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                variants.append((new, f"{_op(op)} -> {_op(swap())}"))
        if variants:
            self.sites.append(("compare", node, variants))
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        swaps = BINOP_SWAPS.get(type(node.op), ())
        if swaps:
            variants: list[tuple[ast.AST | str, str]] = []
            for swap in swaps:
                new = copy.deepcopy(node)
                new.op = swap()
                variants.append((new, f"{_op(node.op)} -> {_op(swap())}"))
            self.sites.append(("arith", node, variants))
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        variants: list[tuple[ast.AST | str, str]] = []
        for swap in BINOP_SWAPS.get(type(node.op), ()):
            new = copy.deepcopy(node)
            new.op = swap()
            variants.append((new, f"{_op(node.op)}= -> {_op(swap())}="))
        if self._function:
            variants.append(("pass", f"skip {_op(node.op)}= update"))
        if variants:
            self.sites.append(("arith", node, variants))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        state = any(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)
        if state and self._function and self._function[-1] != "__init__":
            target = ast.unparse(node.targets[0])
            self.sites.append(("skip", node, [("pass", f"skip update of {target}")]))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, (ast.USub, ast.Not)):
            if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
                pass  # a negative literal: its constant mutation covers it
            else:
                self.sites.append(("unary", node, [(node.operand, f"drop {_op(node.op)}")]))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        variants: list[tuple[ast.AST | str, str]] = [
            (ast.Constant(value), f"{node.value!r} -> {value!r}")
            for value in _const_variants(node.value)
        ]
        if variants:
            self.sites.append(("const", node, variants))

    def visit_Return(self, node: ast.Return) -> None:
        value = node.value
        returns_weights = bool(self._function) and "weight" in self._function[-1].lower()
        if (
            returns_weights
            and value is not None
            and not isinstance(value, (ast.Tuple, ast.Constant, ast.Dict))
            and not (isinstance(value, ast.Call) and _func_name(value) in CONSTANT_TENSORS)
        ):
            equal = ast.parse(f"(lambda _w: _w * 0 + _w.mean())({ast.unparse(value)})").body[0]
            assert isinstance(equal, ast.Expr)
            self.sites.append(
                ("equal", value, [(equal.value, "return equal weights of the same total")])
            )
        self.generic_visit(node)


def _op(op: ast.AST) -> str:
    symbols = {
        ast.Lt: "<",
        ast.LtE: "<=",
        ast.Gt: ">",
        ast.GtE: ">=",
        ast.Eq: "==",
        ast.NotEq: "!=",
        ast.Is: "is",
        ast.IsNot: "is not",
        ast.In: "in",
        ast.NotIn: "not in",
        ast.Add: "+",
        ast.Sub: "-",
        ast.Mult: "*",
        ast.Div: "/",
        ast.Pow: "**",
        ast.FloorDiv: "//",
        ast.BitOr: "|",
        ast.BitAnd: "&",
        ast.Mod: "%",
        ast.USub: "-",
        ast.Not: "not",
    }
    return symbols.get(type(op), type(op).__name__)


def _render(new: ast.AST | str, old: ast.AST) -> str:
    if isinstance(new, str):
        return new
    text = ast.unparse(new)
    return text if isinstance(old, ast.stmt) else f"({text})"


def find_mutants(path: str, source: str) -> tuple[int, list[Mutant]]:
    """Every mutation site of ``source``, one variant each: ``(sites, mutants)``."""
    finder = _Finder()
    finder.visit(ast.parse(source))
    mutants = []
    for kind, node, variants in finder.sites:
        key = f"{path}:{node.lineno}:{node.col_offset}:{kind}"  # type: ignore[attr-defined]
        new, description = variants[zlib.crc32(key.encode()) % len(variants)]
        mutants.append(
            Mutant(
                index=-1,
                kind=kind,
                line=node.lineno,  # type: ignore[attr-defined]
                description=description,
                start=(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                end=(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
                replacement=_render(new, node),
            )
        )
    return len(finder.sites), mutants


def select(path: str, mutants: list[Mutant], limit: int) -> list[Mutant]:
    """Every equal-weights mutant, then a sample seeded by ``path``; in source order."""
    equal = [m for m in mutants if m.kind == "equal"]
    rest = [m for m in mutants if m.kind != "equal"]
    rng = random.Random(zlib.crc32(path.encode()))
    chosen = equal[:limit] + rng.sample(rest, max(0, min(len(rest), limit - len(equal))))
    chosen.sort(key=lambda m: (m.start, m.kind))
    for i, m in enumerate(chosen):
        m.index = i
    return chosen


def apply(source: str, mutant: Mutant) -> str:
    """``source`` with the mutant's span replaced (columns are UTF-8 byte offsets)."""
    lines = source.encode().splitlines(keepends=True)

    def offset(pos: tuple[int, int]) -> int:
        return sum(len(line) for line in lines[: pos[0] - 1]) + pos[1]

    data = source.encode()
    new = data[: offset(mutant.start)] + mutant.replacement.encode() + data[offset(mutant.end) :]
    text = new.decode()
    ast.parse(text)  # a mutant is always valid Python
    return text


# ----------------------------------------------------------------------- running them


def tests_for(path: str) -> list[str]:
    if path in TESTS_OF:
        return list(TESTS_OF[path])
    file = Path(path)
    area = file.parent.name
    return [f"tests/{area}/test_{file.stem}.py"]


def method_files() -> list[str]:
    """Every method file (a registered method lives there), then the solver helpers."""
    files = []
    for folder in METHOD_DIRS:
        for file in sorted((ROOT / folder).glob("*.py")):
            if not file.name.startswith("_") and file.name != "base.py":
                files.append(str(file.relative_to(ROOT)))
    return files + [file for file in TESTS_OF if file not in files]


@contextlib.contextmanager
def scratch_tree() -> Iterator[Path]:
    """A copy of src/, tests/ and pyproject.toml in a temporary directory, removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="taskbalance-mutate-"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
        shutil.copytree(ROOT / "src", tmp / "src", ignore=ignore)
        shutil.copytree(ROOT / "tests", tmp / "tests", ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", tmp / "pyproject.toml")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """Run ``tests`` in ``tree``: ``("passed" | "failed" | "timeout", first failure, s)``."""
    shutil.rmtree(tree / ".hypothesis", ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-n",
        "0",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-m",
        "not reproduction",
        "--hypothesis-seed=0",
        *tests,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: os.nice(10),  # the other engineers' tests first
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", "", time.perf_counter() - t0
    except BaseException:  # Ctrl-C: stop the tests, then let the copy be removed
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "passed", "", seconds
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
    if first is None:  # no test ran: an import or collection error
        tail = " / ".join(out.strip().splitlines()[-3:])
        return "failed", f"(exit {proc.returncode}) {tail[-200:]}", seconds
    return "failed", first.group(1), seconds


def mutate_file(
    path: str,
    limit: int,
    *,
    only: list[int] | None,
    show: bool,
    tree: Path,
    tests: list[str] | None = None,
) -> FileResult:
    source = (ROOT / path).read_text()
    sites, every = find_mutants(path, source)
    chosen = select(path, every, limit)
    if only is not None:
        chosen = [m for m in chosen if m.index in only]
    result = FileResult(path, tests or tests_for(path), sites)
    print(f"\n## {path}: {len(chosen)} of {sites} mutation sites; tests {' '.join(result.tests)}")
    status, failure, seconds = run_tests(tree, result.tests, timeout=1800)
    if status != "passed":
        raise SystemExit(f"the tests fail on the unmutated code ({failure}): fix them first")
    result.baseline_seconds = seconds
    timeout = max(60.0, 4 * seconds)
    print(f"baseline: tests pass in {seconds:.1f} s (timeout per mutant {timeout:.0f} s)")
    target = tree / path
    result.mutants = chosen
    try:
        for m in chosen:
            mutated = apply(source, m)
            if show:
                diff = difflib.unified_diff(
                    source.splitlines(), mutated.splitlines(), path, path, n=1, lineterm=""
                )
                print("\n".join(list(diff)[2:]))
            target.write_text(mutated)
            status, failure, m.seconds = run_tests(tree, result.tests, timeout)
            target.write_text(source)
            m.outcome = {"failed": "killed", "passed": "survived"}.get(status, status)
            m.killed_by = failure
            by = f" by {failure}" if failure else ""
            print(
                f"  [{m.index:2d}] line {m.line:4d} {m.kind:7s} {m.description:40.40s} "
                f"{m.outcome.upper()}{by} ({m.seconds:.0f} s)",
                flush=True,
            )
    finally:
        target.write_text(source)
    print(f"{path}: {result.killed}/{len(chosen)} killed")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="method files (src/taskbalance/...)")
    parser.add_argument("--all", action="store_true", help="every method file and solver helper")
    parser.add_argument("--max", type=int, default=None, help=f"mutants per file ({DEFAULT_MAX})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MAX} mutants per file")
    parser.add_argument("--only", default=None, help="run only these mutant indices (1,4,7)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--show", action="store_true", help="print each mutant's diff")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--tests",
        default=None,
        help="run these test files (comma-separated) instead of the method's own, e.g. to "
        "check that a survivor is killed elsewhere",
    )
    args = parser.parse_args(argv)
    files = method_files() if args.all else args.files
    if not files:
        parser.error(
            "give a method file (make mutate FILE=src/taskbalance/aggregation/mgda.py, "
            f"QUICK=1 for {QUICK_MAX} mutants) or --all (make mutate ALL=1)"
        )
    limit = args.max or (QUICK_MAX if args.quick else DEFAULT_MAX)
    only = [int(i) for i in args.only.split(",")] if args.only else None
    tests = args.tests.split(",") if args.tests else None
    for path in files:
        rel = Path(path).resolve().relative_to(ROOT) if Path(path).is_absolute() else Path(path)
        if not (ROOT / rel).is_file():
            parser.error(f"{path}: no such file under {ROOT}")
    files = [str(Path(p).resolve().relative_to(ROOT)) for p in files]
    for path in files:
        missing = [t for t in (tests or tests_for(path)) if not (ROOT / t).is_file()]
        if missing:
            parser.error(f"{path}: no test file {', '.join(missing)}; name one with --tests")

    if args.list:
        for path in files:
            source = (ROOT / path).read_text()
            sites, every = find_mutants(path, source)
            chosen = select(path, every, limit)
            print(f"\n## {path}: {len(chosen)} of {sites} sites; tests {tests_for(path)}")
            for m in chosen:
                print(f"  [{m.index:2d}] line {m.line:4d} {m.kind:7s} {m.description}")
                if args.show:
                    print(f"        -> {m.replacement}")
        return 0

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # a background run ignores Ctrl-C: SIGTERM / SIGHUP clean up the same way
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    results = []
    with scratch_tree() as tree:
        for path in files:
            results.append(
                mutate_file(path, limit, only=only, show=args.show, tree=tree, tests=tests)
            )
    print("\n| file | mutants | killed | kill rate | survivors (line: mutation) |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        survivors = "; ".join(
            f"[{m.index}] {m.line}: {m.description}" for m in r.mutants if m.outcome == "survived"
        )
        rate = r.killed / len(r.mutants) if r.mutants else 1.0
        print(f"| {r.path} | {len(r.mutants)} | {r.killed} | {rate:.0%} | {survivors} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = [{**asdict(r), "killed": r.killed} for r in results]
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
