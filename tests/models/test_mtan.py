"""MTAN: backbone and mask shapes, masks in (0, 1), what is shared, gradient engine."""

from __future__ import annotations

import pytest
import torch
from model_checks import (
    OnesBalancer,
    check_engine,
    check_gradient_flow,
    check_partition,
    task_losses,
)

from taskbalance.errors import BalancerUsageError
from taskbalance.models import MTAN


def make(share_f: bool = True, tasks: object = ("left", "right")) -> MTAN:
    torch.manual_seed(0)
    return MTAN(1, tasks, channels=(4, 6, 8), out_features=10, share_f=share_f)


@pytest.mark.parametrize("size", [28, 32])
def test_shapes(size: int) -> None:
    model = make()
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert {t: o.shape for t, o in out.items()} == {"left": (2, 10), "right": (2, 10)}
    z = model.backbone(x)
    sides = [size, size // 2, size // 4]
    assert [tuple(t.shape) for t in z] == [
        (2, c, s, s) for c, s in zip((4, 6, 8), sides) for _ in range(2)
    ]
    masks = model.attention_masks(x)
    assert [tuple(m.shape) for m in masks["left"]] == [
        (2, c, s, s) for c, s in zip((4, 6, 8), sides)
    ]


def test_masks_lie_strictly_between_zero_and_one() -> None:
    model = make()
    for masks in model.attention_masks(torch.randn(3, 1, 28, 28) * 4).values():
        for m in masks:
            assert bool((m > 0).all()) and bool((m < 1).all())
            assert float(m.detach().std()) > 0  # not a constant mask


def test_task_features_are_masked_shared_features() -> None:
    model = make().eval()
    x = torch.randn(2, 1, 28, 28)
    z = model.backbone(x)
    feat, masks = model._branch("left", z)
    torch.testing.assert_close(feat, masks[-1] * z[-1])
    torch.testing.assert_close(model.task_outputs(z)["left"], model(x)["left"])
    packed = model.features(x)
    assert packed.shape == (2, sum(t[0].numel() for t in z))
    torch.testing.assert_close(model.heads(packed, x)["right"], model(x)["right"])


@pytest.mark.parametrize("share_f", [True, False])
def test_parameter_groups_and_gradient_flow(share_f: bool) -> None:
    model = make(share_f, tasks=("a", "b", "c"))
    check_partition(model, model.tasks)
    check_gradient_flow(model, torch.randn(4, 1, 28, 28))
    f_ids = {id(p) for p in model.f.parameters()}
    assert bool(f_ids & {id(p) for p in model.shared_parameters()}) == share_f


def test_gradient_engine_accepts_the_model() -> None:
    x = torch.randn(4, 1, 28, 28)
    check_engine(make(share_f=True), x)
    model = make(share_f=False)
    check_engine(model, x, features=model.features, heads=model.heads)


def test_feature_mode_refuses_the_shared_f() -> None:
    model = make(share_f=True)
    x = torch.randn(4, 1, 28, 28)
    z = model.features(x)
    with pytest.raises(BalancerUsageError, match="shared"):
        OnesBalancer(model.tasks).backward(task_losses(model.heads(z, x)), features=z)
