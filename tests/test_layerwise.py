"""The exact mode without J (``jacobian_free=True``, :mod:`taskbalance.layerwise`).

The references are per-task ``torch.autograd.grad`` calls, flattened and stacked by the test
itself: G = J Jᵀ, wᵀJ and the heads' gradients must come out the same from the layer-by-layer
computation on trunks of every common kind, and training must match the mode that stores J.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import taskbalance as tb
from taskbalance.errors import BalancerUsageError
from taskbalance.layerwise import layerwise_gradients

K = 3


class Tied(nn.Module):
    """One Linear applied twice in a row: its second use feeds its first."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.mid(torch.tanh(self.mid(h)))


class Scaled(nn.Module):
    """A bare parameter used in the forward (no module of its own), and one used by a
    rearrangement only, straight into the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.offset = nn.Parameter(torch.randn(8))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.lin(x)) * self.scale + self.offset.view(1, 8)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, bias=False),
            nn.GroupNorm(2, 4),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 8),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 2, 7, 7)[:, :, :, :7])


class Tokens(nn.Module):
    """Embedding, a transformer encoder layer (attention's packed projections) and a GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        ids = (x.abs() * 7).long().clamp(max=19)[:, :5]
        out, _ = self.gru(self.enc(self.emb(ids)))
        return out.mean(1)


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, z: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.lin(z))).sum(-1)


TRUNKS: dict[str, Callable[[], nn.Module]] = {
    "mlp-layernorm": lambda: nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8), nn.Tanh()
    ),
    "tied": Tied,
    "bare-parameters": Scaled,
    "conv-batchnorm": Conv,
    "tokens": Tokens,
}
INPUT = {"conv-batchnorm": (16, 98)}


class Net(nn.Module):
    def __init__(self, trunk: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = TRUNKS[trunk]()
        # heads of three kinds: a Linear, one Linear used twice in a row (differentiated
        # directly), a small MLP (its groups go through boundaries like the trunk's)
        self.heads = nn.ModuleList(
            [
                nn.Linear(8, 2),
                TiedHead(),
                nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)),
            ]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.body(x)
        return [(head(z) - i).pow(2).mean() for i, head in enumerate(self.heads)]


def data(trunk: str, seed: int = 1) -> Tensor:
    shape = INPUT.get(trunk, (16, 6))
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def per_task(net: Net, losses: list[Tensor]) -> tuple[Tensor, list[list[Tensor]]]:
    """J over the body and each task's head gradients, one autograd call per task."""
    body = list(net.body.parameters())
    rows, heads = [], []
    for i, loss in enumerate(losses):
        head = list(net.heads[i].parameters())
        grads = torch.autograd.grad(loss, body + head, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for p, g in zip(body, grads[: len(body)])
                ]
            )
        )
        heads.append(list(grads[len(body) :]))
    return torch.stack(rows), heads


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_gramian_update_and_heads_match_the_per_task_gradients(trunk: str) -> None:
    net = Net(trunk)
    losses = net(data(trunk))
    jac, heads = per_task(net, losses)
    body = list(net.body.parameters())
    own = [list(h.parameters()) for h in net.heads]
    grads = layerwise_gradients(losses, body, own)
    gram = jac.double() @ jac.double().T
    assert torch.allclose(grads.gram, gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
    for i, pairs in enumerate(grads.own):
        got = {id(p): g for p, g in pairs}
        for p, ref in zip(own[i], heads[i]):
            assert torch.allclose(got[id(p)], ref, atol=1e-6), f"task {i} head"
    w = torch.tensor([0.3, -1.2, 2.0])
    direction = dict((id(p), g) for p, g in grads.direction(w))
    ref = w @ jac
    got = torch.cat([direction[id(p)].reshape(-1) for p in body])
    assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()))


def test_parameters_used_in_a_chain_are_differentiated_directly() -> None:
    """The tied layer is the one group whose boundaries lie on each other's path: it alone
    is differentiated directly (a J over its parameters); the others go by layer."""
    net = Net("tied")
    losses = net(data("tied"))
    grads = layerwise_gradients(losses, list(net.body.parameters()), [[] for _ in range(K)])
    assert {id(p) for p in grads.direct} == {id(p) for p in net.body.mid.parameters()}
    assert sorted(len(g.params) for g in grads.groups) == [2]  # inp: weight and bias


class LargestOutput(TorchDispatchMode):
    """The largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("jacobian_free", [False, True])
def test_no_tensor_of_the_size_of_j_is_made(jacobian_free: bool) -> None:
    """Four equal layers: with J stored a K×P tensor exists; without, nothing larger than
    one layer's K gradients (K × P / 4 plus its bias)."""
    torch.manual_seed(0)
    body = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))
    heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(K))
    x = torch.randn(4, 32)
    z = body(x)
    losses = [h(z).pow(2).mean() for h in heads]
    p = sum(t.numel() for t in body.parameters())
    bal = tb.make("upgrad", K, jacobian_free=jacobian_free)
    with LargestOutput() as probe:
        bal.backward(losses, shared=body)
    if jacobian_free:
        assert probe.largest <= K * (32 * 32 + 32) < K * p
    else:
        assert probe.largest >= K * p


def gramian_methods() -> list[str]:
    names = []
    for name in tb.list_methods():
        cls = tb.get(name)
        refusal = getattr(cls, "jacobian_free_refusal", None)
        if refusal is None or "exact" not in cls.modes:
            continue  # not a GradientBalancer (CR-MOGM wraps one), or no exact mode
        if refusal() is None:
            names.append(name)
    return names


def train(
    method: str, trunk: str, steps: int = 3, **kw: object
) -> tuple[list[Tensor], list[Tensor]]:
    net = Net(trunk)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bal = tb.make(method, K, **kw)
    weights = []
    for step in range(steps):
        opt.zero_grad()
        bal.backward(net(data(trunk, seed=step)), shared=net.body)
        opt.step()
        weights.append(bal.last_weights.clone())
    return [p.detach().clone() for p in net.parameters()], weights


def assert_close(a: list[Tensor], b: list[Tensor], tol: float) -> None:
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=tol, rtol=tol), float((x - y).abs().max())


def test_methods_covered() -> None:
    """The Gramian methods with an exact mode all take jacobian_free (the list below)."""
    assert {"upgrad", "mgda", "nash_mtl", "pcgrad", "cagrad", "imtl", "aligned_mtl"} <= set(
        gramian_methods()
    )


#: SDMGrad's default inner steps (lr = 10 with momentum on the normalised Gramian) turn the
#: float rounding difference between the two modes' Gramians into weights 0.025 apart after
#: 3 steps (measured); with lr = 1 the two modes agree to 6e-8.
OPTIONS: dict[str, dict] = {"sdmgrad": {"lr": 1.0}}


@pytest.mark.parametrize("method", gramian_methods())
def test_training_matches_the_mode_that_stores_j(method: str) -> None:
    kw = OPTIONS.get(method, {})
    params, weights = train(method, "mlp-layernorm", **kw)
    free_params, free_weights = train(method, "mlp-layernorm", jacobian_free=True, **kw)
    assert_close(params, free_params, 1e-4)
    assert_close(weights, free_weights, 1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        {"accumulation_steps": 2},
        {"tasks_per_step": 2},
        {"task_specific": "weighted"},
        {"diagnostics": True},
    ],
    ids=["accumulation", "tasks_per_step", "weighted-heads", "diagnostics"],
)
def test_settings_match_the_mode_that_stores_j(kw: dict) -> None:
    params, weights = train("upgrad", "conv-batchnorm", steps=4, **kw)
    free_params, free_weights = train("upgrad", "conv-batchnorm", steps=4, jacobian_free=True, **kw)
    assert_close(params, free_params, 1e-4)
    assert_close(weights, free_weights, 1e-4)


def test_diagnostics_match() -> None:
    def run(free: bool) -> dict:
        net = Net("mlp-layernorm")
        bal = tb.make("mgda", K, diagnostics=True, jacobian_free=free)
        bal.backward(net(data("mlp-layernorm")), shared=net.body)
        return {name: bal.history.extra(name) for name in bal.history.extra_names}

    ref, got = run(False), run(True)
    assert set(ref) == set(got) and "conflict" in " ".join(ref)
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-5, equal_nan=True), key


def test_bf16_autocast_matches_the_mode_that_stores_j() -> None:
    def run(free: bool) -> list[Tensor]:
        net = Net("mlp-layernorm")
        bal = tb.make("upgrad", K, jacobian_free=free)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = net(data("mlp-layernorm"))
            bal.backward(losses, shared=net.body)
        return [p.grad.clone() for p in net.parameters()]

    assert_close(run(False), run(True), 2e-2)


def test_head_in_shared_is_warned_about_once() -> None:
    net = Net("mlp-layernorm")
    bal = tb.make("upgrad", K, jacobian_free=True)
    with pytest.warns(tb.TaskBalanceWarning, match="only one task's loss reaches"):
        bal.backward(net(data("mlp-layernorm")), shared=net)


def test_unused_shared_parameter_gets_a_zero_update() -> None:
    net = Net("mlp-layernorm")
    spare = nn.Linear(3, 3)
    bal = tb.make("upgrad", K, jacobian_free=True)
    bal.backward(net(data("mlp-layernorm")), shared=[*net.body.parameters(), *spare.parameters()])
    assert all(p.grad is not None and not p.grad.any() for p in spare.parameters())
    assert all(p.grad is not None and p.grad.any() for p in net.body.parameters())


@pytest.mark.parametrize("method", ["graddrop", "db_mtl", "modo", "pcd"])
def test_methods_that_need_more_than_the_gramian_refuse(method: str) -> None:
    with pytest.raises(BalancerUsageError, match="cannot run with jacobian_free=True"):
        tb.make(method, K, jacobian_free=True)


def test_an_older_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(BalancerUsageError, match=r"needs torch >= 2\.5.*torch 2\.4\.1"):
        tb.make("upgrad", K, jacobian_free=True)


def test_non_bool_is_refused() -> None:
    with pytest.raises(ValueError, match="jacobian_free must be True, False or 'auto'"):
        tb.make("upgrad", K, jacobian_free="yes")


def test_state_dict_keeps_the_setting() -> None:
    bal = tb.make("upgrad", K, jacobian_free=True)
    assert bal.hyperparameters()["jacobian_free"] is True
    assert "jacobian_free=True" in repr(bal)
    assert "jacobian_free" not in repr(tb.make("upgrad", K))


def test_features_mode_is_unchanged() -> None:
    """jacobian_free concerns the exact mode; features= runs as without it."""
    results = []
    for free in (False, True):
        net = Net("mlp-layernorm")
        bal = tb.make("mgda", K, jacobian_free=free)
        z = net.body(data("mlp-layernorm"))
        losses = [(h(z) - i).pow(2).mean() for i, h in enumerate(net.heads)]
        bal.backward(losses, features=z)
        results.append([copy.deepcopy(p.grad) for p in net.parameters()])
    assert_close(results[0], results[1], 0.0)


class Wide(nn.Module):
    """Wide Linear layers (with and without bias) on a small batch of sequences: a layer's
    share of G comes from its input and output gradients, not its weight gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(64, 64, bias=False)
        self.c = nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x.view(2, 3, 48)))  # (2, 3, 48): a 3-D input, rows B·L = 6
        return self.c(torch.relu(self.b(h))).mean(1)


def test_wide_linear_layers_match_without_their_weight_gradients() -> None:
    torch.manual_seed(0)
    body = Wide()
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))
    x = torch.randn(2, 144)
    z = body(x)
    losses = [h(z).pow(2).mean() + i for i, h in enumerate(heads)]
    params = list(body.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).double()
    with LargestOutput() as probe:
        grads = layerwise_gradients(losses, params, [list(h.parameters()) for h in heads])
    assert torch.allclose(grads.gram, jac @ jac.T, rtol=1e-5, atol=1e-9)
    assert probe.largest < K * 64 * 64  # no layer's K weight gradients were formed
    w = torch.tensor([1.0, 0.5, -2.0])
    got = torch.cat([g.reshape(-1) for _, g in grads.direction(w)])
    assert torch.allclose(got.double(), w.double() @ jac, atol=1e-6)


def test_a_non_finite_loss_skips_the_step_when_asked() -> None:
    net = Net("mlp-layernorm")
    bal = tb.make("upgrad", K, jacobian_free=True, nonfinite="skip_step")
    losses = net(data("mlp-layernorm"))
    losses[1] = losses[1] * float("nan")
    assert bal.backward(losses, shared=net.body) is None
    assert bal.last_step_skipped and bal.skipped_steps == 1
    assert all(p.grad is None for p in net.parameters())


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward returns an infinite gradient."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad * float("inf")


def test_a_non_finite_gradient_names_the_task_and_writes_nothing() -> None:
    net = Net("mlp-layernorm")
    bal = tb.make("mgda", K, jacobian_free=True)
    z = net.body(data("mlp-layernorm"))
    views = [z, z, InfiniteGradient.apply(z)]
    losses = [(h(v) - i).pow(2).mean() for i, (h, v) in enumerate(zip(net.heads, views))]
    with pytest.raises(tb.NonFiniteGradientError, match="gradient of task '2'"):
        bal.backward(losses, shared=net.body)
    assert all(p.grad is None for p in net.parameters())


def wide_mlp_step(
    jacobian_free: bool | str, method: str = "upgrad"
) -> tuple[tb.Balancer, list[Tensor], int]:
    """One step on an MLP whose layers have more parameters than outputs (batch 4)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(K))
    z = body(torch.randn(4, 32))
    bal = tb.make(method, K, jacobian_free=jacobian_free)
    with LargestOutput() as probe:
        bal.backward([h(z).pow(2).mean() for h in heads], shared=body)
    return bal, [p.grad for p in body.parameters()], probe.largest


def test_auto_runs_without_j_where_the_outputs_are_fewer_than_the_parameters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="taskbalance"):
        bal, grads, largest = wide_mlp_step("auto")
    assert bal.auto_jacobian_free is True
    assert "without J" in caplog.text and "per task" in caplog.text
    assert largest < K * 2 * (32 * 32 + 32)  # no J over the trunk was made
    _, stored, stored_largest = wide_mlp_step(False)
    assert stored_largest >= K * 2 * (32 * 32 + 32)
    assert_close(grads, stored, 1e-6)


def test_auto_stores_j_for_convolutions() -> None:
    net = Net("conv-batchnorm")
    bal = tb.make("upgrad", K, jacobian_free="auto")
    # shared= a generator: read by the choice and by the step (a list of it is kept)
    bal.backward(net(data("conv-batchnorm")), shared=net.body.parameters())
    assert bal.auto_jacobian_free is False  # 16 images of 7x7: outputs outnumber weights
    assert all(p.grad is not None for p in net.body.parameters())


def test_auto_stores_j_for_a_method_that_needs_it() -> None:
    bal, _, _ = wide_mlp_step("auto", method="graddrop")
    assert bal.auto_jacobian_free is False


def test_a_compiled_trunk_matches_the_mode_that_stores_j() -> None:
    """torch.compile (aot_eager): the compiled trunk is one node, one boundary for all its
    parameters; the result is still exact. Donated buffers off, as the exact mode needs
    (docs/compile.md): a graph cached by an earlier test may have been compiled with them."""
    import torch._dynamo
    import torch._functorch.config

    grads = []
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        for free in (False, True):
            net = Net("mlp-layernorm")
            body = torch.compile(net.body, backend="aot_eager")
            z = body(data("mlp-layernorm"))
            losses = [(h(z) - i).pow(2).mean() for i, h in enumerate(net.heads)]
            tb.make("upgrad", K, jacobian_free=free).backward(losses, shared=net.body)
            grads.append([p.grad for p in net.parameters()])
    torch._dynamo.reset()
    assert_close(grads[0], grads[1], 1e-6)


def test_parameter_hooks_are_refused_and_auto_stores_j() -> None:
    """A hook on a parameter's gradient (here a pruning mask) runs on each row of J when J
    is stored; without J it would run on batched gradients, or not at all for a Linear
    layer's product."""
    for mode in (True, "auto"):
        net = Net("mlp-layernorm")
        mask = torch.ones_like(net.body[0].weight).tril()
        net.body[0].weight.register_hook(lambda g, mask=mask: g * mask)
        bal = tb.make("upgrad", K, jacobian_free=mode)
        losses = net(data("mlp-layernorm"))
        if mode is True:
            with pytest.raises(BalancerUsageError, match=r"0\.weight has a gradient hook"):
                bal.backward(losses, shared=net.body)
        else:
            bal.backward(losses, shared=net.body)
            assert bal.auto_jacobian_free is False
            assert not net.body[0].weight.grad.triu(1).any()  # the mask held
