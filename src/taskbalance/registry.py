"""Registry of balancing methods: ``@register("name")``, :func:`make`, :func:`list_methods`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from taskbalance.balancer import Balancer

_REGISTRY: dict[str, type[Balancer]] = {}
_ALIASES: dict[str, str] = {}

B = TypeVar("B", bound="type[Balancer]")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str, *aliases: str):
    """Class decorator that makes a balancer available to :func:`make` under ``name``."""

    def deco(cls: B) -> B:
        key = _key(name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method name {name!r} is already registered")
        _REGISTRY[key] = cls
        cls.method_name = key
        for alias in aliases:
            _ALIASES[_key(alias)] = key
        return cls

    return deco


def get(name: str) -> type[Balancer]:
    """The balancer class registered as ``name`` (or one of its aliases)."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown method {name!r}; known methods: {known}")
    return _REGISTRY[key]


def make(name: str, tasks: Any, **kwargs: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``tasks`` (a count or a list of names)."""
    return get(name)(tasks, **kwargs)


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
