"""The gradient engine: exact, features and forked modes agree with autograd; bad splits fail."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.aggregation import GradientBalancer


class Fixed(GradientBalancer):
    """Returns the weights it was given, to test the engine alone."""

    method_name = "fixed_test"

    def __init__(self, weights: list[float], **kw) -> None:
        super().__init__(len(weights), **kw)
        self.fixed = torch.tensor(weights, dtype=torch.float64)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.fixed.clone()


def make_model(k: int = 3) -> tuple[nn.Module, nn.ModuleList, Tensor]:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))
    return body, heads, torch.randn(12, 5)


def reference(weights: list[float], weighted: bool) -> list[Tensor]:
    """Gradients written by hand: body gets sum w_i dL_i, head i gets (w_i) dL_i/dθ_i."""
    body, heads, x = make_model(len(weights))
    z = body(x)
    losses = [h(z).pow(2).mean() for h in heads]
    params = list(body.parameters())
    out = [torch.zeros_like(p) for p in params]
    for w, loss in zip(weights, losses):
        for acc, g in zip(out, torch.autograd.grad(loss, params, retain_graph=True)):
            acc += w * g
    for w, h, loss in zip(weights, heads, losses):
        for g in torch.autograd.grad(loss, list(h.parameters()), retain_graph=True):
            out.append(w * g if weighted else g)
    return out


@pytest.mark.parametrize("mode", ["exact", "features", "forked"])
@pytest.mark.parametrize("task_specific", ["unweighted", "weighted"])
def test_engine_matches_hand_written_gradients(mode: str, task_specific: str) -> None:
    weights = [0.5, 2.0, -1.0]
    body, heads, x = make_model()
    z = body(x)
    inputs = tb.fork(z, 3) if mode == "forked" else [z] * 3
    losses = [h(zi).pow(2).mean() for h, zi in zip(heads, inputs)]
    bal = Fixed(weights, task_specific=task_specific)
    features = {"exact": None, "features": z, "forked": inputs}[mode]
    bal.backward(losses, shared=body, features=features)
    got = [p.grad for p in list(body.parameters()) + list(heads.parameters())]
    expected = reference(weights, task_specific == "weighted")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_like_backward() -> None:
    body, heads, x = make_model()
    for _ in range(2):
        z = body(x)
        Fixed([1.0, 1.0, 1.0]).backward([h(z).pow(2).mean() for h in heads], shared=body)
    expected = reference([1.0, 1.0, 1.0], weighted=False)
    torch.testing.assert_close(next(body.parameters()).grad, 2 * expected[0])


def test_forked_view_fed_to_the_wrong_head_is_refused() -> None:
    body, heads, x = make_model()
    zs = tb.fork(body(x), 3)
    losses = [heads[0](zs[1]).sum(), heads[1](zs[1]).sum(), heads[2](zs[2]).sum()]
    with pytest.raises(tb.BalancerUsageError, match="own view"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, features=zs)


def test_nested_features_are_refused() -> None:
    body, heads, x = make_model()
    z1 = body[0](x)
    z2 = body[2](body[1](z1))
    losses = [heads[0](z2).sum(), (heads[1](z2) + z1.sum()).sum(), heads[2](z2).sum()]
    with pytest.raises(tb.BalancerUsageError, match="counted twice"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, features=[z1, z2])


def test_parameter_shared_by_two_tasks_but_not_declared_is_refused() -> None:
    body, heads, x = make_model()
    z = body(x)
    losses = [heads[0](z).sum(), heads[0](z).mean(), heads[2](z).sum()]
    with pytest.raises(tb.BalancerUsageError, match="not in shared"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body)


def test_task_that_ignores_the_shared_part_is_named() -> None:
    body, heads, x = make_model()
    z = body(x)
    free = nn.Parameter(torch.ones(()))
    losses = [heads[0](z).sum(), free * 2, heads[2](z).sum()]
    with pytest.raises(tb.BalancerUsageError, match="'1' does not depend"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body)


def test_non_finite_gradient_is_named_not_propagated() -> None:
    body, heads, x = make_model()
    z = body(x)
    kink = torch.sqrt(z[0, 0] - z[0, 0].detach())  # value 0, gradient +inf
    losses = [heads[0](z).sum(), heads[1](z).sum() + kink, heads[2](z).sum()]
    with pytest.raises(tb.SolverError, match="task '1'"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body)
    assert all(p.grad is None for p in body.parameters())


def test_stacked_tensor_of_losses_is_refused_for_gradient_methods() -> None:
    body, heads, x = make_model()
    z = body(x)
    stacked = torch.stack([h(z).sum() for h in heads])
    with pytest.raises(tb.BalancerUsageError, match="list or a dict"):
        Fixed([1.0, 1.0, 1.0]).backward(stacked, shared=body)


def test_losses_without_grad_are_named() -> None:
    body, heads, x = make_model()
    z = body(x)
    losses = [heads[0](z).sum(), heads[1](z).sum().detach(), heads[2](z).sum()]
    with pytest.raises(tb.BalancerUsageError, match="'1' does not require grad"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body)


def test_features_without_grad_are_refused() -> None:
    body, heads, x = make_model()
    z = body(x)
    losses = [h(z).sum() for h in heads]
    with pytest.raises(tb.BalancerUsageError, match="features must be tensors that require grad"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body, features=z.detach())


def test_gradient_method_without_shared_or_features_is_refused() -> None:
    body, heads, x = make_model()
    z = body(x)
    with pytest.raises(tb.BalancerUsageError, match="needs shared="):
        Fixed([1.0, 1.0, 1.0]).backward([h(z).sum() for h in heads])
