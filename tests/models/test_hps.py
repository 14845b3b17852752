"""Hard parameter sharing: shapes, parameter groups, gradient flow, gradient engine."""

from __future__ import annotations

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition

from taskbalance.models import HardParameterSharing


def make(**kw) -> HardParameterSharing:
    torch.manual_seed(0)
    return HardParameterSharing(10, ["a", "b"], shared_hidden=(12, 7), tower_hidden=(5,), **kw)


def test_shapes_and_names() -> None:
    model = make(out_features={"a": 3, "b": 1})
    x = torch.randn(4, 10)
    out = model(x)
    assert list(out) == ["a", "b"]
    assert out["a"].shape == (4, 3) and out["b"].shape == (4, 1)
    assert model.features(x).shape == (4, 7)
    assert [m.out_features for m in model.bottom if isinstance(m, torch.nn.Linear)] == [12, 7]
    torch.testing.assert_close(model.heads(model.features(x))["a"], out["a"])
    counted = HardParameterSharing(10, 3)
    assert counted.tasks == ("0", "1", "2")
    assert counted.bottom[0].out_features == 113  # the MMoE paper's shared bottom


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shared_hidden"):
        HardParameterSharing(10, 2, shared_hidden=())
    with pytest.raises(ValueError, match="no width"):
        HardParameterSharing(10, ["a", "b"], out_features={"a": 1})


def test_parameter_groups_and_gradient_flow() -> None:
    model = make()
    check_partition(model, model.tasks)
    check_gradient_flow(model, torch.randn(16, 10))


def test_gradient_engine_accepts_the_model() -> None:
    model = make()
    check_engine(model, torch.randn(16, 10), features=model.features, heads=model.heads)
