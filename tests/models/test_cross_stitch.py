"""Cross-stitch network: unit initialisation, mixing, gradient flow, engine."""

from __future__ import annotations

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition, reached, task_losses

from taskbalance.models import CrossStitchNetwork
from taskbalance.models.cross_stitch import stitch_init


def make(tasks: object = ("a", "b"), **kw) -> CrossStitchNetwork:
    torch.manual_seed(0)
    return CrossStitchNetwork(10, tasks, hidden=(8, 6), **kw)


def test_units_initialised_as_in_the_paper() -> None:
    model = make()
    assert len(model.stitches) == 2
    for alpha in model.stitches:
        torch.testing.assert_close(alpha.detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = make(("a", "b", "c"), alpha_self=0.8)
    alpha = three.stitches[0].detach()
    torch.testing.assert_close(alpha.diagonal(), torch.full((3,), 0.8))
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    assert alpha[0, 1].item() == pytest.approx(0.1)
    torch.testing.assert_close(stitch_init(1, 0.9), torch.ones(1, 1))


def test_shapes_and_mixing() -> None:
    model = make(out_features={"a": 2, "b": 5})
    x = torch.randn(4, 10)
    out = model(x)
    assert out["a"].shape == (4, 2) and out["b"].shape == (4, 5)
    assert [layer.weight.shape for layer in model.columns["a"]] == [(8, 10), (6, 8)]
    # the first layer's stitched activation of column a is 0.9 a + 0.1 b
    a = torch.relu(model.columns["a"][0](x))
    b = torch.relu(model.columns["b"][0](x))
    h = [0.9 * a + 0.1 * b, 0.1 * a + 0.9 * b]
    h = [torch.relu(model.columns[t][1](v)) for t, v in zip("ab", h)]
    expected = model.outputs["a"](0.9 * h[0] + 0.1 * h[1])
    torch.testing.assert_close(out["a"], expected)


def test_parameter_groups_and_gradient_flow() -> None:
    model = make(("a", "b", "c"))
    check_partition(model, model.tasks)
    check_gradient_flow(model, torch.randn(16, 10))
    assert {id(p) for p in model.stitch_parameters()} <= {id(p) for p in model.shared_parameters()}


def test_identity_units_keep_columns_apart() -> None:
    model = make(alpha_self=1.0)
    losses = task_losses(model(torch.randn(8, 10)))
    column_b = list(model.column_parameters("b"))
    assert all(g is None or not bool(g.any()) for g in reached(losses["a"], column_b))


def test_gradient_engine_accepts_the_model() -> None:
    check_engine(make(("a", "b", "c")), torch.randn(16, 10))
