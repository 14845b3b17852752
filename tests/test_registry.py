"""The method registry: make(), get(), aliases, list_methods(), register()."""

from __future__ import annotations

import pytest

import taskbalance as tb
from taskbalance import registry

SEVEN = ["dtp", "dwa", "equal", "gls", "rlw", "static", "uncertainty"]


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register classes without leaking them into the real registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def test_list_methods_is_sorted_and_has_the_core_methods() -> None:
    names = tb.list_methods()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in SEVEN:
        assert name in names


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("equal", tb.EqualWeighting),
        ("ew", tb.EqualWeighting),
        ("static", tb.StaticWeighting),
        ("dwa", tb.DWA),
        ("uncertainty", tb.UncertaintyWeighting),
        ("uw", tb.UncertaintyWeighting),
        ("kendall", tb.UncertaintyWeighting),
        ("dtp", tb.DTP),
        ("rlw", tb.RLW),
        ("gls", tb.GLS),
    ],
)
def test_make_by_name_and_alias(name: str, cls: type) -> None:
    kwargs = {"weights": [1.0, 2.0]} if cls is tb.StaticWeighting else {}
    bal = tb.make(name, ["x", "y"], **kwargs)
    assert type(bal) is cls
    assert bal.tasks == ("x", "y")
    assert tb.get(name) is cls


def test_names_are_case_and_dash_insensitive() -> None:
    assert tb.get("DWA") is tb.DWA
    assert tb.get("  Kendall ") is tb.UncertaintyWeighting
    assert tb.get("Linear-Scalarization") is tb.EqualWeighting


def test_method_name_is_the_canonical_key() -> None:
    assert tb.make("uw", 2).method_name == "uncertainty"
    assert tb.make("ew", 2).method_name == "equal"


def test_make_passes_keyword_arguments() -> None:
    bal = tb.make("dwa", 3, temperature=5.0, period="step")
    assert isinstance(bal, tb.DWA)
    assert bal.temperature == 5.0
    assert bal.period == "step"
    with pytest.raises(TypeError):
        tb.make("gls", 2, temperature=1.0)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        tb.make("gradnrom", 2)
    message = str(info.value)
    assert "gradnrom" in message
    for name in SEVEN:
        assert name in message


def test_register_a_new_method(scratch_registry: None) -> None:
    @tb.register("My-Method", "mine")
    class Mine(tb.EqualWeighting):
        pass

    assert Mine.method_name == "my_method"
    assert "my_method" in tb.list_methods()
    assert type(tb.make("MINE", 2)) is Mine
    assert type(tb.make("my_method", 2)) is Mine


def test_registering_a_taken_name_raises(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):

        @tb.register("dwa")
        class Other(tb.EqualWeighting):
            pass


def test_re_registering_the_same_class_is_allowed(scratch_registry: None) -> None:
    assert tb.register("gls")(tb.GLS) is tb.GLS
    assert tb.get("gls") is tb.GLS


def test_scratch_registry_did_not_leak() -> None:
    assert "my_method" not in tb.list_methods()
