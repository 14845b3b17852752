"""Checks shared by the model tests: parameter partition, gradient flow, gradient engine.

Imported as ``from model_checks import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.aggregation.base import GradientBalancer


class OnesBalancer(GradientBalancer):
    """A stand-in gradient method: every task weight is 1 (the update is the plain sum)."""

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return torch.ones(len(losses), dtype=gramian.dtype)


def task_losses(outputs: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """A squared error against fixed random targets, per task."""
    g = torch.Generator().manual_seed(seed)
    return {
        t: (out - torch.randn(out.shape, generator=g)).pow(2).mean() for t, out in outputs.items()
    }


def ids(params: Any) -> list[int]:
    return [id(p) for p in params]


def check_partition(model: nn.Module, tasks: Sequence[str]) -> None:
    """shared + every task's parameters = all parameters, each exactly once."""
    assert isinstance(model.shared_parameters(), list)  # reusable at every step
    assert all(isinstance(model.task_parameters(t), list) for t in tasks)
    shared = ids(model.shared_parameters())
    own = [ids(model.task_parameters(t)) for t in tasks]
    listed = shared + [i for group in own for i in group]
    assert len(listed) == len(set(listed)), "a parameter is listed twice"
    assert set(listed) == set(ids(model.parameters())), "the groups do not cover the model"
    assert shared, "no shared parameter"
    assert all(own), "a task has no parameter of its own"


def reached(loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def check_gradient_flow(model: nn.Module, x: Tensor) -> None:
    """Every task loss reaches every shared parameter (with a non-zero total gradient) and
    its own parameters, and never another task's parameters."""
    outputs = model(x)
    tasks = list(outputs)
    losses = task_losses(outputs)
    shared = list(model.shared_parameters())
    for t in tasks:
        grads = reached(losses[t], shared)
        missing = [tuple(p.shape) for p, g in zip(shared, grads) if g is None]
        assert not missing, f"task {t!r} does not reach shared parameters {missing}"
        assert sum(float(g.norm()) for g in grads if g is not None) > 0
        own = list(model.task_parameters(t))
        own_grads = reached(losses[t], own)
        assert all(g is not None for g in own_grads), f"task {t!r} misses its own parameters"
        assert sum(float(g.norm()) for g in own_grads if g is not None) > 0
        for u in tasks:
            if u == t:
                continue
            for p, g in zip(own, reached(losses[u], own)):
                assert g is None or not bool(g.any()), (
                    f"loss of {u!r} reaches a parameter {tuple(p.shape)} of task {t!r}"
                )


def reference_grads(model: nn.Module, losses: Mapping[str, Tensor]) -> list[Tensor | None]:
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def check_engine(
    model: nn.Module,
    x: Tensor,
    *,
    features: Callable[[Tensor], Any] | None = None,
    heads: Callable[[Any, Tensor], Mapping[str, Tensor]] | None = None,
) -> None:
    """The gradient engine accepts the model (``shared=`` mode, and ``features=`` mode when
    ``features``/``heads`` are given) and, with all weights 1, fills every parameter's
    ``.grad`` with the gradient of the summed losses."""
    torch.manual_seed(0)
    expected = reference_grads(model, task_losses(model(x)))
    assert all(g is not None for g in expected)
    tasks = list(model(x))
    for jacobian_free in (True, False):  # the exact mode without J, then with J stored
        model.zero_grad(set_to_none=True)
        balancer = OnesBalancer(tasks, jacobian_free=jacobian_free)
        weights = balancer.backward(task_losses(model(x)), shared=model.shared_parameters())
        assert weights is not None and torch.equal(weights, torch.ones(len(tasks)))
        assert balancer.mode == "exact"
        for p, g in zip(model.parameters(), expected):
            assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    if features is None or heads is None:
        return
    model.zero_grad(set_to_none=True)
    z = features(x)
    balancer.backward(task_losses(heads(z, x)), features=z)
    assert balancer.mode == "features"
    for p, g in zip(model.parameters(), expected):
        assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
