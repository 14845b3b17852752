"""``torch.compile``: every registered method trains a model whose shared trunk is compiled.

What is compiled is the trunk (``torch.compile(model.body, fullgraph=True)``); the heads
run eagerly, so that each task's loss is an autograd path of its own from the trunk's
output (see ``docs/compile.md`` for why a graph that also holds the heads cannot be
balanced, and the tests at the end for the error that says so). Each test trains the same
model from the same start twice, eagerly and compiled, and checks that

* the parameters after :data:`STEPS` steps and the weights of every step agree (the
  ``aot_eager`` backend runs the same kernels as eager mode: to float rounding; inductor
  fuses and reorders them: to 1e-5);
* the compiled trunk was really used (its output comes from a compiled graph, and dynamo
  compiled it);
* nothing is compiled after the first step: no recompilation per step (and, with
  ``fullgraph=True``, no graph break).

Every (method, mode) runs with ``backend="aot_eager"`` (dynamo and AOTAutograd, the part
of ``torch.compile`` that the balancers' per-task backward passes go through); a few
representative methods run in every mode with the default inductor backend, skipped with
the reason when no C++ compiler is found. Calling conventions as the other suites: static
weighting gets its weights, DTP its KPIs, Auto-Lambda a ``meta_step`` before every step,
MoDo its three loss sets in the exact mode.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
from torch import Tensor, nn
from torch._dynamo.utils import counters

import taskbalance as tb
from taskbalance.errors import BalancerUsageError

K, IN, HIDDEN, BATCH, STEPS = 3, 5, 8, 6, 3

METHODS = tb.list_methods()


def modes_of(method: str) -> tuple[str, ...]:
    """``loss`` for a loss-weighting method; else its modes, plus ``fork`` with features."""
    cls = tb.get(method)
    if cls.kind == "loss":
        return ("loss",)
    modes = tuple(getattr(cls, "modes", None) or ("exact", "features"))  # GradNorm: None
    return (*modes, "fork") if "features" in modes else modes


CASES = [
    pytest.param(method, mode, id=f"{method}-{mode}")
    for method in METHODS
    for mode in modes_of(method)
]

#: inductor: one method of each kind of computation, in every mode it has.
INDUCTOR_CASES = [
    pytest.param(method, mode, id=f"{method}-{mode}")
    for method in ("equal", "auto_lambda", "mgda", "graddrop", "modo")
    for mode in modes_of(method)
]


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use, or ``None``."""
    names = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


needs_cxx = pytest.mark.skipif(
    cxx_compiler() is None,
    reason="inductor's CPU backend needs a C++ compiler (g++/clang++); none found on PATH",
)


class Net(nn.Module):
    """A two-layer tanh trunk and K linear heads; ``forward`` runs both (whole-model tests)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(K))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = torch.tanh(self.body(x))
        return z, [head(z).squeeze(-1) for head in self.heads]


def data(step: int, part: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + part)
    return torch.randn(BATCH, IN, generator=gen), torch.randn(BATCH, K, generator=gen)


def task_losses(
    body: Callable[[Tensor], Tensor], net: Net, x: Tensor, y: Tensor, fork: bool = False
) -> tuple[list[Tensor], Any]:
    """The K MSE losses through ``body`` (compiled or not) and the eager heads, and the
    features to pass (``tb.fork``'s views when ``fork``)."""
    z = torch.tanh(body(x))
    inputs = tb.fork(z, K) if fork else [z] * K
    losses = [
        ((h(v).squeeze(-1) - y[:, i]) ** 2).mean()
        for i, (h, v) in enumerate(zip(net.heads, inputs))
    ]
    return losses, (inputs if fork else z)


def make_balancer(method: str) -> tb.Balancer:
    kw: dict[str, Any] = {"weights": [1.0, 0.5, 2.0]} if method == "static" else {}
    return tb.make(method, K, **kw)


def train(method: str, mode: str, backend: str | None) -> dict[str, Any]:
    """:data:`STEPS` SGD steps from :class:`Net`'s start, the trunk compiled with ``backend``
    (``None``: eager). Returns the parameters, each step's weights, the graphs dynamo had
    compiled after each step and the type of the trunk output's autograd node."""
    torch._dynamo.reset()
    counters.clear()
    net = Net()
    body = net.body if backend is None else torch.compile(net.body, backend=backend, fullgraph=True)
    bal = make_balancer(method)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ctx = {"kpi": [0.4, 0.6, 0.8]} if method == "dtp" else {}
    weights, graphs = [], []
    node = ""
    for step in range(STEPS):
        x, y = data(step)
        if method == "auto_lambda":  # the look-ahead runs the trunk with and without grad
            xv, yv = data(step, part=9)
            bal.meta_step(
                net.parameters(),
                train_losses=lambda x=x, y=y: task_losses(body, net, x, y)[0],
                val_losses=lambda xv=xv, yv=yv: task_losses(body, net, xv, yv)[0],
                lr=0.05,
            )
        opt.zero_grad()
        losses, z = task_losses(body, net, x, y, fork=mode == "fork")
        trunk_out = z.source if mode == "fork" else z
        node = type(trunk_out.grad_fn.next_functions[0][0]).__name__
        if mode == "loss":
            bal(losses, **ctx).backward()
        elif method == "modo" and mode == "exact":  # λ from batches a and b, update from c
            sets = [task_losses(body, net, *data(step, part))[0] for part in (1, 2)]
            bal.backward([*sets, losses], shared=net.body)
        elif mode == "exact":
            bal.backward(losses, shared=net.body, **ctx)
        else:
            bal.backward(losses, features=z, **ctx)
        opt.step()
        weights.append(bal.last_weights.clone())
        graphs.append(counters["stats"]["unique_graphs"])
    params = [p.detach().clone() for p in net.parameters()]
    return {"params": params, "weights": weights, "graphs": graphs, "node": node}


def check_same_training(method: str, mode: str, backend: str, tol: float) -> None:
    eager = train(method, mode, None)
    compiled = train(method, mode, backend)
    assert compiled["node"] == "CompiledFunctionBackward", "the trunk ran eagerly"
    assert eager["node"] != "CompiledFunctionBackward"
    # one graph (Auto-Lambda: two, its look-ahead runs the trunk without grad as well), all
    # compiled during the first step: none is recompiled at a later step
    expected = 2 if method == "auto_lambda" else 1
    assert compiled["graphs"] == [expected] * STEPS, compiled["graphs"]
    for step, (a, b) in enumerate(zip(compiled["weights"], eager["weights"])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, s=step: f"step {s}: {m}")
    for a, b in zip(compiled["params"], eager["params"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    moved = any(not torch.equal(p, q) for p, q in zip(eager["params"], Net().parameters()))
    assert moved, "the eager run did not train"


@pytest.mark.parametrize(("method", "mode"), CASES)
def test_every_method_and_mode_trains_a_compiled_trunk_as_eagerly(method: str, mode: str) -> None:
    check_same_training(method, mode, "aot_eager", tol=1e-6)


@needs_cxx
@pytest.mark.parametrize(("method", "mode"), INDUCTOR_CASES)
def test_inductor_trains_as_eagerly(method: str, mode: str) -> None:
    # the exact mode retains the trunk's graph between the tasks' backward passes, which a
    # backward with donated buffers refuses (see the next test): turned off for that mode only
    with torch._functorch.config.patch(donated_buffer=mode != "exact"):
        check_same_training(method, mode, "inductor", tol=1e-5)


@needs_cxx
@pytest.mark.parametrize("jacobian_free", [False, True], ids=["j-stored", "j-free"])
def test_donated_buffers_in_exact_mode_are_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jacobian_free: bool
) -> None:
    """Inductor donates the buffers of a backward it compiles ahead of time (here: the one
    a plain backward left in AOTAutograd's cache) and that backward then refuses
    ``retain_graph=True``: in the exact mode with J stored and without it."""
    if jacobian_free:
        plain = make_balancer
        monkeypatch.setitem(
            globals(),
            "make_balancer",
            lambda m: tb.make(m, K, jacobian_free=True) if m == "mgda" else plain(m),
        )
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache, then a hit
    if torch.compiler.config.force_disable_caches:
        pytest.skip("torch's caches are disabled (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)")
    with (
        torch._functorch.config.patch(donated_buffer=True, enable_autograd_cache=True),
        torch._inductor.config.patch(fx_graph_cache=True),
    ):
        train("equal", "loss", "inductor")
        with pytest.raises(BalancerUsageError, match=r"donated_buffer = False.*features mode"):
            train("mgda", "exact", "inductor")


def test_every_method_is_covered() -> None:
    assert {p.values[0] for p in CASES} == set(tb.list_methods())
    covered = {(p.values[0], p.values[1]) for p in CASES}
    assert ("upgrad", "fork") in covered and ("mgda_ub", "exact") not in covered


def test_a_changed_model_fails_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: a compiled trunk that computes something else is caught."""
    original = torch.compile

    def wrong(module: nn.Module, **kw: Any) -> Callable[[Tensor], Tensor]:
        return original(lambda x: module(x) * 1.01, **kw)

    monkeypatch.setattr(torch, "compile", wrong)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_same_training("upgrad", "exact", "aot_eager", tol=1e-6)


# ---------------------------------------------------------------- the whole model compiled
def test_loss_methods_train_a_whole_compiled_model() -> None:
    """A loss-weighting method needs no per-task path: the whole model may be compiled."""
    results = []
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        net = Net()
        model = net if backend is None else torch.compile(net, backend=backend)
        bal = tb.make("uncertainty", K)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(STEPS):
            x, y = data(step)
            _, outs = model(x)
            opt.zero_grad()
            bal([((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]).backward()
            opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def whole_compiled_losses() -> tuple[Net, Tensor, list[Tensor]]:
    torch._dynamo.reset()
    net = Net()
    x, y = data(0)
    z, outs = torch.compile(net, backend="aot_eager")(x)
    return net, z, [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]


def test_a_whole_compiled_model_is_refused_with_the_fix_in_exact_mode() -> None:
    net, _, losses = whole_compiled_losses()
    with pytest.raises(BalancerUsageError, match=r"torch\.compile.*compile only the shared trunk"):
        tb.make("upgrad", K).backward(losses, shared=net.body)


def test_a_whole_compiled_model_is_refused_with_the_fix_in_features_mode() -> None:
    _, z, losses = whole_compiled_losses()
    with pytest.raises(BalancerUsageError, match=r"torch\.compile.*compile only the shared trunk"):
        tb.make("upgrad", K).backward(losses, features=z)


def test_heads_compiled_together_are_refused_with_the_fix_in_fork_mode() -> None:
    torch._dynamo.reset()
    net = Net()
    x, y = data(0)
    heads = copy.deepcopy(net.heads)

    def run_heads(views: list[Tensor]) -> list[Tensor]:
        return [head(v).squeeze(-1) for head, v in zip(heads, views)]

    zs = tb.fork(torch.tanh(net.body(x)), K)
    outs = torch.compile(run_heads, backend="aot_eager")(list(zs))
    losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
    with pytest.raises(BalancerUsageError, match=r"torch\.compile.*compile only the shared trunk"):
        tb.make("upgrad", K).backward(losses, features=zs)
