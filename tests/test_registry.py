"""The method registry: make(), get(), aliases, list_methods(), register()."""

from __future__ import annotations

import pytest

import taskbalance as tb
from taskbalance import registry

SEVEN = ["dtp", "dwa", "equal", "gls", "rlw", "static", "uncertainty"]


def use_scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the registry at copies of its tables until ``monkeypatch`` is undone."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register classes without leaking them into the real registry."""
    use_scratch_registry(monkeypatch)


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


def test_scratch_registry_does_not_leak() -> None:
    """Self-contained (no reliance on test order or on the xdist worker): a method and an
    alias registered inside the scratch registry are gone once it is undone."""
    before = tb.list_methods()
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_scratch_registry(monkeypatch)

        @tb.register("leak_probe", "leak_alias")
        class Probe(tb.EqualWeighting):
            pass

        assert tb.get("leak_alias") is Probe
    assert tb.list_methods() == before
    for name in ("leak_probe", "leak_alias"):
        with pytest.raises(KeyError, match=f"unknown method '{name}'"):
            tb.get(name)


# ---------------------------------------------------------------- misspelt and misplaced arguments


def test_make_names_the_method_and_suggests_the_closest_keyword() -> None:
    with pytest.raises(
        TypeError, match=r"dwa \(DWA\) got an unexpected argument 'temprature'"
    ) as info:
        tb.make("dwa", tasks=2, temprature=2)
    message = str(info.value)
    assert "did you mean 'temperature'?" in message
    for valid in ("tasks", "temperature=2.0", "period='epoch'", "nonfinite='raise'", "record=True"):
        assert valid in message
    assert "Balancer.__init__" not in message


def test_direct_construction_gives_the_same_message() -> None:
    with pytest.raises(
        TypeError,
        match=r"dwa \(DWA\) got an unexpected argument 'temprature'; "
        r"did you mean 'temperature'\?",
    ):
        tb.DWA(2, temprature=2)
    with pytest.raises(TypeError, match=r"upgrad \(UPGrad\) .*'norm_esp'.*'norm_eps'"):
        tb.UPGrad(3, norm_esp=1e-4)
    with pytest.raises(TypeError, match=r"imtl_l \(IMTLL\) .*'l_r'.*did you mean 'lr'"):
        tb.make("imtl_l", 2, l_r=0.1)


def test_every_misspelt_keyword_is_named() -> None:
    with pytest.raises(
        TypeError,
        match=r"arguments 'temprature' \(did you mean 'temperature'\?\) "
        r"and 'perod' \(did you mean 'period'\?\)",
    ):
        tb.make("dwa", 2, temprature=2, perod="step")


def test_an_unknown_keyword_without_a_close_match_lists_the_valid_ones() -> None:
    with pytest.raises(
        TypeError,
        match=r"gls \(GLS\) got an unexpected argument 'temperature'\. "
        r"Valid arguments: tasks, nonfinite='raise'",
    ):
        tb.make("gls", 2, temperature=1.0)


def test_a_subclass_lists_its_own_arguments() -> None:
    class Scaled(tb.DWA):
        def __init__(self, tasks: int, scale: float = 1.0, **kw: object) -> None:
            super().__init__(tasks, **kw)
            self.scale = scale

    with pytest.raises(TypeError, match=r"'scael'; did you mean 'scale'\?.*temperature=2\.0"):
        Scaled(2, scael=2.0)
    assert Scaled(2, scale=3.0, temperature=1.0).scale == 3.0


def test_a_class_that_takes_any_keyword_keeps_taking_them(scratch_registry: None) -> None:
    @tb.register("open_options")
    class Open(tb.EqualWeighting):
        def __init__(self, tasks: int, **options: object) -> None:
            super().__init__(tasks)
            self.options = options

    assert tb.make("open_options", 2, anything=1).options == {"anything": 1}


def test_other_type_errors_pass_through_unchanged() -> None:
    with pytest.raises(TypeError, match="multiple values for argument 'temperature'"):
        tb.DWA(2, 3.0, temperature=2.0)


def test_make_without_tasks_says_how_to_give_them() -> None:
    with pytest.raises(
        TypeError,
        match=r"tb\.make\('dwa'\) needs the tasks: .*tasks=2.*"
        r"tasks=\['seg', 'depth'\]",
    ):
        tb.make("dwa", temperature=2.0)


def test_a_misspelt_tasks_keyword_suggests_tasks() -> None:
    with pytest.raises(TypeError, match=r"unexpected argument 'task'; did you mean 'tasks'\?"):
        tb.make("dwa", task=2)


def test_make_takes_hyper_parameters_by_keyword_only() -> None:
    with pytest.raises(
        TypeError,
        match=r"by keyword.*got 1 more positional argument \(2\.0\).*"
        r"temperature=2\.0",
    ):
        tb.make("dwa", 2, 2.0)


def test_make_with_the_name_and_tasks_swapped() -> None:
    with pytest.raises(TypeError, match=r"method name first.*got 2\. Call tb\.make\('dwa', tasks"):
        tb.make(2, "dwa")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"method name first.*got \['seg', 'depth'\]"):
        tb.make(["seg", "depth"], "dwa")  # type: ignore[arg-type]


def test_make_with_tasks_of_the_wrong_type() -> None:
    with pytest.raises(
        TypeError,
        match=r"tasks must be the number of tasks \(an int\) or "
        r"their names.*got 2\.5",
    ):
        tb.make("dwa", 2.5)


def test_unknown_method_suggests_the_closest_name() -> None:
    with pytest.raises(KeyError, match=r"unknown method 'gradnrom'; did you mean 'gradnorm'\?"):
        tb.make("gradnrom", 2)
