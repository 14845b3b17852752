"""Registry of balancing methods: ``@register("name")``, :func:`make`, :func:`list_methods`.

Arguments are checked where a misspelling would otherwise surface as Python's own
``Balancer.__init__() got an unexpected keyword argument``: a keyword that no constructor
in the class's hierarchy takes raises :class:`TypeError` naming the method, suggesting the
closest valid keyword and listing them all, both through :func:`make` and when a
registered class is constructed directly (``tb.DWA(2, temprature=2)``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from taskbalance.balancer import Balancer, Tasks

_REGISTRY: dict[str, type[Balancer]] = {}
_ALIASES: dict[str, str] = {}

B = TypeVar("B", bound="type[Balancer]")

#: Python's message for a keyword that no function in the chain accepts.
_UNEXPECTED = re.compile(r"got an unexpected keyword argument '(\w+)'")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str, *aliases: str) -> Callable[[B], B]:
    """Class decorator that makes a balancer available to :func:`make` under ``name``.

    The class's constructor is wrapped (signature kept) so that a misspelt keyword raises
    :class:`TypeError` naming the method and the closest valid keyword (see
    :func:`unexpected_arguments_error`); calls that succeed are unchanged.
    """

    def deco(cls: B) -> B:
        key = _key(name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method name {name!r} is already registered")
        _REGISTRY[key] = cls
        cls.method_name = key
        for alias in aliases:
            _ALIASES[_key(alias)] = key
        if not getattr(cls.__init__, "_names_unexpected_arguments", False):
            cls.__init__ = _naming_unexpected_arguments(cls.__init__)
        return cls

    return deco


def _naming_unexpected_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """``init``, with Python's "unexpected keyword argument" turned into a message that
    names the method, suggests the closest keyword and lists the valid ones."""

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except TypeError as err:
            found = _UNEXPECTED.search(str(err))
            if found is None or found.group(1) not in kwargs:
                raise
            unknown = [k for k in kwargs if k != "tasks" and k not in valid_arguments(type(self))]
            if found.group(1) not in unknown:
                unknown.append(found.group(1))
            raise unexpected_arguments_error(type(self), unknown) from None

    checked_init._names_unexpected_arguments = True  # type: ignore[attr-defined]
    return checked_init


def valid_arguments(cls: type) -> dict[str, inspect.Parameter]:
    """Every keyword ``cls(...)`` takes, ``tasks`` first (see :func:`constructor_parameters`)."""
    init = inspect.signature(cls.__init__).parameters
    tasks = {"tasks": init["tasks"]} if "tasks" in init else {}
    return {**tasks, **constructor_parameters(cls)}


def _label(cls: type) -> str:
    method = getattr(cls, "method_name", "")
    return f"{method} ({cls.__name__})" if method else cls.__name__


def _listing(cls: type) -> str:
    shown = []
    for name, param in valid_arguments(cls).items():
        default = param.default
        shown.append(name if default is inspect.Parameter.empty else f"{name}={default!r}")
    return ", ".join(shown)


def unexpected_arguments_error(cls: type, names: Iterable[str]) -> TypeError:
    """The :class:`TypeError` for keywords ``names`` that ``cls``'s constructor does not take.

    Names the method, suggests the closest valid keyword for each (``difflib``) and lists
    every valid keyword with its default.
    """
    valid = list(valid_arguments(cls))
    names = list(names)

    def hint(name: str) -> str:
        close = difflib.get_close_matches(name, valid, n=1)
        return f"did you mean {close[0]!r}?" if close else ""

    if len(names) == 1:
        suggestion = hint(names[0])
        what = f"an unexpected argument {names[0]!r}" + (f"; {suggestion}" if suggestion else "")
    else:
        parts = [f"{n!r} ({hint(n)})" if hint(n) else repr(n) for n in names]
        what = f"unexpected arguments {', '.join(parts[:-1])} and {parts[-1]}"
    stop = " " if what.endswith("?") else ". "
    return TypeError(f"{_label(cls)} got {what}{stop}Valid arguments: {_listing(cls)}")


def get(name: str) -> type[Balancer]:
    """The balancer class registered as ``name`` (or one of its aliases)."""
    if not isinstance(name, str):
        raise TypeError(
            f"the method name comes first and must be a string such as 'dwa' "
            f"(tb.list_methods() lists them), got {name!r}"
        )
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown method {name!r}; {hint}known methods: {known}")
    return _REGISTRY[key]


def make(name: str, tasks: Tasks | None = None, *args: Any, **kwargs: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``tasks`` (a count or a list of names).

    Hyper-parameters are given by keyword: ``tb.make("dwa", tasks=2, temperature=2.0)``.
    Raises :class:`TypeError` with the fix when the name is not a string, the tasks are
    missing or not a count or names, a hyper-parameter is given by position, or a keyword
    is misspelt (naming the method and the closest valid keyword).
    """
    if not isinstance(name, str):
        raise TypeError(
            f"tb.make takes the method name first, a string such as 'dwa'; got {name!r}. "
            "Call tb.make('dwa', tasks=2) or tb.make('dwa', tasks=['seg', 'depth'])"
        )
    cls = get(name)
    unknown = [k for k in kwargs if k not in valid_arguments(cls)]
    if unknown and (tasks is None or args):
        raise unexpected_arguments_error(cls, unknown)  # the call fails anyway: say why first
    if args:
        count = f"{len(args)} more positional argument{'s' if len(args) > 1 else ''}"
        raise TypeError(
            f"tb.make({name!r}, tasks, ...) takes the hyper-parameters by keyword; got {count} "
            f"({', '.join(map(repr, args))}). Valid arguments: {_listing(cls)}"
        )
    if tasks is None:
        raise TypeError(
            f"tb.make({name!r}) needs the tasks: their number (tasks=2) or their names "
            f"(tasks=['seg', 'depth'])"
        )
    if isinstance(tasks, float) or not isinstance(tasks, (int, Iterable)):
        raise TypeError(
            f"tasks must be the number of tasks (an int) or their names (a list of strings), "
            f"got {tasks!r}"
        )
    return cls(tasks, **kwargs)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Every keyword a balancer class's constructor accepts, ``tasks`` excluded.

    Follows ``**kw`` up the class hierarchy (a method's own hyper-parameters first, then
    those of its bases: ``task_specific``, ``nonfinite``, ``record``, ...), so the result is
    the full set of names that ``cls(tasks, **kwargs)`` takes, each with its default.
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for name, param in inspect.signature(init).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL and name not in (
                "self",
                "tasks",
            ):
                found.setdefault(name, param)
        if not passes_on:
            break
    return found
