"""The gradient engine: exact, features and forked modes agree with autograd; bad splits fail."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from conftest import assert_same
from taskbalance.aggregation import GradientBalancer
from taskbalance.gradients import GRAMIAN_BLOCK


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


@pytest.mark.parametrize("leaf", [False, True])
def test_forked_representation_used_directly_is_refused(leaf: bool) -> None:
    """A head that reads z itself besides its view would lose that part of dL/dz: refused."""
    body, heads, x = make_model()
    z = torch.randn(12, 6, requires_grad=True) if leaf else body(x)
    zs = tb.fork(z, 3)
    losses = [heads[0](zs[0]).sum(), (heads[1](zs[1]) + z.mean()).sum(), heads[2](zs[2]).sum()]
    with pytest.raises(tb.BalancerUsageError, match="task '1' uses the representation"):
        Fixed([1.0, 1.0, 1.0]).backward(losses, features=zs)
    touched = [*heads.parameters(), *([z] if leaf else body.parameters())]
    assert all(p.grad is None for p in touched)


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


def test_non_finite_gradient_raises_the_dedicated_class() -> None:
    body, heads, x = make_model()
    z = body(x)
    kink = torch.sqrt(z[0, 0] - z[0, 0].detach())  # value 0, gradient +inf
    losses = [heads[0](z).sum(), heads[1](z).sum(), heads[2](z).sum() + kink]
    with pytest.raises(tb.NonFiniteGradientError, match="task '2'") as caught:
        Fixed([1.0, 1.0, 1.0]).backward(losses, shared=body)
    assert caught.value.task == "2" and isinstance(caught.value, tb.SolverError)


def test_non_finite_update_raises_the_dedicated_class() -> None:
    body, heads, x = make_model()
    z = body(x)
    with pytest.raises(tb.NonFiniteGradientError, match="non-finite update") as caught:
        Fixed([1.0, float("nan"), 1.0]).backward([h(z).sum() for h in heads], shared=body)
    assert caught.value.task is None
    assert all(p.grad is None for p in body.parameters())


# ---------------------------------------------------------------------- precision of J
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "features", "forked"])
def test_low_precision_gradients_give_a_float32_jacobian(dtype: torch.dtype, mode: str) -> None:
    """fp16/bf16 gradients are accumulated into a float32 J (its Gramian cannot overflow
    fp16's 65504), and the direction goes back to each input in the input's dtype."""
    body, heads, x = make_model()
    body, heads = body.to(dtype), heads.to(dtype)
    z = body(x.to(dtype))
    inputs = tb.fork(z, 3) if mode == "forked" else [z] * 3
    # losses scaled by 300: some g_i·g_i exceed 65504, the largest fp16 number
    losses = [300.0 * h(zi).sum().float() for h, zi in zip(heads, inputs)]
    seen = {}

    class Spy(Fixed):
        def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
            seen["gramian"] = gramian
            return super().weights_from_gramian(gramian, losses)

        def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
            seen["jacobian"] = jacobian
            return super().aggregate(jacobian, losses)

    features = {"exact": None, "features": z, "forked": inputs}[mode]
    Spy([1.0, 1.0, 1.0]).backward(losses, shared=body, features=features)
    assert seen["jacobian"].dtype == torch.float32
    assert bool(torch.isfinite(seen["gramian"]).all())
    assert float(seen["gramian"].max()) > 65504.0  # would be inf in fp16
    for p in list(body.parameters()) + list(heads.parameters()):
        assert p.grad is not None and p.grad.dtype == dtype and bool(torch.isfinite(p.grad).all())


def test_float32_jacobian_and_direction_are_not_copied() -> None:
    """The float32 path converts nothing: J is float32 and, in exact mode, each shared
    parameter's new ``.grad`` is a view of the one direction ``wᵀJ`` (no copy)."""
    body, heads, x = make_model()
    z = body(x)
    bal = Fixed([0.5, 2.0, -1.0])
    bal.backward([h(z).pow(2).mean() for h in heads], shared=body)
    grads = [p.grad for p in body.parameters()]
    storages = {g.untyped_storage().data_ptr() for g in grads}
    assert len(storages) == 1 and all(g.dtype == torch.float32 for g in grads)
    assert sum(g.numel() for g in grads) == grads[0].untyped_storage().nbytes() // 4


# ---------------------------------------------------------------------- fast paths
BLOCK = GRAMIAN_BLOCK


@pytest.mark.parametrize(
    "shape",
    [(1, 3), (3, 100), (4, 2 * BLOCK), (10, 3 * BLOCK), (5, 5 * BLOCK + 17), (2, 70001)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_gramian_equals_j_jt(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The Gramian is summed over column blocks (with a remainder block); it is J Jᵀ."""
    from taskbalance.gradients import gramian

    jac = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = jac.double() @ jac.double().T
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    atol = rtol * shape[1]  # entries that cancel are compared with the diagonal's scale
    torch.testing.assert_close(gramian(jac).double(), expected, rtol=rtol, atol=atol)
    wide = jac.T.contiguous().T  # column-major: not a strided view the blocks can use
    torch.testing.assert_close(gramian(wide).double(), expected, rtol=rtol, atol=atol)


def test_shared_parameter_unused_by_a_task_gives_a_zero_block() -> None:
    """A shared tensor that a task does not reach has a zero block in that task's row (one
    that a single task reaches looks like a head: warned, see test_engine_misuse.py)."""
    body, heads, x = make_model()
    extra = nn.Parameter(torch.full((4,), 0.5))
    z = body(x)
    losses = [heads[0](z).sum(), heads[1](z).sum() + extra.pow(2).sum(), heads[2](z).sum()]
    seen = {}

    class Spy(Fixed):
        def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
            seen["jacobian"] = jacobian.clone()
            return super().aggregate(jacobian, losses)

    with pytest.warns(tb.TaskBalanceWarning, match=r"task '1': a tensor of shape \(4,\)"):
        Spy([1.0, 2.0, 3.0]).backward(losses, shared=[*body.parameters(), extra])
    jac = seen["jacobian"]
    assert torch.equal(jac[0, -4:], torch.zeros(4)) and torch.equal(jac[2, -4:], torch.zeros(4))
    torch.testing.assert_close(jac[1, -4:], torch.ones(4))
    torch.testing.assert_close(extra.grad, torch.full((4,), 2.0))


class _BigHead(nn.Module):
    """A head whose two large parameters get one gradient tensor from autograd (an add),
    and whose other two get views of one buffer (a concatenation)."""

    def __init__(self) -> None:
        super().__init__()
        n = 1 << 15
        self.a, self.b = nn.Parameter(torch.ones(n)), nn.Parameter(torch.ones(n))
        self.c, self.d = nn.Parameter(torch.ones(n)), nn.Parameter(torch.ones(n))
        self.scale = torch.linspace(0.0, 1.0, n)

    def forward(self, z: Tensor) -> Tensor:
        shared = ((self.a + self.b) * self.scale).sum()
        joined = (torch.cat([self.c, self.d]) * torch.cat([self.scale, 2 * self.scale])).sum()
        return z.sum() * 1e-3 + shared + joined


@pytest.mark.parametrize("mode", ["exact", "forked"])
def test_large_task_specific_gradients_never_share_storage(mode: str) -> None:
    """Large task-specific gradients become ``.grad`` without a copy only when nothing else
    holds their storage: two parameters never end up with one buffer as their ``.grad``."""
    body, _, x = make_model()
    heads = [_BigHead(), _BigHead()]
    z = body(x)
    inputs = tb.fork(z, 2) if mode == "forked" else [z, z]
    losses = [h(zi) for h, zi in zip(heads, inputs)]
    Fixed([1.0, 1.0]).backward(losses, shared=body, features=inputs if mode == "forked" else None)
    grads = [p.grad for h in heads for p in (h.a, h.b, h.c, h.d)]
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
    scale = heads[0].scale
    for h in heads:
        for p, expected in ((h.a, scale), (h.b, scale), (h.c, scale), (h.d, 2 * scale)):
            torch.testing.assert_close(p.grad, expected)
    heads[0].a.grad.zero_()  # in-place on one .grad leaves the others alone
    torch.testing.assert_close(heads[0].b.grad, scale)


# ---------------------------------------------------------------------- a raised step
def _poisoned_pcgrad(monkeypatch: pytest.MonkeyPatch) -> None:
    """PCGrad's coefficients become NaN *after* its visiting orders were drawn."""
    from taskbalance.aggregation import pcgrad

    real = pcgrad.pcgrad_coefficients
    monkeypatch.setattr(pcgrad, "pcgrad_coefficients", lambda g, o: real(g, o) * float("nan"))


def _poisoned_gradvac(monkeypatch: pytest.MonkeyPatch) -> None:
    """GradVac's coefficients become NaN *after* its orders were drawn and its targets moved."""
    from taskbalance.aggregation import gradvac

    real = gradvac.gradvac_coefficients

    def poisoned(*args: object, **kw: object) -> tuple[object, object]:
        coef, targets = real(*args, **kw)
        return coef * float("nan"), targets

    monkeypatch.setattr(gradvac, "gradvac_coefficients", poisoned)


def conflicting(heads: nn.ModuleList, z: Tensor) -> list[Tensor]:
    """Losses whose body gradients conflict pairwise, so PCGrad's and GradVac's weights
    depend on the order in which the tasks are visited (i.e. on their random draws)."""
    return [(-1.0) ** i * h(z).mean() * (i + 1) for i, h in enumerate(heads)]


@pytest.mark.parametrize("accumulation_steps", [1, 2])
@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_a_step_that_raises_leaves_the_state_untouched(
    monkeypatch: pytest.MonkeyPatch, method: str, accumulation_steps: int
) -> None:
    """The methods advance their state while solving (PCGrad's and GradVac's draws,
    GradVac's targets), before the engine's final check; a step that then raises must
    leave ``state_dict()`` as it was, so the next step is the one it would have been."""
    kw = {"beta": 0.5} if method == "gradvac" else {}
    bal = tb.make(method, 3, accumulation_steps=accumulation_steps, **kw)
    twin = tb.make(method, 3, accumulation_steps=accumulation_steps, **kw)
    body, heads, x = make_model()
    for b in (bal, twin):  # one good accumulated step: the state has moved
        for _ in range(accumulation_steps):
            z = body(x)
            b.backward(conflicting(heads, z), shared=body)
    before = {k: v for k, v in bal.state_dict().items() if k != "history"}
    with monkeypatch.context() as patch:
        (_poisoned_pcgrad if method == "pcgrad" else _poisoned_gradvac)(patch)
        body.zero_grad(set_to_none=True)
        z = body(x)
        with pytest.raises(tb.NonFiniteGradientError):
            bal.backward(conflicting(heads, z), shared=body)
    after = {k: v for k, v in bal.state_dict().items() if k != "history"}
    assert_same(after, before)
    assert bal.micro_step == 0 and all(p.grad is None for p in body.parameters())
    # the next step is the one the balancer would have taken without the failed one
    for _ in range(accumulation_steps):
        for b in (bal, twin):
            z = body(x)
            b.backward(conflicting(heads, z), shared=body)
        assert torch.equal(bal.last_weights, twin.last_weights)
    assert_same(bal.state_dict(), twin.state_dict())
    with pytest.raises(AssertionError):  # a good step does move the state
        assert_same(bal.state_dict()["state"], before["state"])


def test_losses_from_a_generator_are_still_accepted() -> None:
    """``backward`` looks at the losses (for their device) before checking them: a one-shot
    iterator must not be consumed by that look."""
    body, heads, x = make_model()
    z = body(x)
    weights = Fixed([1.0, 1.0, 1.0]).backward((h(z).pow(2).mean() for h in heads), shared=body)
    assert weights is not None and weights.shape == (3,)
    torch.testing.assert_close(
        next(body.parameters()).grad, reference([1.0, 1.0, 1.0], weighted=False)[0]
    )
