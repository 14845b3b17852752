"""CGC and PLE: expert and gate shapes, gates as distributions, what is shared, engine."""

from __future__ import annotations

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition, reached, task_losses

from taskbalance.models import CGC, PLE

TASKS = ["a", "b", "c"]


def make(levels: int = 3) -> PLE:
    torch.manual_seed(0)
    return PLE(
        10, TASKS, num_levels=levels, num_specific_experts=2, num_shared_experts=3,
        expert_hidden=(6,), tower_hidden=(4,),
    )  # fmt: skip


def test_expert_and_gate_shapes() -> None:
    model = make(levels=3)
    assert len(model.levels) == 3
    for i, level in enumerate(model.levels):
        width = 10 if i == 0 else 6
        assert all(b.weights[0].shape == (2, width, 6) for b in level.specific.values())
        assert level.shared.weights[0].shape == (3, width, 6)
        assert all(g.weight.shape == (2 + 3, width) for g in level.gates.values())
        if i < 2:
            assert level.shared_gate.weight.shape == (3 * 2 + 3, width)
        else:
            assert level.shared_gate is None
    cgc = CGC(10, 2)
    assert len(cgc.levels) == 1 and cgc.levels[0].shared_gate is None
    x = torch.randn(5, 10)
    assert {t: o.shape for t, o in model(x).items()} == dict.fromkeys(TASKS, (5, 1))
    z = model.features(x)
    assert [tuple(t.shape) for t in z] == [(5, 3, 6)] + [(5, 6)] * 3
    assert [tuple(t.shape) for t in cgc.features(x)] == [(5, 1, 16)]


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_gates_are_distributions(levels: int) -> None:
    gates = make(levels).gate_weights(torch.randn(7, 10) * 3)
    assert len(gates) == levels
    for i, level in enumerate(gates):
        assert set(level) == set(TASKS) | ({"shared"} if i < levels - 1 else set())
        for name, g in level.items():
            assert g.shape == (7, 9 if name == "shared" else 5)
            assert bool((g >= 0).all())
            torch.testing.assert_close(g.sum(-1), torch.ones(7))


def test_forward_is_heads_of_features() -> None:
    x = torch.randn(3, 10)
    for model in (make(1), make(2)):
        torch.testing.assert_close(model.heads(model.features(x), x)["a"], model(x)["a"])
    torch.testing.assert_close(make(2).heads(make(2).features(x))["c"], make(2)(x)["c"])
    with pytest.raises(ValueError, match="need the input"):
        make(1).heads(make(1).features(x))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_parameter_groups_and_gradient_flow(levels: int) -> None:
    model = make(levels)
    check_partition(model, TASKS)
    check_gradient_flow(model, torch.randn(32, 10))


def test_lower_task_experts_serve_every_task_through_the_shared_gate() -> None:
    model = make(levels=2)
    losses = task_losses(model(torch.randn(16, 10)))
    experts_of_a = list(model.levels[0].specific["a"].parameters())
    assert all(g is not None for g in reached(losses["b"], experts_of_a))
    shared_ids = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared_ids for p in experts_of_a)
    top_of_a = list(model.levels[1].specific["a"].parameters())
    assert all(g is None for g in reached(losses["b"], top_of_a))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_gradient_engine_accepts_the_model(levels: int) -> None:
    model = make(levels)
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)
