"""M-ConFIG (Liu, Chen, Thuerey, ICLR 2025): ConFIG on per-task momenta, one loss per step."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from _gradcheck import check_resume
from test_sdmgrad import Counted, counted_losses

from conftest import TinyNet, batch
from taskbalance import registry
from taskbalance.aggregation.config import ConFIG
from taskbalance.aggregation.m_config import MConFIG
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError


def linear_step(bal: MConFIG, theta: torch.Tensor, rows: list[list[float]]) -> torch.Tensor:
    """One call with L_i = a_i·θ (gradient a_i); returns θ's gradient (the update)."""
    theta.grad = None
    losses = [torch.dot(torch.tensor(a, dtype=theta.dtype), theta) for a in rows]
    bal.backward(losses, shared=theta)
    return theta.grad.clone()


def test_hand_computed_momenta_and_direction() -> None:
    # K = 2, one task per step (0, 1, 0), β1 = 0.9, gradients along the axes:
    # step 0, task 0, g = (2, 0): m0 = (0.2, 0); task 1 unseen: no update.
    # step 1, task 1, g = (0, 4): m1 = (0, 0.4); m̂ = (2, 0), (0, 4), orthogonal, so ConFIG
    # gives d = (||m̂0|| + ||m̂1||)/2 (1, 1) = (3, 3).
    # step 2, task 0, g = (6, 0): m0 = 0.9 (0.2, 0) + 0.1 (6, 0) = (0.78, 0), t0 = 2,
    # m̂0 = (0.78 / 0.19, 0); d = (0.78/0.19 + 4)/2 (1, 1).
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    bal = MConFIG(2, adaptive=False)
    a = [[2.0, 0.0], [0.0, 4.0]]
    torch.testing.assert_close(linear_step(bal, theta, a), torch.zeros(2, dtype=torch.float64))
    assert bal.counts == [1, 0] and bal.last_weights.tolist() == [0.0, 0.0]
    torch.testing.assert_close(
        linear_step(bal, theta, a), torch.full((2,), 3.0, dtype=torch.float64)
    )
    b = [[6.0, 0.0], [0.0, 4.0]]
    expected = (0.78 / 0.19 + 4.0) / 2
    torch.testing.assert_close(
        linear_step(bal, theta, b), torch.full((2,), expected, dtype=torch.float64)
    )
    torch.testing.assert_close(bal.m, torch.tensor([[0.78, 0.0], [0.0, 0.4]], dtype=torch.float64))
    assert bal.counts == [2, 1] and bal.t == 2


def test_hand_computed_adaptive_scaling() -> None:
    # the same steps with the second moment (β2 = 0.999, eps = 1e-8):
    # step 1: g_c = (3, 3), f1 = 0.1 g_c = 0.3, p = f1 / 0.1 = 3, s = 0.001·9, ŝ = 9: d = 3/(3+eps)
    # step 2: g_c = c (1, 1), c = (0.78/0.19 + 4)/2, f2 = 0.19 c, p = (f2 − 0.9·0.3)/0.1,
    # s = 0.999·0.009 + 0.001 p², ŝ = s / (1 − 0.999²): d = c / (sqrt(ŝ) + eps)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    bal = MConFIG(2)
    linear_step(bal, theta, [[2.0, 0.0], [0.0, 4.0]])
    d1 = linear_step(bal, theta, [[2.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(d1, torch.full((2,), 3.0 / (3.0 + 1e-8), dtype=torch.float64))
    d2 = linear_step(bal, theta, [[6.0, 0.0], [0.0, 4.0]])
    c = (0.78 / 0.19 + 4.0) / 2
    p = (0.19 * c - 0.9 * 0.3) / 0.1
    s_hat = (0.999 * 0.009 + 0.001 * p * p) / (1 - 0.999**2)
    torch.testing.assert_close(
        d2, torch.full((2,), c / (math.sqrt(s_hat) + 1e-8), dtype=torch.float64)
    )


def test_momenta_match_a_hand_loop() -> None:
    k, beta = 3, 0.8
    model = TinyNet(k, seed=3)
    bal = MConFIG(k, beta1=beta, adaptive=False)
    body = list(model.shared.parameters())
    m = [torch.zeros(15) for _ in range(k)]
    counts = [0] * k
    for step in range(7):
        x, ys = batch(step, k)
        losses = [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]
        task = step % k  # cycling, one task per step
        g = torch.cat(
            [q.reshape(-1) for q in torch.autograd.grad(losses[task], body, retain_graph=True)]
        )
        m[task] = beta * m[task] + (1 - beta) * g
        counts[task] += 1
        model.zero_grad()
        bal.backward(losses, shared=model.shared)
        torch.testing.assert_close(bal.m, torch.stack(m))
        assert bal.counts == counts
        for i, head in enumerate(model.heads):
            assert (head.weight.grad is not None) == (i == task)
        if step >= k - 1:  # every task seen: d = ConFIG of the bias-corrected momenta
            hats = torch.stack([m[i] / (1 - beta ** counts[i]) for i in range(k)])
            units = hats / hats.norm(dim=1, keepdim=True)
            x_dir = torch.linalg.pinv(units.double()) @ torch.ones(k, dtype=torch.float64)
            unit = (x_dir / x_dir.norm()).float()
            d = (hats @ unit).sum() * unit
            got = torch.cat([q.grad.reshape(-1) for q in body])
            torch.testing.assert_close(got, d, rtol=1e-4, atol=1e-6)
        else:
            assert all(q.grad is None or not q.grad.any() for q in body)


def test_beta_zero_and_every_task_is_config() -> None:
    model, model2 = TinyNet(3, seed=1), TinyNet(3, seed=1)
    results = []
    for bal, net in (
        (MConFIG(3, beta1=0.0, per_step=3, adaptive=False), model),
        (ConFIG(3), model2),
    ):
        for step in range(3):
            net.zero_grad()
            x, ys = batch(step)
            losses = [((out - y) ** 2).mean() for out, y in zip(net(x), ys)]
            w = bal.backward(losses, shared=net.shared)
        results.append(([p.grad.clone() for p in net.parameters()], w))
    (mine, mine_w), (theirs, theirs_w) = results
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mine_w, theirs_w)


def test_unsampled_losses_are_never_back_propagated() -> None:
    k = 4
    model = TinyNet(k, seed=2)
    bal = MConFIG(k, per_step=2)
    for step in range(4):
        expected = {(2 * step) % k, (2 * step + 1) % k}
        Counted.calls, Counted.forbidden = Counter(), set(range(k)) - expected
        model.zero_grad(set_to_none=True)
        bal.backward(counted_losses(model, step), shared=model.shared)
        assert set(Counted.calls) == expected
    Counted.forbidden = set()


def test_features_mode_is_refused_and_shapes_checked() -> None:
    model = TinyNet(2)
    x, ys = batch(0, 2)
    z = torch.tanh(model.shared(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    with pytest.raises(BalancerUsageError, match="exact"):
        MConFIG(2).backward(losses, shared=model.shared, features=z)
    bal = MConFIG(2)
    bal.current_subset = [0]
    bal.aggregate(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(BalancerUsageError, match="shape"):
        bal.aggregate(torch.ones(2, 4), torch.ones(2))


def test_state_round_trip() -> None:
    def fresh():
        model = TinyNet(3, seed=4)
        return MConFIG(3), model, torch.optim.SGD(model.parameters(), lr=0.01)

    saved = check_resume(fresh, split=4, total=8)
    assert saved["bal"]["state"]["m"].shape == (3, 15) and saved["bal"]["state"]["t"] == 2


def test_registered_and_validated() -> None:
    assert registry.get("m_config") is MConFIG and registry.get("mconfig") is MConFIG
    bal = registry.make("m_config", 2)
    assert (bal.per_step, bal.beta1, bal.beta2, bal.adaptive, bal.modes) == (
        1,
        0.9,
        0.999,
        True,
        ("exact",),
    )
    for kw, match in [
        ({"per_step": 0}, "per_step"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": -1.0}, "eps"),
        ({"pref_vector": [1.0, -1.0]}, "positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            MConFIG(2, **kw)


def test_preferences_below_one_tilt_the_direction() -> None:
    # β1 = 0: m̂_i = g_i = e_i; ConFIG gives the unit u with cosines ∝ pref = (0.5, 1),
    # u = (0.5, 1)/sqrt(1.25), scaled by Σ g_i·u = 1.5/sqrt(1.25): d = 1.2 (0.5, 1) = (0.6, 1.2)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    bal = MConFIG(2, per_step=2, beta1=0.0, adaptive=False, pref_vector=[0.5, 1.0])
    d = linear_step(bal, theta, [[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(d, torch.tensor([0.6, 1.2], dtype=torch.float64))


def test_non_finite_gradient_raises_naming_the_task_and_keeps_the_momenta() -> None:
    bal = MConFIG(["a", "b", "c"], per_step=3, adaptive=False)
    bal.aggregate(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    m, counts = bal.m.clone(), list(bal.counts)
    bad = torch.eye(3, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="'b'") as err:
        bal.aggregate(bad, torch.ones(3, dtype=torch.float64))
    assert err.value.task == "b"
    assert torch.equal(bal.m, m) and bal.counts == counts
