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
from taskbalance.errors import BalancerUsageError
from taskbalance.registry import constructor_parameters

if TYPE_CHECKING:
    from taskbalance.compare.problem import ComparisonProblem

BASELINE = "equal"

#: constructor keywords the comparison sets itself, and why a user may not.
RESERVED = {
    "seed": "each run gets its own, chosen with --seeds",
    "record": "the comparison needs the balancer's history for its figures",
    "distributed": "the comparison trains in one process",
    "accumulation_steps": "the problems' loops take one optimizer step per batch",
}

SPEC_FORM = "write NAME or NAME[KEY=VALUE,...], e.g. cagrad or cagrad[c=0.2,rescale=1+c]"
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


def _method(name: str) -> type[tb.Balancer]:
    try:
        return tb.get(name)
    except KeyError:
        known = tb.list_methods()
        close = difflib.get_close_matches(name.strip().lower(), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BalancerUsageError(
            f"unknown method {name!r}{hint} (known methods: {', '.join(known)})"
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


@dataclass
class Selection:
    """The rows of a comparison and the methods ``"all"`` left out (-> what they need)."""

    specs: list[MethodSpec]
    left_out: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def _parse_spec(text: str) -> tuple[type[tb.Balancer], dict[str, Any]]:
    """``"cagrad[c=0.2]"`` -> (CAGrad, ``{"c": 0.2}``), keys checked, values parsed."""

    def unreadable() -> BalancerUsageError:
        return BalancerUsageError(f"cannot read method {text.strip()!r}: {SPEC_FORM}")

    match = _SPEC.fullmatch(text)
    inner = (match.group(2) or "") if match is not None else ""
    if match is None or "[" in inner or "]" in inner:
        raise unreadable()
    cls = _method(match.group(1))
    raw: dict[str, str] = {}
    key = None
    for part in inner.split(",") if inner.strip() else []:
        name, sep, value = part.partition("=")
        if sep:
            key = name.strip()
            if not _KEY.fullmatch(key):
                raise unreadable()
            if key in raw:
                raise BalancerUsageError(f"method {text.strip()!r} gives {key!r} twice")
            raw[key] = value
        elif key is not None and part.strip():
            raw[key] += "," + part  # the next number of a list: "weights=1,2,3"
        else:
            raise unreadable()
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


def select_methods(
    methods: str | Sequence[str],
    problem: ComparisonProblem | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Selection:
    """The rows of a comparison, checked; equal weighting (the Δm% baseline) first.

    Args:
        methods: ``"all"``, a comma-separated string of specs or a sequence of specs (or of
            such strings); an item ``"all"`` stands for every registered method, leaving
            out those that need an argument nobody gives (static weighting's weights),
            recorded in :attr:`Selection.left_out`.
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
    for token in tokens:
        if token.strip().lower() == "all":
            wanted += [(tb.get(name), {}, True) for name in tb.list_methods()]
        else:
            wanted.append((*_parse_spec(token), False))

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
    if problem is not None:
        for spec in specs.values():
            _try_building(spec, problem)
    return Selection(list(specs.values()), left_out, by_method)


def _try_building(spec: MethodSpec, problem: ComparisonProblem) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a run warns when it builds its balancer
            build_balancer(spec, problem, seed=0)
    except Exception as err:  # any constructor complaint, reported before training
        given = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "its defaults"
        raise BalancerUsageError(
            f"{spec.label} cannot be built: {type(err).__name__}: {err} (with {given})"
        ) from err
