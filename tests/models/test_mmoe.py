"""MMoE and OMoE: expert and gate shapes, gates as distributions, gradient flow, engine."""

from __future__ import annotations

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition

from taskbalance.models import MMoE, OMoE


def make(cls: type[MMoE] = MMoE) -> MMoE:
    torch.manual_seed(0)
    return cls(10, ["a", "b", "c"], num_experts=4, expert_hidden=(6, 5), tower_hidden=(3,))


def test_paper_configuration_shapes() -> None:
    model = MMoE(100, 2)
    weight, bias = model.experts.weights[0], model.experts.biases[0]
    assert weight.shape == (8, 100, 16) and bias.shape == (8, 16)
    assert set(model.gates) == {"0", "1"}
    assert all(g.weight.shape == (8, 100) for g in model.gates.values())
    assert model.towers["0"][0].out_features == 8
    x = torch.randn(5, 100)
    assert model.features(x).shape == (5, 8, 16)
    assert {t: o.shape for t, o in model(x).items()} == {"0": (5, 1), "1": (5, 1)}
    assert list(OMoE(100, 2).gates) == ["shared"]


def test_multi_layer_experts_shapes() -> None:
    model = make()
    assert [w.shape for w in model.experts.weights] == [(4, 10, 6), (4, 6, 5)]
    assert model.features(torch.randn(2, 10)).shape == (2, 4, 5)
    assert make(OMoE).features(torch.randn(2, 10)).shape == (2, 5)


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_gates_are_distributions(cls: type[MMoE]) -> None:
    model = make(cls)
    gates = model.gate_weights(torch.randn(7, 10) * 5)
    for g in gates.values():
        assert g.shape == (7, 4)
        assert bool((g >= 0).all())
        torch.testing.assert_close(g.sum(-1), torch.ones(7))
    if cls is OMoE:
        torch.testing.assert_close(gates["a"], gates["b"])
    else:
        assert not torch.allclose(gates["a"], gates["b"])


def test_forward_is_heads_of_features() -> None:
    model = make()
    x = torch.randn(3, 10)
    torch.testing.assert_close(model.heads(model.features(x), x)["b"], model(x)["b"])
    with pytest.raises(ValueError, match="needs the input"):
        model.heads(model.features(x))
    omoe = make(OMoE)
    torch.testing.assert_close(omoe.heads(omoe.features(x))["c"], omoe(x)["c"])


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_parameter_groups_and_gradient_flow(cls: type[MMoE]) -> None:
    model = make(cls)
    check_partition(model, model.tasks)
    check_gradient_flow(model, torch.randn(32, 10))
    gate_ids = {id(p) for p in model.gates.parameters()}
    shared_ids = {id(p) for p in model.shared_parameters()}
    assert bool(gate_ids & shared_ids) == (cls is OMoE)


def test_gradient_engine_accepts_mmoe() -> None:
    model = make()
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)


def test_gradient_engine_accepts_omoe() -> None:
    model = make(OMoE)
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)
