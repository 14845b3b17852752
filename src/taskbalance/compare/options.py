"""Which rows a comparison has: method specs (``cagrad``, ``cagrad[c=0.2]``) and options.

A *spec* names a registered method (or an alias), optionally with constructor arguments in
brackets: ``cagrad[c=0.2,rescale=1+c]``. Options (``--option cagrad.c=0.2`` on the command
line, ``options={"cagrad": {"c": 0.2}}`` in Python) set a value for every row of a method;
a bracketed value wins over an option, and both win over the problem's own settings
(:meth:`~taskbalance.compare.problem.ComparisonProblem.method_options`). Each distinct spec
is one row of the table, labelled by the spec in a canonical form (keys sorted, values
written as :func:`format_value` writes them), and is cached in its own run directory
(:func:`spec_directory`).

:func:`select_methods` checks everything before anything trains: unknown methods and
option keys (with the closest valid name suggested), options of methods that are not
compared, arguments a method needs and is not given, keys the comparison sets itself, and
values the constructor rejects (each row's balancer is built once, on the problem's tasks).

Two names are not methods but baseline rows (:mod:`~taskbalance.compare.baselines`):
``single_task`` and ``tuned_static``; they take no options. A *problem* spec
(``penguins[data_seed=1]``, :func:`parse_problem`) is read the same way and passes its
values to the problem's constructor.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import taskbalance as tb
from taskbalance.compare.baselines import (
    BASELINE_ROWS,
    SINGLE_TASK,
    TUNED_STATIC,
    single_task_weights,
    tuning_candidates,
)
from taskbalance.compare.problem import problem_class
from taskbalance.errors import BalancerUsageError
from taskbalance.registry import constructor_parameters

if TYPE_CHECKING:
    from taskbalance.compare.problem import ComparisonProblem, Size

BASELINE = "equal"

#: constructor keywords the comparison sets itself, and why a user may not.
RESERVED = {
    "seed": "each run gets its own, chosen with --seeds",
    "record": "the comparison needs the balancer's history for its figures",
    "distributed": "the comparison trains in one process",
    "accumulation_steps": "the problems' loops take one optimizer step per batch",
}

SPEC_FORM = "write NAME or NAME[KEY=VALUE,...], e.g. cagrad or cagrad[c=0.2,rescale=1+c]"
PROBLEM_FORM = "write NAME or NAME[KEY=VALUE,...], e.g. penguins or penguins[data_seed=1]"
OPTION_FORM = "write METHOD.KEY=VALUE, e.g. cagrad.c=0.2 or static.weights=1,2,3"

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_KEY = re.compile(r"[A-Za-z_]\w*")
_SPEC = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\[(.*)\])?\s*", re.DOTALL)


def _number(text: str) -> int | float:
    return int(text) if _INTEGER.fullmatch(text) else float(text)


def parse_value(text: str, default: Any = inspect.Parameter.empty) -> Any:
    """A value written on the command line, as the constructor should receive it.

    ``"0.2"`` -> 0.2, ``"3"`` -> 3, ``"true"``/``"false"`` -> bool, ``"none"`` -> None,
    ``"1,2,3"`` -> ``[1, 2, 3]`` (a list of numbers), anything else the string itself.
    ``"none"`` stays the string ``"none"`` when ``default`` (the parameter's default) is a
    string: CAGrad's ``rescale="none"`` is such a choice, not a missing value.
    """
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return "none" if isinstance(default, str) else None
    if _NUMBER.fullmatch(text):
        return _number(text)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and all(_NUMBER.fullmatch(p) for p in parts):
        return [_number(p) for p in parts]
    return text


def format_value(value: Any) -> str:
    """``value`` as written in a row label (the inverse of :func:`parse_value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, Mapping):
        return ",".join(f"{k}:{format_value(v)}" for k, v in value.items())
    return str(value)


def split_specs(text: str) -> list[str]:
    """``"a,b[x=1,y=2],c"`` -> ``["a", "b[x=1,y=2]", "c"]``: commas inside brackets stay."""
    specs, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(text[start:i])
            start = i + 1
    specs.append(text[start:])
    return [s.strip() for s in specs if s.strip()]


def _no_options(name: str) -> BalancerUsageError:
    return BalancerUsageError(
        f"{name} is a baseline row, not a method: it takes no options (write {name} alone; "
        f"its weights are {'one-hot per task' if name == SINGLE_TASK else 'tuned'})"
    )


def _method(name: str) -> type[tb.Balancer]:
    if name.strip().lower() in BASELINE_ROWS:
        raise _no_options(name.strip().lower())
    try:
        return tb.get(name)
    except KeyError:
        known = [*tb.list_methods(), *BASELINE_ROWS]
        close = difflib.get_close_matches(name.strip().lower(), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BalancerUsageError(
            f"unknown method {name!r}{hint} (known methods: {', '.join(tb.list_methods())}; "
            f"baseline rows: {', '.join(BASELINE_ROWS)})"
        ) from None


def parse_option(text: str) -> tuple[str, str, Any]:
    """``"cagrad.c=0.2"`` -> ``("cagrad", "c", 0.2)`` (the method's registered name).

    Raises:
        BalancerUsageError: not of the form ``METHOD.KEY=VALUE``, or an unknown method.
    """
    target, sep, raw = text.partition("=")
    method, dot, key = target.strip().partition(".")
    if not (sep and dot and method and _KEY.fullmatch(key.strip())):
        raise BalancerUsageError(f"cannot read option {text!r}: {OPTION_FORM}")
    cls = _method(method)
    key = key.strip()
    param = constructor_parameters(cls).get(key)
    default = param.default if param is not None else inspect.Parameter.empty
    return cls.method_name, key, parse_value(raw, default)


def parse_options(texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Several ``METHOD.KEY=VALUE`` options -> ``{method: {key: value}}`` (the last wins)."""
    options: dict[str, dict[str, Any]] = {}
    for text in texts:
        method, key, value = parse_option(text)
        options.setdefault(method, {})[key] = value
    return options


def spec_directory(label: str) -> str:
    """A directory name for a row label: the label itself when it is a plain method name,
    else a readable, file-system-safe form of it and a short hash (so that labels that
    read alike never share a directory): ``cagrad[c=0.2]`` -> ``cagrad__c-0.2__<hash>``."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        return label
    readable = label.replace("[", "__").replace("]", "").replace("=", "-").replace(",", "_")
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", readable)[:60].strip("._-")
    return f"{readable}__{hashlib.sha256(label.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison.

    Attributes:
        method: the registered method name.
        options: the user's constructor arguments of this row (options, then bracketed
            values); the problem's own settings are added when the balancer is built.
        label: the row label: ``method``, or ``method[k=v,...]`` for a bracketed spec.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def directory(self) -> str:
        """The row's run directory name under ``out/runs``."""
        return spec_directory(self.label)

    @property
    def baseline(self) -> bool:
        """Whether the row is a baseline row (``single_task``, ``tuned_static``), which
        the runner trains as static weighting of its own (see :mod:`.baselines`)."""
        return self.method in BASELINE_ROWS


@dataclass
class Selection:
    """The rows of a comparison and the methods ``"all"`` left out: ``left_out`` those
    that need arguments (-> the arguments), ``unavailable`` the baseline rows the problem
    cannot have (-> why)."""

    specs: list[MethodSpec]
    left_out: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _check_key(cls: type, key: str) -> None:
    name = cls.method_name  # type: ignore[attr-defined]
    valid = [k for k in constructor_parameters(cls) if k not in RESERVED]
    if key in RESERVED:
        raise BalancerUsageError(
            f"{name}: {key!r} is set by the comparison ({RESERVED[key]}); leave it out"
        )
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BalancerUsageError(
            f"{name} has no option {key!r}{hint} (its options: {', '.join(valid)})"
        )


def _bracketed(text: str, what: str, form: str) -> tuple[str, dict[str, str]]:
    """``"name[k=v,w=1,2]"`` -> ``("name", {"k": "v", "w": "1,2"})``, values unparsed.

    Raises:
        BalancerUsageError: not of that form (``what``: "method" or "problem"), or a key
            given twice.
    """

    def unreadable() -> BalancerUsageError:
        return BalancerUsageError(f"cannot read {what} {text.strip()!r}: {form}")

    match = _SPEC.fullmatch(text)
    inner = (match.group(2) or "") if match is not None else ""
    if match is None or "[" in inner or "]" in inner:
        raise unreadable()
    raw: dict[str, str] = {}
    key = None
    for part in inner.split(",") if inner.strip() else []:
        name, sep, value = part.partition("=")
        if sep:
            key = name.strip()
            if not _KEY.fullmatch(key):
                raise unreadable()
            if key in raw:
                raise BalancerUsageError(f"{what} {text.strip()!r} gives {key!r} twice")
            raw[key] = value
        elif key is not None and part.strip():
            raw[key] += "," + part  # the next number of a list: "weights=1,2,3"
        else:
            raise unreadable()
    return match.group(1), raw


def _baseline_row(text: str) -> str | None:
    """The baseline row a spec names (``None``: it names no baseline row).

    Raises:
        BalancerUsageError: a baseline row with bracketed options.
    """
    match = _SPEC.fullmatch(text)
    if match is None or match.group(1).lower() not in BASELINE_ROWS:
        return None
    name = match.group(1).lower()
    if (match.group(2) or "").strip():
        raise _no_options(name)
    return name


def _parse_spec(text: str) -> tuple[type[tb.Balancer], dict[str, Any]]:
    """``"cagrad[c=0.2]"`` -> (CAGrad, ``{"c": 0.2}``), keys checked, values parsed."""
    name, raw = _bracketed(text, "method", SPEC_FORM)
    cls = _method(name)
    params = constructor_parameters(cls)
    for key in raw:
        _check_key(cls, key)
    return cls, {key: parse_value(value, params[key].default) for key, value in raw.items()}


def _label(method: str, bracketed: Mapping[str, Any]) -> str:
    if not bracketed:
        return method
    inner = ",".join(f"{k}={format_value(v)}" for k, v in sorted(bracketed.items()))
    return f"{method}[{inner}]"


def required_arguments(cls: type) -> list[str]:
    """Constructor arguments of a balancer class that have no default (``tasks`` aside)."""
    return [
        name
        for name, param in constructor_parameters(cls).items()
        if param.default is inspect.Parameter.empty
    ]


def _needs(name: str, missing: list[str]) -> str:
    given = ",".join(f"{m}=..." for m in missing)
    flags = " ".join(f"--option {name}.{m}=..." for m in missing)
    return (
        f"{name} needs {', '.join(missing)} (no default): give {name}[{given}] in the methods, "
        f"or {flags} (Python: options={{{name!r}: {{{missing[0]!r}: ...}}}})"
    )


def build_balancer(spec: MethodSpec, problem: ComparisonProblem, seed: int) -> Any:
    """A fresh balancer of ``spec`` on ``problem``'s tasks, and the arguments it got."""
    cls = tb.get(spec.method)
    settings = problem.method_options(spec.method)
    options = {**settings, **spec.options}
    if "seed" in constructor_parameters(cls) and "seed" not in settings:
        options["seed"] = seed
    return cls(problem.tasks, **options), options


def static_spec(label: str, weights: Sequence[float]) -> MethodSpec:
    """The static-weighting run of a baseline row ``label`` with ``weights``."""
    return MethodSpec("static", {"weights": [float(w) for w in weights]}, label)


def baseline_runs(spec: MethodSpec, problem: ComparisonProblem) -> list[MethodSpec]:
    """The static-weighting specs a baseline row trains: one per task (``single_task``),
    or one per tuning candidate (``tuned_static``)."""
    if spec.method == SINGLE_TASK:
        return [
            static_spec(spec.label, single_task_weights(problem.tasks, t)) for t in problem.tasks
        ]
    return [static_spec(spec.label, w) for w in tuning_candidates(len(problem.tasks))]


def _problem_baselines(problem: ComparisonProblem | None) -> tuple[str, ...]:
    if problem is None:
        return ()
    names = tuple(problem.baselines)
    unknown = [name for name in names if name not in BASELINE_ROWS]
    if unknown:
        raise BalancerUsageError(
            f"{type(problem).__name__}.baselines names {', '.join(map(repr, unknown))}, which "
            f"{'is no baseline row' if len(unknown) == 1 else 'are no baseline rows'}: "
            f"choose from {', '.join(BASELINE_ROWS)}"
        )
    return names


def _unavailable(name: str, problem: ComparisonProblem | None) -> str | None:
    """Why ``problem`` cannot have the baseline row ``name`` (``None``: it can)."""
    if name == TUNED_STATIC and problem is not None and not problem.has_validation:
        return (
            f"it tunes static weights on a validation split, and problem {problem.name!r} has "
            "none (its runs report no extras['validation']; see ComparisonProblem."
            "has_validation)"
        )
    return None


def select_methods(
    methods: str | Sequence[str],
    problem: ComparisonProblem | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Selection:
    """The rows of a comparison, checked: equal weighting (the Δm% baseline) first, then
    the baseline rows (:data:`~taskbalance.compare.baselines.BASELINE_ROWS`), then the
    methods.

    Args:
        methods: ``"all"``, a comma-separated string of specs or a sequence of specs (or of
            such strings); an item ``"all"`` stands for every registered method, leaving
            out those that need an argument nobody gives (static weighting's weights),
            recorded in :attr:`Selection.left_out`, and for the problem's own baseline
            rows (:attr:`~taskbalance.compare.problem.ComparisonProblem.baselines`),
            leaving out those it cannot have (recorded in :attr:`Selection.unavailable`).
            ``single_task`` and ``tuned_static`` name a baseline row on any problem
            (``tuned_static`` only on one with a validation split).
        problem: gives each method's settings and the tasks the balancers are built on
            (without it, values are not tried on a constructor).
        options: ``{method: {key: value}}`` for every row of that method (aliases allowed).

    Raises:
        BalancerUsageError: any of the mistakes listed in the module docstring; nothing
            has trained when it is raised.
    """
    items = [methods] if isinstance(methods, str) else [str(m) for m in methods]
    tokens = [token for item in items for token in split_specs(item)]
    if not tokens:
        raise BalancerUsageError(f"no method given: {SPEC_FORM}, or all")
    by_method: dict[str, dict[str, Any]] = {}
    for name, values in (options or {}).items():
        if not isinstance(values, Mapping):
            raise BalancerUsageError(
                f"options[{name!r}] must map argument names to values, e.g. "
                f"options={{{name!r}: {{'key': value}}}}; got {values!r}"
            )
        cls = _method(name)
        for key in values:
            _check_key(cls, key)
        by_method.setdefault(cls.method_name, {}).update(values)

    wanted: list[tuple[type[tb.Balancer], dict[str, Any], bool]] = []  # (cls, brackets, from all)
    baselines: dict[str, bool] = {}  # baseline row -> named explicitly
    for token in tokens:
        row = _baseline_row(token)
        if token.strip().lower() == "all":
            wanted += [(tb.get(name), {}, True) for name in tb.list_methods()]
            for name in _problem_baselines(problem):
                baselines.setdefault(name, False)
        elif row is not None:
            baselines[row] = True
        else:
            wanted.append((*_parse_spec(token), False))
    unavailable: dict[str, str] = {}
    for name, explicit in baselines.items():
        reason = _unavailable(name, problem)
        if reason is not None and explicit:
            raise BalancerUsageError(f"{name} cannot run here: {reason}; leave it out")
        if reason is not None:
            unavailable[name] = reason

    specs: dict[str, MethodSpec] = {}
    left_out: dict[str, list[str]] = {}
    for cls, bracketed, from_all in [(tb.get(BASELINE), {}, True), *wanted]:
        name = cls.method_name
        label = _label(name, bracketed)
        if label in specs:
            continue
        chosen = {**by_method.get(name, {}), **bracketed}
        settings = problem.method_options(name) if problem is not None else {}
        missing = [a for a in required_arguments(cls) if a not in {**settings, **chosen}]
        if missing and from_all:
            left_out[name] = missing
            continue
        if missing:
            raise BalancerUsageError(_needs(name, missing))
        specs[label] = MethodSpec(name, chosen, label)
    compared = {spec.method for spec in specs.values()}
    left_out = {name: need for name, need in left_out.items() if name not in compared}
    for name in by_method:
        if name not in compared:
            raise BalancerUsageError(
                f"options for {name}, which is not compared: add {name} to the methods "
                "or drop its options"
            )
    rows = [MethodSpec(name, {}, name) for name in BASELINE_ROWS if name in baselines]
    rows = [spec for spec in rows if spec.method not in unavailable]
    first, *others = specs.values()  # equal weighting, then the baselines, then the methods
    ordered = [first, *rows, *others]
    if problem is not None:
        for spec in ordered:
            _try_building(spec, problem)
    return Selection(ordered, left_out, by_method, unavailable)


def _try_building(spec: MethodSpec, problem: ComparisonProblem) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a run warns when it builds its balancer
            for run in baseline_runs(spec, problem) if spec.baseline else [spec]:
                build_balancer(run, problem, seed=0)
    except Exception as err:  # any constructor complaint, reported before training
        given = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "its defaults"
        raise BalancerUsageError(
            f"{spec.label} cannot be built: {type(err).__name__}: {err} (with {given})"
        ) from err


def parse_problem(text: str) -> tuple[str, dict[str, Any], str]:
    """``"census_income[group=2]"`` -> ``("census_income", {"group": 2}, label)``.

    The bracketed keyword arguments are read like a method spec's (:func:`parse_value`)
    and checked against the problem's constructor; ``label`` is the canonical spec (keys
    sorted), whose :func:`spec_directory` names the default run folder.

    Raises:
        KeyError: no problem of that name.
        BalancerUsageError: an unreadable spec, a key the constructor does not take (its
            parameters are listed), or ``size`` (given with ``--size`` / ``size=``).
    """
    name, raw = _bracketed(text, "problem", PROBLEM_FORM)
    cls = problem_class(name)
    params = {k: v for k, v in constructor_parameters(cls).items() if k != "size"}
    for key in raw:
        if key == "size":
            raise BalancerUsageError(
                f"problem {text.strip()!r}: give the size with --size (Python: size=), "
                "not in brackets"
            )
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BalancerUsageError(
                f"problem {name} has no option {key!r}{hint} (its options: "
                f"{', '.join(params) or 'none'})"
            )
    values = {key: parse_value(value, params[key].default) for key, value in raw.items()}
    return name, values, _label(name, values)


def build_problem(spec: str, size: Size = "full") -> ComparisonProblem:
    """The problem a spec names (``penguins`` or ``penguins[data_seed=1]``), of ``size``.

    Raises:
        KeyError: no problem of that name.
        BalancerUsageError: see :func:`parse_problem`; also a value the constructor
            refuses.
    """
    name, values, label = parse_problem(spec)
    try:
        return problem_class(name)(size=size, **values)
    except (TypeError, ValueError) as err:
        if not values:
            raise
        raise BalancerUsageError(
            f"problem {label} cannot be built: {type(err).__name__}: {err}"
        ) from err
