"""FAMO (Liu et al., NeurIPS 2023): log-loss weighting with logits driven by loss decrease."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import TinyNet, assert_same, const, save_load, task_losses
from taskbalance import registry
from taskbalance.weighting.famo import FAMO


def adam(grads: list[list[float]], lr: float) -> list[float]:
    """Torch-independent Adam (betas 0.9/0.999, eps 1e-8) from 0; the final parameters."""
    k = len(grads[0])
    m, v, x = [0.0] * k, [0.0] * k, [0.0] * k
    for t, g in enumerate(grads, start=1):
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v = [0.999 * a + 0.001 * b * b for a, b in zip(v, g)]
        x = [
            xi - lr * (mi / (1 - 0.9**t)) / (math.sqrt(vi / (1 - 0.999**t)) + 1e-8)
            for xi, mi, vi in zip(x, m, v)
        ]
    return x


def test_weights_and_loss_by_hand() -> None:
    famo = FAMO(["a", "b"])
    losses = const(2.0, 0.5, requires_grad=True)
    total = famo(losses)
    # z = (1/2, 1/2); c = 0.5/2 + 0.5/0.5 = 1.25; w = (0.25, 1) / 1.25
    assert famo.last_weights.tolist() == pytest.approx([0.2, 0.8], rel=1e-6)
    assert total.item() == pytest.approx(0.5 * (math.log(2.0) + math.log(0.5)) / 1.25, abs=1e-6)
    total.backward()
    assert [loss.grad.item() for loss in losses] == pytest.approx([0.2, 0.8], rel=1e-6)
    assert famo.logits.grad is None  # the model's backward never reaches the logits
    assert famo.history.extra("z")[0].tolist() == [0.5, 0.5]


def test_one_logit_update_by_hand() -> None:
    famo = FAMO(2, gamma=0.0)
    famo(const(2.0, 0.5))
    famo.update(const(1.0, 0.45))
    d = [math.log(2.0 / 1.0), math.log(0.5 / 0.45)]
    mean = 0.5 * (d[0] + d[1])
    grad = [0.5 * (d[0] - mean), 0.5 * (d[1] - mean)]  # softmax Jacobian at z = (1/2, 1/2)
    expected = adam([grad], lr=0.025)
    assert expected[0] == pytest.approx(-0.025, rel=1e-6)  # the improving task loses weight
    torch.testing.assert_close(famo.logits.detach(), torch.tensor(expected), rtol=1e-6, atol=0)
    z1 = 1 / (1 + math.exp(expected[1] - expected[0]))
    assert famo.z.tolist() == pytest.approx([z1, 1 - z1], rel=1e-6)


def test_two_updates_with_weight_decay_by_hand() -> None:
    gamma = 0.5
    famo = FAMO(2, gamma=gamma, lr=0.1)
    steps = [((2.0, 0.5), (1.0, 0.45)), ((1.2, 0.4), (1.1, 0.1))]
    grads, xi = [], [0.0, 0.0]
    for before, after in steps:
        famo(const(*before))
        famo.update(const(*after))
        e = [math.exp(x) for x in xi]
        z = [e[0] / sum(e), e[1] / sum(e)]
        d = [math.log(b / a) for b, a in zip(before, after)]
        zd = z[0] * d[0] + z[1] * d[1]
        grads.append([z[i] * (d[i] - zd) + gamma * xi[i] for i in range(2)])
        xi = adam(grads, lr=0.1)
    torch.testing.assert_close(famo.logits.detach(), torch.tensor(xi), rtol=1e-5, atol=1e-7)


def test_min_losses_allow_negative_losses() -> None:
    famo = FAMO(2, min_losses=[-21.0, -21.0], gamma=0.0)
    famo(const(-20.0, -11.0))
    # D = (1, 10): c = 0.5 + 0.05; w = (0.5, 0.05) / 0.55
    assert famo.last_weights.tolist() == pytest.approx([0.5 / 0.55, 0.05 / 0.55], rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6),
    st.floats(-3.0, 3.0),
)
def test_weights_are_a_distribution(values: list[float], spread: float) -> None:
    k = len(values)
    famo = FAMO(k)
    with torch.no_grad():
        famo.logits.copy_(torch.linspace(-spread, spread, k))
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    famo(losses).backward()
    w = famo.last_weights
    assert bool((w > 0).all()) and float(w.sum()) == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(losses.grad, w)
    assert float(famo.z.sum()) == pytest.approx(1.0, rel=1e-6)


def test_missing_update_uses_the_next_losses_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="taskbalance")
    exact, implicit = FAMO(3), FAMO(3)
    seq = [const(3.0, 2.0, 1.0), const(2.0, 1.9, 0.5), const(1.0, 1.8, 0.4), const(0.9, 1, 0.3)]
    for now, after in itertools.pairwise(seq):
        exact(now)
        exact.update(after)
    for now in seq:
        implicit(now)
    assert torch.equal(exact.logits.detach(), implicit.logits.detach())
    assert torch.equal(exact.history.weights, implicit.history.weights[:3])
    warnings = [r for r in caplog.records if "update(new_losses)" in r.getMessage()]
    assert len(warnings) == 1


def test_no_decay_without_loss_change() -> None:
    famo = FAMO(3, gamma=0.0)
    for _ in range(10):
        famo(const(1.0, 2.0, 3.0))
        famo.update(const(1.0, 2.0, 3.0))
    assert torch.equal(famo.logits.detach(), torch.zeros(3))


def test_non_positive_loss_names_the_task() -> None:
    famo = FAMO(["seg", "depth"])
    with pytest.raises(tb.NonPositiveLossError, match="depth"):
        famo(const(1.0, 0.0))
    famo(const(1.0, 1.0))
    with pytest.raises(tb.NonPositiveLossError, match="seg"):
        famo.update(const(-1.0, 1.0))


def test_update_without_a_step_is_an_error() -> None:
    famo = FAMO(2)
    with pytest.raises(tb.BalancerUsageError):
        famo.update(const(1.0, 1.0))


def test_backward_clips_the_shared_gradient() -> None:
    model = TinyNet(2)
    famo = FAMO(2, max_norm=1e-3)
    famo.backward(task_losses(model, 0), shared=model.shared.parameters())
    norm = torch.cat([p.grad.reshape(-1) for p in model.shared.parameters()]).norm()
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def test_backward_does_not_clip_by_default() -> None:
    """max_norm = 0 (the default) means no clipping: backward is famo(losses).backward()."""
    model, plain = TinyNet(2), TinyNet(2)
    FAMO(2).backward(task_losses(model, 0), shared=model.shared.parameters())
    FAMO(2)(task_losses(plain, 0)).backward()
    for p, q in zip(model.shared.parameters(), plain.shared.parameters(), strict=True):
        assert float(q.grad.norm()) > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def train(famo: FAMO, model: TinyNet, opt: torch.optim.Optimizer, steps: range) -> list:
    out = []
    for step in steps:
        opt.zero_grad()
        famo(task_losses(model, step)).backward()
        opt.step()
        with torch.no_grad():
            famo.update(task_losses(model, step))
        out += [famo.last_weights.clone(), famo.logits.detach().clone()]
    return out


@pytest.mark.parametrize("pending", [False, True])
def test_state_round_trip_is_bit_exact(pending: bool) -> None:
    model = TinyNet(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    famo = FAMO(3)
    train(famo, model, opt, range(4))
    if pending:  # saved between the model step and update()
        famo(task_losses(model, 4))
    saved = [save_load(x.state_dict()) for x in (famo, model, opt)]
    after = [famo(task_losses(model, 5))] if pending else []
    expected = train(famo, model, opt, range(5, 9))
    famo2, model2 = FAMO(3), TinyNet(3, seed=1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    for obj, state in zip((famo2, model2, opt2), saved):
        obj.load_state_dict(state)
    after2 = [famo2(task_losses(model2, 5))] if pending else []
    got = train(famo2, model2, opt2, range(5, 9))
    assert_same(after, after2)
    assert_same(expected, got)
    assert_same(famo.state_dict(), famo2.state_dict())


def test_registered() -> None:
    assert registry.get("famo") is FAMO


def test_non_finite_losses_under_skip_step() -> None:
    famo = FAMO(2, nonfinite="skip_step")
    famo(const(2.0, 1.0))
    famo.update(const(float("nan"), 1.0))  # the logit step is skipped, not poisoned
    assert famo.skipped_steps == 1 and torch.equal(famo.logits.detach(), torch.zeros(2))
    famo(const(2.0, 1.0))
    famo.update(const(1.0, 1.0))
    assert bool(torch.isfinite(famo.logits).all()) and famo.logits[0] < 0
