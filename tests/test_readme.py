"""The README's code blocks run as written, on a tiny model that supplies their names."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class TwoTaskNet(nn.Module):
    """Returns ``{"seg": logits, "depth": value}``, as the first README block expects."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {"seg": self.heads[0](z), "depth": self.heads[1](z).squeeze(-1)}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_usage_blocks() -> None:
    assert len(python_blocks()) >= 3


def test_readme_blocks_run_and_train() -> None:
    torch.manual_seed(0)
    model = TwoTaskNet()
    x = torch.randn(16, 4)
    namespace = {
        "epochs": 3,
        "model": model,
        "loader": [(x, torch.randint(0, 3, (16,)), torch.randn(16))] * 2,
        "ce": nn.functional.cross_entropy,
        "l1": nn.functional.l1_loss,
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
        "x": x,
        "ys": [torch.randn(16, 3), torch.randn(16, 1), torch.randn(16, 1)],
        "crit": nn.functional.mse_loss,
    }
    before = [p.detach().clone() for p in model.parameters()]
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    bal = namespace["bal"]
    assert bal.steps == 2  # the last block's UPGrad balancer: blocks 2 and 3
    assert namespace["tb"].make("dwa", 2).num_tasks == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
