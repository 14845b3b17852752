"""GradNorm (Chen et al., ICML 2018): weights driven by gradient norms on the last shared layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn

import taskbalance as tb
from conftest import TinyNet, assert_same, batch, const, save_load, task_losses
from taskbalance import registry
from taskbalance.aggregation.gradnorm import GradNorm, gradnorm_weight_grad


def layer_norms(model: TinyNet, losses: list[torch.Tensor]) -> torch.Tensor:
    w = model.shared.weight
    return torch.stack([torch.autograd.grad(x, w, retain_graph=True)[0].norm() for x in losses])


def train(bal: GradNorm, model: TinyNet, opt: torch.optim.Optimizer, steps: range) -> list:
    out = []
    for step in steps:
        opt.zero_grad()
        used = bal.backward(task_losses(model, step), shared=model.shared.parameters())
        out += [used, bal.weights.clone()] + [p.grad.clone() for p in model.parameters()]
        opt.step()
    return out


# ---------------------------------------------------------------------- the weight gradient
def test_analytic_weight_gradient_matches_autograd_with_a_constant_target() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    heads = [nn.Linear(4, 1) for _ in range(3)]
    x = torch.randn(5, 3)
    z = torch.tanh(layer(x))
    losses = [(h(z) ** 2).mean() + 0.1 * i for i, h in enumerate(heads)]
    w = torch.tensor([0.7, 1.3, 1.0], requires_grad=True)
    ratios = torch.tensor([0.9, 0.5, 0.7])
    g = torch.stack(
        [
            torch.autograd.grad(w[i] * loss, layer.weight, create_graph=True)[0].norm()
            for i, loss in enumerate(losses)
        ]
    )
    r = ratios / ratios.mean()
    target = g.mean() * r**1.5
    constant = torch.autograd.grad((g - target.detach()).abs().sum(), w, retain_graph=True)[0]
    moving = torch.autograd.grad((g - target).abs().sum(), w)[0]
    norms = torch.stack([t.detach() / wi for t, wi in zip(g, w.detach())])
    ours, g_ours, target_ours = gradnorm_weight_grad(w.detach(), norms, ratios, 1.5)
    torch.testing.assert_close(ours, constant)
    torch.testing.assert_close(g_ours, g.detach())
    torch.testing.assert_close(target_ours, target.detach())
    # a target that moved with w would give a different gradient: the test can tell them apart
    assert not torch.allclose(ours, moving, rtol=1e-3)


def test_first_step_by_hand() -> None:
    # step 0: every ratio is 1, so target = mean G; the larger-gradient task is above it and
    # Adam's first step moves each weight by lr against the sign: (1 - lr, 1 + lr), sum 2.
    model = TinyNet(2)
    losses = task_losses(model, 0)
    norms = layer_norms(model, losses)
    bal = GradNorm(2, lr=0.025)
    used = bal.backward(losses, shared=model.shared.parameters())
    assert used.tolist() == [1.0, 1.0]
    big = int(norms.argmax())
    expected = torch.full((2,), 1.025)
    expected[big] = 0.975
    torch.testing.assert_close(bal.weights, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(bal.history.extra("grad_norm")[0], norms.double(), rtol=1e-5, atol=0)
    assert bal.history.extra("loss_ratio")[0].tolist() == [1.0, 1.0]


def test_larger_gradient_task_loses_weight() -> None:
    model = TinyNet(2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    bal = GradNorm(2, alpha=1.5, lr=0.025)
    trajectory = []
    for step in range(30):
        opt.zero_grad()
        small, large = task_losses(model, step)
        bal.backward([small, 100.0 * large], shared=model.shared.parameters())
        opt.step()
        trajectory.append(bal.weights.clone())
    assert trajectory[-1][1] < 0.5 * trajectory[-1][0]
    assert trajectory[-1][1] < trajectory[10][1] < trajectory[0][1]


# ------------------------------------------------------------ the rate-balancing term
def controlled_losses(layer: torch.Tensor, levels: list[float], norms: list[float]) -> list:
    """``L_i = level_i + n_i <U, W>`` with ``W = 0`` and ``||U|| = 1``: each loss has the value
    ``level_i`` and a gradient on W of norm exactly ``n_i``, chosen independently."""
    u = torch.ones_like(layer) / layer.numel() ** 0.5
    return [level + n * (u * layer).sum() for level, n in zip(levels, norms)]


def test_the_task_that_trains_slower_gains_weight() -> None:
    """Equal gradients on W, diverging loss histories: only r_i = L̃_i / mean L̃ tells the
    tasks apart, and the paper's target Ḡ r_i^α puts the slower task (larger L(t)/L(0))
    above Ḡ, so its weight rises; Σ w = K throughout. Inverting the ratio (L(0)/L(t)),
    resetting L(0) every step or dropping α (r^0 = 1: no force at all) fail here."""
    layer = torch.zeros(3, 4, requires_grad=True)
    bal = GradNorm(["slow", "fast"], alpha=1.5, lr=0.025)
    weights = []
    for step in range(8):
        levels = [2.0 * 0.98**step, 2.0 * 0.8**step]  # the second task trains faster
        bal.backward(controlled_losses(layer, levels, [1.0, 1.0]), last_shared=layer)
        weights.append(bal.weights.clone())
        assert float(bal.weights.sum()) == pytest.approx(2.0, rel=1e-6)
    # step 0: every ratio is 1 and the gradients are equal: nothing to correct
    assert weights[0].tolist() == [1.0, 1.0]
    slow = torch.stack(weights[1:])[:, 0]
    assert bool((slow.diff() > 0).all()), slow  # rises at every step
    assert weights[-1][0] > 1.05 and weights[-1][1] < 0.95
    ratios = bal.history.extra("loss_ratio")[-1]
    torch.testing.assert_close(ratios, torch.tensor([0.98**7, 0.8**7], dtype=torch.float64))


@pytest.mark.parametrize(("alpha", "slow_task_gains"), [(0.0, False), (0.12, False), (1.5, True)])
def test_alpha_sets_the_strength_of_the_rate_balancing(alpha: float, slow_task_gains: bool) -> None:
    """Task 0 has the larger gradient (G = 1.1 vs 0.9, Ḡ = 1) and trains slower (r = 1.2 vs
    0.8). Its target Ḡ r^α is 1.2^0.12 = 1.022 < 1.1 for α = 0.12 (the gradient term wins:
    it loses weight) and 1.2^1.5 = 1.31 > 1.1 for α = 1.5 (the rate term wins: it gains)."""
    layer = torch.zeros(2, 5, requires_grad=True)
    bal = GradNorm(2, alpha=alpha, lr=0.025)
    bal.backward(controlled_losses(layer, [2.0, 2.0], [1.0, 1.0]), last_shared=layer)
    assert bal.weights.tolist() == [1.0, 1.0]  # no force yet
    bal.backward(controlled_losses(layer, [1.5, 1.0], [1.1, 0.9]), last_shared=layer)
    torch.testing.assert_close(
        bal.history.extra("loss_ratio")[-1], torch.tensor([0.75, 0.5], dtype=torch.float64)
    )
    w = bal.weights
    assert float(w.sum()) == pytest.approx(2.0, rel=1e-6)
    if slow_task_gains:
        assert w[0] > 1.0 > w[1], w
    else:
        assert w[0] < 1.0 < w[1], w


def test_weights_sum_to_k_and_stay_positive() -> None:
    model = TinyNet(3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bal = GradNorm(3, lr=2.0)  # steps big enough to push weights below zero before the clamp
    smallest = []
    for step in range(15):
        opt.zero_grad()
        losses = task_losses(model, step)
        bal.backward([losses[0], 50.0 * losses[1], losses[2]], shared=model.shared.parameters())
        opt.step()
        w = bal.weights
        assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
        assert bool((w > 0).all())
        smallest.append(float(w.min()))
    assert min(smallest) < 1e-6  # the clamp was needed


def test_network_gets_the_weights_before_the_update() -> None:
    model = TinyNet(2)
    bal = GradNorm(2, lr=0.1)
    bal.backward(task_losses(model, 0), shared=model.shared.parameters())
    model.zero_grad()
    before = bal.weights.clone()
    losses = task_losses(model, 1)
    expected = torch.autograd.grad(
        (before * torch.stack(losses)).sum(), list(model.parameters()), retain_graph=True
    )
    used = bal.backward(losses, shared=model.shared.parameters())
    assert torch.equal(used, before) and not torch.equal(bal.weights, before)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_layer_choice_and_features_mode() -> None:
    model = TinyNet(2)
    x = torch.randn(8, 4)
    z = torch.tanh(model.shared(x))
    losses = [(h(z) ** 2).mean() for h in model.heads]
    expected = torch.stack([torch.autograd.grad(x, z, retain_graph=True)[0].norm() for x in losses])
    bal = GradNorm(2)
    bal.backward(losses, features=z)
    torch.testing.assert_close(bal.history.extra("grad_norm")[0], expected.double())
    assert model.shared.weight.grad is not None  # the body got the ordinary backward
    # default W: the last >= 2-dim tensor of shared; last_shared= overrides it
    net = TinyNet(2)
    norms = []
    for kw in (
        {"shared": net.shared.parameters()},
        {"last_shared": net.shared.weight},
        {"last_shared": net.shared},
    ):
        bal = GradNorm(2)
        bal.backward(task_losses(net, 0), **kw)
        norms.append(bal.history.extra("grad_norm")[0])
    torch.testing.assert_close(norms[0], layer_norms(net, task_losses(net, 0)).double())
    assert torch.equal(norms[0], norms[1])
    assert bool((norms[2] > norms[1]).all())  # weight and bias
    with pytest.raises(tb.BalancerUsageError, match="does not reach"):
        GradNorm(2).backward(task_losses(net, 0), shared=net.parameters())  # a head's weight
    with pytest.raises(tb.BalancerUsageError, match="2 dims"):
        GradNorm(2).backward(task_losses(net, 0), shared=[net.shared.bias])


def test_external_optimizer_and_renormalisation() -> None:
    model = TinyNet(2)
    bal = GradNorm(2, optimizer="external")
    with pytest.raises(tb.BalancerUsageError):
        bal.backward(task_losses(model, 0), shared=model.shared.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bal.attach(opt)
    losses = task_losses(model, 1)
    norms = layer_norms(model, losses)
    bal.backward(losses, shared=model.shared.parameters())
    sign = torch.sign(norms - norms.mean())
    torch.testing.assert_close(bal.parameters()[0].grad, sign * norms)
    opt.step()
    bal.backward(task_losses(model, 2), shared=model.shared.parameters())
    assert float(bal.weights.sum()) == pytest.approx(2.0, rel=1e-6)


def test_losses_must_be_positive() -> None:
    bal = GradNorm(["a", "b"])
    with pytest.raises(tb.NonPositiveLossError, match="'b'"):
        bal.backward(const(1.0, 0.0, requires_grad=True), shared=[torch.ones(2, 2)])


def test_state_round_trip_is_bit_exact() -> None:
    model = TinyNet(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal = GradNorm(3, alpha=0.12)
    train(bal, model, opt, range(3))
    saved = [save_load(x.state_dict()) for x in (bal, model, opt)]
    expected = train(bal, model, opt, range(3, 7))
    bal2, model2 = GradNorm(3, alpha=0.12), TinyNet(3, seed=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    for obj, state in zip((bal2, model2, opt2), saved):
        obj.load_state_dict(state)
    assert bal2.initial_losses is not None
    assert_same(expected, train(bal2, model2, opt2, range(3, 7)))
    assert_same(bal.state_dict(), bal2.state_dict())


def test_registered() -> None:
    assert registry.get("gradnorm") is GradNorm
    with pytest.raises(tb.BalancerUsageError):
        GradNorm(2)(const(1.0, 2.0))  # a gradient method: backward(...) only


def test_non_finite_loss_under_skip_step() -> None:
    model = TinyNet(2)
    bal = GradNorm(2, nonfinite="skip_step")
    a, b = task_losses(model, 0)
    assert bal.backward([a, b * float("inf")], shared=model.shared.parameters()) is None
    assert bal.skipped_steps == 1 and bal.initial_losses is None
    assert torch.equal(bal.weights, torch.ones(2)) and model.shared.weight.grad is None


def _inf_gradient_losses(model: TinyNet, step: int, task: int) -> list[torch.Tensor]:
    """Finite losses whose gradient on W (the shared weight) is +inf for task ``task``."""
    losses = task_losses(model, step)
    w = model.shared.weight[0, 0]
    losses[task] = losses[task] + torch.sqrt(w - w.detach())  # value + 0, gradient +inf
    return losses


def test_non_finite_gradient_raises_naming_the_task_and_changes_nothing() -> None:
    model = TinyNet(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = GradNorm(2, alpha=0.5, lr=0.1)
    train(bal, model, opt, range(2))  # the weights and their Adam state have moved
    before = save_load(bal.state_dict())  # a copy: Adam's state_dict holds live tensors
    opt.zero_grad(set_to_none=True)
    with pytest.raises(tb.NonFiniteGradientError, match="task '1'") as caught:
        bal.backward(_inf_gradient_losses(model, 2, 1), shared=model.shared.parameters())
    assert caught.value.task == "1" and isinstance(caught.value, tb.SolverError)
    assert_same(bal.state_dict(), before)
    assert all(p.grad is None for p in model.parameters())
    # the next good step trains as if the failed one had never happened
    reference = GradNorm(2, alpha=0.5, lr=0.1)
    reference.load_state_dict(before)
    used = bal.backward(task_losses(model, 3), shared=model.shared.parameters())
    model.zero_grad(set_to_none=True)
    expected = reference.backward(task_losses(model, 3), shared=model.shared.parameters())
    assert torch.equal(used, expected) and torch.equal(bal.weights, reference.weights)
    assert bool(torch.isfinite(bal.weights).all())


def test_non_finite_gradient_under_skip_step() -> None:
    model = TinyNet(2)
    bal = GradNorm(2, nonfinite="skip_step")
    bal.backward(task_losses(model, 0), shared=model.shared.parameters())
    before = bal.state_dict()
    model.zero_grad(set_to_none=True)
    assert bal.backward(_inf_gradient_losses(model, 1, 0), shared=model.shared) is None
    assert bal.skipped_steps == 1 and bal.last_step_skipped
    assert bal.last_skip_reason == "gradient" and bal.steps == 1
    assert_same(bal.state_dict()["state"], before["state"])
    assert all(p.grad is None for p in model.parameters())
    assert bal.backward(task_losses(model, 2), shared=model.shared) is not None
    assert bal.last_skip_reason is None and bool(torch.isfinite(bal.weights).all())


def test_non_finite_gradient_under_skip_step_with_accumulation() -> None:
    """A skipped micro-batch counts towards N and contributes nothing; the weights take one
    step with the other micro-batch's L_grad gradient."""
    model = TinyNet(2)
    bal = GradNorm(2, nonfinite="skip_step", accumulation_steps=2)
    solo = GradNorm(2)
    losses = task_losses(model, 0)
    assert bal.backward(losses, shared=model.shared) is not None
    assert bal.backward(_inf_gradient_losses(model, 1, 1), shared=model.shared) is None
    assert bal.micro_step == 0 and bal.steps == 1 and bal.skipped_steps == 1
    solo.backward(task_losses(model, 0), shared=model.shared)
    # one micro-batch of two contributed: half its L_grad gradient (Adam: the same step)
    torch.testing.assert_close(bal.weights, solo.weights, rtol=1e-6, atol=0)
    assert bool(torch.isfinite(bal.weights).all())


# ------------------------------------------------------------------ gradient accumulation
def half_losses(model: TinyNet, step: int, half: int) -> list[torch.Tensor]:
    """The losses of samples ``4 half .. 4 half + 3`` of :func:`batch` ``(step)``."""
    x, targets = batch(step, len(model.heads))
    rows = slice(4 * half, 4 * half + 4)
    return [((out - y[rows]) ** 2).mean() for out, y in zip(model(x[rows]), targets)]


def test_accumulating_copies_of_a_batch_is_one_step_on_the_batch() -> None:
    """The weights stay fixed during an accumulated step, each of its N micro-batches adds
    1/N of its L_grad gradient and the weights take one step at its end. N copies of one
    batch therefore add up to that batch's L_grad gradient: every accumulated step is a
    plain step on the batch (the weights used, the weights after their Adam step, the
    model's gradient), step after step. A held gradient carried into the next accumulated
    step would make the second one differ."""
    n = 3
    model, twin = TinyNet(2), TinyNet(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    bal = GradNorm(2, alpha=0.5, lr=0.1, accumulation_steps=n)
    plain = GradNorm(2, alpha=0.5, lr=0.1)
    for step in range(4):
        twin_opt.zero_grad()
        expected_used = plain.backward(task_losses(twin, step), shared=twin.shared)
        opt.zero_grad()
        for micro in range(n):
            before = bal.weights.clone()
            used = bal.backward(task_losses(model, step), shared=model.shared)
            assert torch.equal(used, before)
            if micro < n - 1:
                assert torch.equal(bal.weights, before)  # no step inside the accumulated one
        assert bal.steps == step + 1 and bal.micro_step == 0
        torch.testing.assert_close(used, expected_used, rtol=1e-6, atol=0)
        torch.testing.assert_close(bal.weights, plain.weights, rtol=1e-6, atol=0)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        opt.step()
        twin_opt.step()
    assert not torch.allclose(bal.weights, torch.ones(2), atol=0.1)  # they did move


def test_accumulated_weight_gradient_is_the_mean_over_the_micro_batches() -> None:
    """Two halves of each batch as N = 2 micro-batches, ``optimizer="external"`` so that the
    weights' gradient can be read: after each accumulated step it is the mean over the
    micro-batches of ``sign(G_i − Ḡ r_i^α) ||∇_W L_i||``, each with its own norms and loss
    ratios, L(0) being the first micro-batch's losses; the weights used are the same for
    both micro-batches (renormalised to sum K at the start of the step). The second step's
    gradient is its own micro-batches' only."""
    model = TinyNet(2)
    bal = GradNorm(2, alpha=1.5, optimizer="external", accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal.attach(opt, lr=0.5)
    initial = None
    for step in range(3):
        opt.zero_grad()
        w = bal.weights.clone()
        renormalised = (w * (2 / w.sum())).double()
        expected = torch.zeros(2, dtype=torch.float64)
        for half in (0, 1):
            losses = half_losses(model, step, half)
            norms = layer_norms(model, losses).double()
            values = torch.stack(losses).detach().double()
            initial = values if initial is None else initial
            used = bal.backward(losses, shared=model.shared)
            torch.testing.assert_close(used.double(), renormalised, rtol=1e-6, atol=0)
            g = renormalised * norms
            ratios = values / initial
            target = g.mean() * (ratios / ratios.mean()) ** 1.5
            expected += 0.5 * torch.sign(g - target) * norms
        torch.testing.assert_close(bal.parameters()[0].grad.double(), expected, rtol=1e-5, atol=0)
        opt.step()
    assert bal.steps == 3
    assert not torch.allclose(bal.weights, torch.ones(2), atol=0.05)


# ------------------------------------------------------------------ DDP
class ThreadedRanks:
    """R DDP ranks as R threads of this process, a stand-in for torch.distributed: every
    rank's ``all_reduce`` returns the sum, in rank order (the same bits on every rank), of
    what all ranks sent, times the scale."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=60)
        self._sent: list[list[torch.Tensor]] = [[] for _ in range(world_size)]

    def sync(self, rank: int) -> RankSync:
        return RankSync(self, rank)

    def exchange(self, rank: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._sent[rank] = [t.detach().clone() for t in tensors]
        self._barrier.wait()
        summed = [torch.stack(parts).sum(0) for parts in zip(*self._sent)]
        self._barrier.wait()  # every rank has read before the next collective writes
        return summed

    def run(self, fn: Callable[[int, RankSync], Any]) -> list[Any]:
        """``fn(rank, sync)`` on every rank at once; the ranks' results in rank order."""

        def guarded(rank: int) -> Any:
            try:
                return fn(rank, self.sync(rank))
            except BaseException:
                self._barrier.abort()  # release the other ranks instead of a deadlock
                raise

        with ThreadPoolExecutor(self.world_size) as pool:
            futures = [pool.submit(guarded, rank) for rank in range(self.world_size)]
            return [f.result() for f in futures]


class RankSync:
    """One rank's view of :class:`ThreadedRanks`, with the collectives a balancer uses."""

    def __init__(self, ranks: ThreadedRanks, rank: int) -> None:
        self.ranks, self.rank, self.world_size = ranks, rank, ranks.world_size

    def all_reduce(
        self, tensors: Sequence[torch.Tensor], scales: Sequence[float] | float = 1.0
    ) -> list[torch.Tensor]:
        summed = self.ranks.exchange(self.rank, tensors)
        factors = [float(scales)] * len(summed) if isinstance(scales, (int, float)) else scales
        return [t * f for t, f in zip(summed, factors)]

    def mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.all_reduce(tensors, 1.0 / self.world_size)

    def current(self) -> RankSync:
        """In place of ``Balancer.current_sync``: this rank's synchroniser."""
        return self


@pytest.mark.parametrize("features", [False, True], ids=["exact", "features"])
def test_two_ranks_with_half_a_batch_each_weigh_as_one_process_with_the_batch(
    monkeypatch: pytest.MonkeyPatch, features: bool
) -> None:
    """Under DDP the losses and the gradients on W are averaged over the ranks (features:
    the ranks' squared norms of dL_i/dZ summed and divided by R²), which makes the G_i and
    the loss ratios those of the global batch. Two ranks, each with half of every batch,
    must compute what one process computes on the whole batch: the same G_i, loss ratios
    and weights (bit-identical on both ranks), and, once DDP has averaged the model's
    gradients, the same model gradient, step after step."""

    def make() -> tuple[GradNorm, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(2)
        return GradNorm(2, alpha=1.5, lr=0.1), model, torch.optim.SGD(model.parameters(), lr=0.1)

    def run(
        bal: GradNorm, model: TinyNet, opt: torch.optim.Optimizer, rows: slice, sync: Any
    ) -> list[list[torch.Tensor]]:
        out = []
        for step in range(3):
            opt.zero_grad()
            x, targets = batch(step, 2)
            z = torch.tanh(model.shared(x[rows]))
            losses = [
                ((head(z).squeeze(-1) - y[rows]) ** 2).mean()
                for head, y in zip(model.heads, targets)
            ]
            used = bal.backward(
                losses, **({"features": z} if features else {"shared": model.shared})
            )
            params = list(model.parameters())
            if sync is not None:  # what DDP does to the model's gradients
                for p, g in zip(params, sync.mean([p.grad for p in params])):
                    p.grad = g
            extra = bal.history.extra
            out.append([used, bal.weights.clone(), extra("grad_norm")[-1]])
            out[-1] += [extra("loss_ratio")[-1]] + [p.grad.clone() for p in params]
            opt.step()
        return out

    expected = run(*make(), slice(0, 8), None)
    ranks = ThreadedRanks(2)
    setups = [make() for _ in range(2)]  # built here: the ranks' threads only train
    for rank, (bal, _, _) in enumerate(setups):
        monkeypatch.setattr(bal, "current_sync", ranks.sync(rank).current)
    results = ranks.run(lambda r, sync: run(*setups[r], slice(4 * r, 4 * r + 4), sync))
    assert_same(results[0][:3], results[1][:3])
    for got in results:
        for step_got, step_expected in zip(got, expected):
            for a, b in zip(step_got, step_expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected[-1][1], torch.ones(2), atol=0.05)
