"""Gradient accumulation: ``accumulation_steps=N`` (semantics in ``docs/scaling.md``).

* Every call computes its micro-batch's weights from the state at the start of the
  accumulated step and adds 1/N of its gradient; the state advances once per accumulated
  step (loss-weighting methods: with the mean of the micro-batches' losses; gradient
  methods: as the last micro-batch's solve leaves it); learnable parameters take one step.
* Hence, for every method, the accumulated ``.grad`` is the mean of the per-micro-batch
  updates computed from the step's starting state — checked here for every registered
  method in every mode.
* For loss-weighting methods whose weights do not depend on the current losses (equal,
  static, DWA, RLW, uncertainty, IMTL-L) N micro-batches of B/N give exactly the update of
  one batch of B, over several steps, learnable parameters included. Gradient methods do
  not: a micro-batch's Gramian is not the batch's.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, batch, kpi_from, save_load
from taskbalance.errors import BalancerUsageError

K, STEPS = 3, 4


def chunks(step: int, n: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Batch ``step`` (8 samples) cut into ``n`` equal micro-batches."""
    x, targets = batch(step, K)
    xs = x.chunk(n)
    ys = [t.chunk(n) for t in targets]
    return [(xs[m], [y[m] for y in ys]) for m in range(n)]


def losses_of(model: TinyNet, x: torch.Tensor, targets: list[torch.Tensor]) -> tuple:
    z = torch.tanh(model.shared(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]
    return z, losses


def call(bal: tb.Balancer, model: TinyNet, mode: str, micro: tuple, divide: int = 1) -> None:
    """One balancer call on a micro-batch, in ``mode``; ``divide``: the naive user scaling."""
    z, losses = losses_of(model, *micro)
    ctx = {"kpi": kpi_from(losses)} if bal.uses_kpi else {}
    if mode == "loss":
        (bal(losses, **ctx) / divide).backward()
    elif mode == "exact":
        bal.backward(losses, shared=model.shared, **ctx)
    else:
        bal.backward(losses, shared=model.shared, features=z, **ctx)


def modes_of(method: str) -> tuple[str, ...]:
    cls = tb.get(method)
    if cls.kind == "loss":
        return ("loss",)
    return tuple(getattr(cls, "modes", ("exact", "features")))


def make(method: str, n: int, **kw: Any) -> tb.Balancer:
    if method == "static":
        kw.setdefault("weights", [0.5, 1.0, 2.0])
    return tb.make(method, K, accumulation_steps=n, **kw)


def train(
    method: str,
    n: int,
    *,
    accumulate: bool = True,
    end_every: int = 0,
    external: bool = False,
    **kw: Any,
) -> tuple[tb.Balancer, TinyNet]:
    """STEPS optimizer steps on batches of 8, each as ``n`` micro-batches.

    ``accumulate=False`` is the naive loop without the option: a balancer call per
    micro-batch, the user dividing each loss by n.
    """
    if external:
        kw["optimizer"] = "external"
    bal = make(method, n if accumulate else 1, **kw)
    model = TinyNet(K, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    if external:
        bal.attach(opt)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for micro in chunks(step, n):
            call(bal, model, "loss", micro, divide=1 if accumulate else n)
        opt.step()
        if end_every and (step + 1) % end_every == 0:
            bal.end_period()
    return bal, model


EXACT_LOSS_METHODS = [
    ("equal", {}),
    ("equal", {"reduction": "mean"}),
    ("static", {}),
    ("dwa", {"period": "step"}),
    ("dwa", {"period_every": 1}),
    ("rlw", {}),
    ("uncertainty", {}),
    ("uncertainty", {"variant": "positive"}),
    ("uncertainty", {"external": True}),
    ("imtl_l", {"lr": 0.05}),
]


def learnables(bal: tb.Balancer) -> list[torch.Tensor]:
    found = getattr(bal, "learnable", None)
    return [] if found is None else [p.detach().clone() for p in found.parameters()]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize(("method", "kw"), EXACT_LOSS_METHODS, ids=lambda v: str(v))
def test_micro_batches_give_the_update_of_one_big_batch(
    method: str, kw: dict[str, Any], n: int
) -> None:
    kw = dict(kw)
    every = kw.pop("period_every", 0)
    big_bal, big = train(method, 1, end_every=every, **kw)
    acc_bal, acc = train(method, n, end_every=every, **kw)
    for (name, a), b in zip(big.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(learnables(big_bal), learnables(acc_bal)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert acc_bal.steps == big_bal.steps == STEPS
    torch.testing.assert_close(acc_bal.history.weights, big_bal.history.weights, rtol=1e-5, atol=0)
    torch.testing.assert_close(acc_bal.history.losses, big_bal.history.losses, rtol=1e-5, atol=0)
    if method in ("dwa", "rlw", "uncertainty", "imtl_l"):  # the weights really moved
        assert not torch.allclose(big_bal.history.weights[0], big_bal.history.weights[-1])


@pytest.mark.parametrize(
    ("method", "kw"),
    [("uncertainty", {}), ("dwa", {"period": "step"}), ("rlw", {}), ("imtl_l", {"lr": 0.05})],
)
def test_without_the_option_micro_batches_advance_the_state_too_often(
    method: str, kw: dict[str, Any]
) -> None:
    big_bal, big = train(method, 1, **kw)
    naive_bal, naive = train(method, 2, accumulate=False, **kw)
    first = [*big.state_dict().values(), *learnables(big_bal)]
    second = [*naive.state_dict().values(), *learnables(naive_bal)]
    assert max(float((a - b).abs().max()) for a, b in zip(first, second)) > 1e-4
    assert naive_bal.steps == 2 * big_bal.steps


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def all_configs() -> list[tuple[str, str]]:
    return [(m, mode) for m in tb.list_methods() for mode in modes_of(m)]


#: methods whose own parameters take an autograd gradient (they move once, on the mean).
AUTOGRAD_LEARNABLES = {"uncertainty", "imtl_l", "gradnorm"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("method", "mode"), all_configs())
def test_accumulated_grad_is_the_mean_of_per_micro_batch_updates(method: str, mode: str) -> None:
    n = 3
    x, targets = batch(0, K)
    micro_batches = [(x[i : i + 2], [t[i : i + 2] for t in targets]) for i in range(0, 2 * n, 2)]
    bal = make(method, n)
    model = TinyNet(K, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for micro in chunks(1, n):  # a first accumulated step, so that the state is not trivial
        call(bal, model, mode, micro)
    opt.step()
    bal.end_period()
    start = save_load(bal.state_dict())
    start_model = copy.deepcopy(model)

    model.zero_grad(set_to_none=True)
    weights = []
    for micro in micro_batches:
        call(bal, model, mode, micro)
        weights.append(bal.last_weights.clone())
    accumulated = grads_of(model)

    expected: dict[str, torch.Tensor] = {}
    last = None
    for m, micro in enumerate(micro_batches):
        ref = make(method, 1)
        ref.load_state_dict(start)
        ref_model = copy.deepcopy(start_model)
        ref_model.zero_grad(set_to_none=True)
        call(ref, ref_model, mode, micro)
        torch.testing.assert_close(weights[m], ref.last_weights, rtol=1e-6, atol=1e-7)
        for name, g in grads_of(ref_model).items():
            expected[name] = expected.get(name, 0) + g / n
        last = ref
    assert accumulated.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(accumulated[name], expected[name], rtol=1e-5, atol=1e-7)

    assert bal.steps == 2 and bal.micro_step == 0
    losses = torch.stack([torch.stack(losses_of(start_model, *mb)[1]) for mb in micro_batches])
    torch.testing.assert_close(bal.history.losses[-1], losses.double().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(bal.history.weights[-1], torch.stack(weights).double().mean(0))
    if method in AUTOGRAD_LEARNABLES:
        return
    # the state advanced once: gradient methods as the last micro-batch leaves it,
    # loss-weighting methods as one step with the micro-batches' mean losses (and KPIs)
    if tb.get(method).kind == "loss":
        last = make(method, 1)
        last.load_state_dict(start)
        mean = [v for v in losses.mean(0)]
        kpis = torch.tensor([kpi_from(list(row)) for row in losses]).mean(0)
        last(mean, **({"kpi": kpis} if last.uses_kpi else {}))
    assert last is not None
    after, want = bal.state_dict()["state"], last.state_dict()["state"]
    assert_close_tree(after, want)


def assert_close_tree(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        if a.dtype in (torch.uint8, torch.int64, torch.bool):
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("mode", ["exact", "features"])
def test_gradient_methods_do_not_give_the_big_batch_update(mode: str) -> None:
    """What does not hold: a micro-batch's Gramian is not the batch's (documented)."""

    def grads(n: int) -> dict[str, torch.Tensor]:
        bal, model = make("mgda", n), TinyNet(K, seed=5)
        for micro in chunks(0, n):
            call(bal, model, mode, micro)
        return grads_of(model)

    big, acc = grads(1), grads(4)
    assert max(float((big[k] - acc[k]).abs().max()) for k in big) > 1e-4


def test_uncertainty_learnable_steps_once_per_accumulated_step() -> None:
    bal, model = make("uncertainty", 3), TinyNet(K)
    moves = []
    for micro in chunks(0, 3):
        before = bal.log_vars.detach().clone()
        call(bal, model, "loss", micro)
        moves.append(not torch.equal(before, bal.log_vars.detach()))
    assert moves == [False, False, True]
    assert bal.log_vars.grad is None


def test_micro_step_counts_the_open_step() -> None:
    bal, model = make("equal", 3), TinyNet(K)
    seen = []
    for step in range(2):
        for micro in chunks(step, 3):
            call(bal, model, "loss", micro)
            seen.append(bal.micro_step)
    assert seen == [1, 2, 0, 1, 2, 0]
    assert bal.steps == 2 and len(bal.history) == 2


@pytest.mark.parametrize("mode", ["loss", "features"])
def test_flush_closes_a_partial_step(mode: str) -> None:
    method = "uncertainty" if mode == "loss" else "pcgrad"
    bal, model = make(method, 4), TinyNet(K)
    micro_batches = chunks(0, 4)[:3]
    before = learnables(bal)
    for micro in micro_batches:
        call(bal, model, mode, micro)
    assert bal.steps == 0 and bal.micro_step == 3
    bal.flush()
    assert bal.steps == 1 and bal.micro_step == 0
    losses = torch.stack([torch.stack(losses_of(TinyNet(K), *mb)[1]) for mb in micro_batches])
    torch.testing.assert_close(bal.history.losses[0], losses.double().mean(0), rtol=1e-6, atol=0)
    for a, b in zip(before, learnables(bal)):
        assert not torch.equal(a, b)  # the held gradient of 3 micro-batches was stepped
    bal.flush()  # nothing open: a no-op
    assert bal.steps == 1


def test_skipped_micro_batches_count_towards_the_step() -> None:
    bal = make("uncertainty", 2, nonfinite="skip_step")
    model = TinyNet(K)
    x, targets = batch(0, K)
    bad = [torch.tensor(float("nan"), requires_grad=True)] * K
    bal(bad).backward()  # micro-batch 1 of 2: skipped, but counted
    assert bal.micro_step == 1 and bal.skipped_steps == 1
    _, losses = losses_of(model, x, targets)
    bal(losses).backward()  # closes the step with the one good micro-batch
    assert bal.steps == 1 and bal.micro_step == 0
    torch.testing.assert_close(
        bal.history.losses[0], torch.stack(losses).detach().double(), rtol=0, atol=0
    )


def test_a_skipped_last_micro_batch_still_steps_the_learnables() -> None:
    bal = make("uncertainty", 2, nonfinite="skip_step")
    model = TinyNet(K)
    before = bal.log_vars.detach().clone()
    call(bal, model, "loss", chunks(0, 2)[0])
    assert torch.equal(before, bal.log_vars.detach())
    bal([torch.tensor(float("inf"), requires_grad=True)] * K).backward()
    assert not torch.equal(before, bal.log_vars.detach())
    assert bal.log_vars.grad is None and bal.steps == 1


def test_all_micro_batches_skipped_leave_the_state_untouched() -> None:
    bal = make("dwa", 2, nonfinite="skip_step", period="step")
    start = save_load(bal.state_dict())
    for _ in range(2):
        bal([torch.tensor(float("nan"))] * K)
    assert bal.steps == 0 and bal.micro_step == 0 and bal.skipped_steps == 2
    assert_close_tree(bal.state_dict()["state"], start["state"])


def test_state_dict_inside_a_step_resumes_at_the_step_start() -> None:
    def run(bal: tb.Balancer, model: TinyNet, steps: range) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in steps:
            opt.zero_grad()
            for micro in chunks(step, 2):
                call(bal, model, "exact", micro)
            opt.step()

    straight, straight_model = make("gradvac", 2), TinyNet(K)
    run(straight, straight_model, range(3))

    bal, model = make("gradvac", 2), TinyNet(K)
    run(bal, model, range(1))
    start_model = copy.deepcopy(model.state_dict())
    call(bal, model, "exact", chunks(1, 2)[0])  # half of step 1, then the "crash"
    saved = save_load(bal.state_dict())
    assert saved["steps"] == 1
    resumed, resumed_model = make("gradvac", 2), TinyNet(K)
    resumed.load_state_dict(saved)
    resumed_model.load_state_dict(start_model)
    run(resumed, resumed_model, range(1, 3))
    assert_close_tree(resumed.state_dict()["state"], straight.state_dict()["state"])
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_end_period_and_famo_update_inside_a_step_are_refused() -> None:
    model = TinyNet(K)
    dwa = make("dwa", 2)
    call(dwa, model, "loss", chunks(0, 2)[0])
    with pytest.raises(BalancerUsageError, match="flush"):
        dwa.end_period()
    dwa.flush()
    dwa.end_period()
    famo = make("famo", 2)
    _, losses = losses_of(model, *chunks(0, 2)[0])
    famo(losses).backward()
    with pytest.raises(BalancerUsageError, match="inside an accumulated step"):
        famo.update([loss.detach() for loss in losses])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_accumulation_steps_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="accumulation_steps"):
        tb.make("equal", K, accumulation_steps=bad)


def test_one_accumulation_step_is_the_plain_path() -> None:
    a, b = TinyNet(K, seed=2), TinyNet(K, seed=2)
    plain, single = tb.make("upgrad", K), tb.make("upgrad", K, accumulation_steps=1)
    for bal, model in ((plain, a), (single, b)):
        call(bal, model, "features", chunks(0, 1)[0])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
