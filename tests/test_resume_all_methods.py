"""Resume is bit-exact for EVERY registered method, through ``torch.load(weights_only=True)``.

N steps, then the model's, the optimizer's and the balancer's ``state_dict()`` go through
``torch.save``/``torch.load(weights_only=True)`` into fresh objects, then M more steps: the
weights of every step, the model and the optimizer state must equal an uninterrupted N+M
run bit for bit (CPU, deterministic).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import taskbalance as tb
from conftest import TinyNet, assert_same, balancer_step, batch, kpi_from, save_load

K, FIRST, TOTAL = 3, 4, 7
#: methods also run with ``tasks_per_step=2`` (2 of the 3 tasks per step), as "name/2"
SAMPLED = ["upgrad/2", "pcgrad/2", "cagrad/2", "fairgrad/2", "nash_mtl/2"]


def fresh(method: str) -> tuple[tb.Balancer, TinyNet, torch.optim.Optimizer]:
    kw: dict[str, Any] = {"weights": [0.5, 1.0, 2.0]} if method == "static" else {}
    if "/" in method:
        method, per_step = method.split("/")
        kw["tasks_per_step"] = int(per_step)
    model = TinyNet(K, seed=1)
    return tb.make(method, K, **kw), model, torch.optim.Adam(model.parameters(), lr=0.01)


def run(
    method: str, bal: tb.Balancer, model: TinyNet, opt: torch.optim.Optimizer, start: int, stop: int
) -> list[torch.Tensor]:
    weights = []
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        x, targets = batch(step, K)
        z = torch.tanh(model.shared(x))
        losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, targets)]
        ctx = {"kpi": kpi_from(losses)} if method == "dtp" else {}
        balancer_step(bal, losses, model.shared, z, **ctx)
        weights.append(bal.last_weights.clone())
        opt.step()
        bal.end_period()
    return weights


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", tb.list_methods() + SAMPLED)
def test_resume_is_bit_exact(method: str) -> None:
    bal, model, opt = fresh(method)
    straight = run(method, bal, model, opt, 0, TOTAL)

    bal1, model1, opt1 = fresh(method)
    first = run(method, bal1, model1, opt1, 0, FIRST)
    saved = save_load(
        {"bal": bal1.state_dict(), "model": model1.state_dict(), "opt": opt1.state_dict()}
    )
    bal2, model2, opt2 = fresh(method)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    bal2.load_state_dict(saved["bal"])
    resumed = first + run(method, bal2, model2, opt2, FIRST, TOTAL)

    for step, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert torch.equal(a, b), f"{method}: weights differ at step {step}: {a} vs {b}"
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(bal.state_dict()["state"], bal2.state_dict()["state"])


@pytest.mark.parametrize("method", tb.list_methods())
def test_state_dict_holds_only_tensors_and_plain_values(method: str) -> None:
    bal, model, opt = fresh(method)
    run(method, bal, model, opt, 0, 2)

    def check(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, (str, int)), f"{path}: key {key!r}"
                check(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check(item, f"{path}[{i}]")
        else:
            allowed = (torch.Tensor, int, float, str, bool, type(None))
            assert isinstance(value, allowed), f"{path} is a {type(value).__name__}"

    check(bal.state_dict(), method)
