"""Known defects, pinned as strict xfail tests until they are fixed.

Each test states the behaviour the library should have; it fails today because of the
defect named in its docstring, and ``strict=True`` turns the day it starts passing into a
failure (XPASS), so a fix is seen: then delete the ``xfail`` mark (and the entry in the
list below), and the test guards the fix from then on.

Defects pinned here:

* exact mode writes a zero ``.grad`` into shared parameters that no task reaches
  (``loss.backward()`` leaves them ``None``; weight decay and momentum then move them);
* :func:`taskbalance.training.train_alternating` trains on with a NaN / inf loss.

Checked and not pinned: DDP in a world of one rank in representation mode (fixed in
``effe3a0``, guarded by ``tests/distributed/test_ddp_world_one.py``);
``benchmarks/speed.py --section exact`` crashing on its summary line (fixed).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.errors import NonFiniteLossError
from taskbalance.training import train_alternating


def exact_mode_methods() -> list[str]:
    """Every registered gradient method that has an exact (``shared=``) mode."""
    return [
        name
        for name in tb.list_methods()
        if tb.get(name).kind == "gradient" and "exact" in getattr(tb.get(name), "modes", ("exact",))
    ]


#: GradNorm's exact mode backpropagates the weighted losses itself: unreached stays None.
ENGINE_EXACT_METHODS = [m for m in exact_mode_methods() if m != "gradnorm"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="defect: exact mode fills a zero .grad for shared parameters no task reaches",
)
@pytest.mark.parametrize("method", ENGINE_EXACT_METHODS)
def test_exact_mode_leaves_unreached_shared_parameters_without_grad(method: str) -> None:
    """Defect: in exact mode (``bal.backward(losses, shared=...)``), a shared parameter that
    no task's loss reaches (a layer of ``shared=`` unused in this forward, e.g. a branch
    switched off) gets ``.grad = 0`` instead of ``None``. ``loss.backward()`` leaves such a
    parameter's ``.grad`` at ``None``, so ``torch.optim`` skips it; with a zero gradient,
    weight decay and momentum still move it.

    A fix must leave ``.grad`` of a shared parameter that no task reaches untouched (``None``
    after ``zero_grad()``), as ``loss.backward()`` does, so that an optimizer step with
    weight decay leaves the parameter where it was.
    """
    torch.manual_seed(0)
    # the unused layer first: GradNorm's W (the last >= 2-dim tensor of shared=) is reached
    shared = nn.ModuleDict({"unused": nn.Linear(3, 3), "body": nn.Linear(4, 3)})
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in shared["unused"].parameters()]
    x = torch.randn(5, 4)
    z = torch.tanh(shared["body"](x))
    losses = [(head(z).squeeze(-1) - i).pow(2).mean() for i, head in enumerate(heads)]
    opt.zero_grad()
    tb.make(method, 2).backward(losses, shared=shared)
    assert all(p.grad is not None for p in shared["body"].parameters())
    assert [p.grad for p in shared["unused"].parameters()] == [None, None]
    opt.step()
    for p, old in zip(shared["unused"].parameters(), before):
        assert torch.equal(p.detach(), old)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(2, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in ("fr", "de")})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {t: head(h) for t, head in self.heads.items()}


@pytest.mark.xfail(
    strict=True,
    raises=pytest.fail.Exception,  # "DID NOT RAISE"
    reason="defect: train_alternating does not check for NaN/inf",
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_train_alternating_refuses_a_nonfinite_loss(bad: float) -> None:
    """Defect: :func:`~taskbalance.training.train_alternating` backpropagates and steps on a
    NaN or infinite loss without a word: the parameters become NaN and the run goes on,
    while every balancer (and :func:`~taskbalance.training.train_joint` through it) raises
    :class:`~taskbalance.errors.NonFiniteLossError` naming the task by default.

    A fix must raise ``NonFiniteLossError`` naming the task (``err.task == "de"``) at the
    step of the bad loss, before its backward and optimizer step, so that the parameters
    are those after the last good step.
    """
    gen = torch.Generator().manual_seed(0)
    data = {
        t: [(torch.randn(4, 2, generator=gen), torch.randn(4, 1, generator=gen))]
        for t in ("fr", "de")
    }
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"de": 0}
    snapshot: list[torch.Tensor] = []

    def criterion_de(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["de"] += 1
        if calls["de"] == 2:  # the second "de" step (step 3 of the round robin)
            snapshot.extend(p.detach().clone() for p in model.parameters())
            return nn.functional.mse_loss(output, target) * bad
        return nn.functional.mse_loss(output, target)

    loss_fns = {"fr": nn.MSELoss(), "de": criterion_de}
    with pytest.raises(NonFiniteLossError, match=r"loss of task 'de' is not finite") as info:
        train_alternating(
            model, data, loss_fns, opt, steps=6, schedule="round_robin", progress=False
        )
    assert info.value.task == "de"
    for p, old in zip(model.parameters(), snapshot, strict=True):
        assert torch.equal(p.detach(), old)
