"""The fork mode's factored task gradients (taskbalance.structured): heads that start with a
linear layer give G and wᵀJ from per-task factors, equal to those of J; anything the engine
cannot recognise falls back to J; a hook on the layer's output is honoured."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.gradients import TaskGradients, forked_task_jacobian
from taskbalance.structured import FactoredTaskGradients

B, D, K = 32, 16, 3  # factored up to 3 outputs a head: o² (B + D) <= B D


class MatmulHead(nn.Module):
    """``z @ W + b`` (autograd's mm node, then an add)."""

    def __init__(self, outputs: int = 1, alpha: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, outputs, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(outputs, dtype=torch.float64))
        self.alpha = alpha

    def forward(self, z: Tensor) -> Tensor:
        if self.alpha is None:
            return z @ self.weight + self.bias
        return torch.addmm(self.bias, z, self.weight, alpha=self.alpha)


def linear(outputs: int = 1, bias: bool = True) -> nn.Module:
    return nn.Linear(D, outputs, bias=bias, dtype=torch.float64)


#: heads whose first operation is a product with the view: the factored path
FACTORED: dict[str, Callable[[int], nn.Module]] = {
    "linear": lambda i: linear(),
    "linear without bias": lambda i: linear(bias=False),
    "linear, 3 outputs": lambda i: linear(3),
    "outputs 1, 2, 3": lambda i: linear(i + 1),
    "z @ W + b": lambda i: MatmulHead(),
    "addmm, alpha": lambda i: MatmulHead(2, alpha=-0.5 + i),
    "MLP head": lambda i: nn.Sequential(linear(2), nn.Tanh(), nn.Linear(2, 1).double()),
}


class Residual(nn.Module):
    """Uses its view twice: through the linear layer and directly."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = linear()

    def forward(self, z: Tensor) -> Tensor:
        return self.lin(z) + z.pow(2).sum(-1, keepdim=True)


class TwoLayers(nn.Module):
    """Two linear layers read the same view (two consumers of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = linear(), linear()

    def forward(self, z: Tensor) -> Tensor:
        return self.a(z) * self.b(z)


class SelfProduct(nn.Module):
    """The view is also in the product's right factor: ``z @ (W + zᵀ z W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, 1, dtype=torch.float64))

    def forward(self, z: Tensor) -> Tensor:
        return z @ (self.weight + 0.1 * z.T @ z @ self.weight)


#: heads the engine must not factor: J is stacked from the view gradients
FALLBACK: dict[str, Callable[[int], nn.Module]] = {
    "activation first": lambda i: nn.Sequential(nn.Tanh(), linear()),
    "view used twice": lambda i: Residual(),
    "two layers on the view": lambda i: TwoLayers(),
    "view in the right factor": lambda i: SelfProduct(),
    "one head of three not linear": lambda i: linear() if i else nn.Sequential(nn.Tanh(), linear()),
    # S² (B + D) = 18² · 48 > K² B D = 9 · 512: the factors would cost more than J
    "wide heads": lambda i: linear(6),
}


def build(make_head: Callable[[int], nn.Module], seed: int = 0) -> tuple[nn.Module, list, Tensor]:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(4, D), nn.Tanh()).double()
    heads = [make_head(i) for i in range(K)]
    x = torch.randn(B, 4, dtype=torch.float64)
    return body, heads, x


def forked_losses(
    body: nn.Module, heads: list, x: Tensor, factored: bool = True
) -> tuple[list[Tensor], tb.gradients.ForkedFeatures]:
    zs = tb.fork(body(x), K, factored=factored)
    losses = [(h(zi) - 0.3 * i).pow(2).mean() for i, (h, zi) in enumerate(zip(heads, zs))]
    return losses, zs


def reference_jacobian(losses: list[Tensor], zs: list[Tensor]) -> Tensor:
    """Row i: autograd's dL_i/dz_i, one call per task (hooks included)."""
    rows = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss, z in zip(losses, zs)]
    return torch.stack([r.reshape(-1) for r in rows])


def check_against(grads: TaskGradients, jac: Tensor) -> None:
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    torch.testing.assert_close(grads.gramian(), jac @ jac.T, rtol=1e-12, atol=1e-14)
    if isinstance(grads, FactoredTaskGradients):
        torch.testing.assert_close(grads.combine(weights), weights @ jac, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads.jacobian, jac, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(FACTORED))
def test_heads_starting_with_a_product_give_the_gramian_and_update_of_j(kind: str) -> None:
    body, heads, x = build(FACTORED[kind])
    losses, zs = forked_losses(body, heads, x)
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert isinstance(grads, FactoredTaskGradients), kind
    check_against(grads, jac)
    # the heads' own gradients come out of the same pass, as autograd gives them
    for i, (head, loss) in enumerate(zip(heads, losses)):
        params = list(head.parameters())
        expected = torch.autograd.grad(loss, params, retain_graph=True)
        got = dict((id(p), g) for p, g in grads.own[i])
        assert set(got) == {id(p) for p in params}
        for p, g in zip(params, expected):
            torch.testing.assert_close(got[id(p)], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(FALLBACK))
def test_heads_the_engine_cannot_factor_fall_back_to_j(kind: str) -> None:
    body, heads, x = build(FALLBACK[kind])
    losses, zs = forked_losses(body, heads, x)
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert not isinstance(grads, FactoredTaskGradients), kind
    check_against(grads, jac)


def test_fork_factored_false_always_forms_j() -> None:
    body, heads, x = build(FACTORED["linear"])
    losses, zs = forked_losses(body, heads, x, factored=False)
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert not isinstance(grads, FactoredTaskGradients)
    check_against(grads, jac)


def test_three_dimensional_features_fall_back_to_j() -> None:
    torch.manual_seed(0)
    z = torch.randn(B, 2, D, dtype=torch.float64, requires_grad=True)
    heads = [linear() for _ in range(K)]
    zs = tb.fork(z * 1.0, K)
    losses = [h(zi).pow(2).mean() for h, zi in zip(heads, zs)]
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert not isinstance(grads, FactoredTaskGradients)
    check_against(grads, jac)


def test_heads_under_autocast_fall_back_to_j() -> None:
    torch.manual_seed(0)
    z = torch.randn(B, D, requires_grad=True)
    heads = [nn.Linear(D, 1) for _ in range(K)]
    zs = tb.fork(z * 1.0, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [h(zi) for h, zi in zip(heads, zs)]
    losses = [o.float().pow(2).mean() for o in outputs]
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert not isinstance(grads, FactoredTaskGradients)
    torch.testing.assert_close(grads.jacobian, jac)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained layer", "frozen layer"])
def test_a_hook_on_the_layer_output_is_in_the_factored_gradient(frozen: bool) -> None:
    """The gradient at the layer's output is read after the user's hooks on it, whether the
    layer's backward runs (its weight is trained) or not (frozen)."""
    body, heads, x = build(FACTORED["linear, 3 outputs"])
    zs = tb.fork(body(x), K)
    losses = []
    for i, (head, zi) in enumerate(zip(heads, zs)):
        head.requires_grad_(not frozen)
        y = head(zi)
        y.register_hook(lambda g, i=i: g * (2.0 + i))
        losses.append((y - 0.3 * i).pow(2).mean())
    jac = reference_jacobian(losses, zs)
    grads = forked_task_jacobian(losses, zs, ["a", "b", "c"])
    assert isinstance(grads, FactoredTaskGradients)
    check_against(grads, jac)
    # the hooks change J (the same heads without them): the comparison can fail
    plain = [(h(zi) - 0.3 * i).pow(2).mean() for i, (h, zi) in enumerate(zip(heads, zs))]
    assert not torch.allclose(reference_jacobian(plain, zs), jac)


def test_fork_factored_must_be_a_bool() -> None:
    z = torch.randn(B, D, requires_grad=True)
    with pytest.raises(ValueError, match="factored must be True or False"):
        tb.fork(z, K, factored="yes")  # type: ignore[arg-type]


def run_step(
    method: str, forked: bool, seed: int = 0, steps: int = 1, **kw: object
) -> tuple[list[Tensor], list[Tensor]]:
    """Weights and every parameter's gradient after ``steps`` calls with fresh batches."""
    body, heads, _ = build(FACTORED["outputs 1, 2, 3"], seed)
    bal = tb.make(method, K, **kw)
    weights = []
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(B, 4, dtype=torch.float64, generator=gen)
        z = body(x)
        zs = tb.fork(z, K) if forked else [z] * K
        losses = [(h(zi) - 0.3 * i).pow(2).mean() for i, (h, zi) in enumerate(zip(heads, zs))]
        out = bal.backward(losses, features=zs if forked else z)
        if out is not None:
            weights.append(out.clone())
    params = list(body.parameters()) + [p for h in heads for p in h.parameters()]
    return weights, [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


#: Gramian methods take G and wᵀJ from the factors; GradDrop (which needs J itself), a
#: subset of the tasks and gradient accumulation form J from them.
STEPS = {
    "upgrad": ("upgrad", {}, False),
    "mgda": ("mgda", {}, False),
    "nash_mtl (rescales wᵀJ)": ("nash_mtl", {}, False),
    "pcgrad, weighted heads": ("pcgrad", {"task_specific": "weighted"}, False),
    "imtl": ("imtl", {}, False),
    "cagrad": ("cagrad", {}, False),
    "graddrop (needs J)": ("graddrop", {}, True),
    "upgrad, tasks_per_step=2": ("upgrad", {"tasks_per_step": 2}, True),
    "mgda, accumulation_steps=2": ("mgda", {"accumulation_steps": 2}, False),
}


@pytest.mark.parametrize("case", list(STEPS))
def test_a_factored_fork_step_matches_the_features_mode(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    method, kw, forms_j = STEPS[case]
    formed = []
    original = FactoredTaskGradients._form_jacobian

    def counted(self: FactoredTaskGradients) -> Tensor:
        formed.append(1)
        return original(self)

    monkeypatch.setattr(FactoredTaskGradients, "_form_jacobian", counted)
    steps = 2 if "accumulation" in case else 1
    w_fork, g_fork = run_step(method, True, steps=steps, **kw)
    assert bool(formed) == forms_j, case  # J formed only where the step needs it
    w_feat, g_feat = run_step(method, False, steps=steps, **kw)
    assert len(w_fork) == len(w_feat) > 0
    for a, b in zip(w_fork, w_feat):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_fork, g_feat):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
