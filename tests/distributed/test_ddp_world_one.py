"""A DistributedDataParallel model in a world of one rank (``torchrun --nproc_per_node=1``).

The balancer takes the synchronised path there too, so that the representation mode keeps
out of DDP's gradient hooks: an ordinary backward through a DDP-wrapped body used to leave
DDP's reduction unfinished, and the next forward failed ("Expected to have finished
reduction in the prior iteration"). Every mode must train, and equal the same steps
without DDP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import taskbalance as tb

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.xdist_group("process_group_world_one")


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
        pytest.skip("torch.distributed with gloo is not available")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])

    def forward(self, x: torch.Tensor, forked: bool = False):
        z = self.body(x)
        views = tb.fork(z, 2) if forked else [z, z]
        return (views if forked else z), [h(v) for h, v in zip(self.heads, views)]


def train(method: str, mode: str, ddp: bool) -> list[torch.Tensor]:
    net = Net()
    model = nn.parallel.DistributedDataParallel(net) if ddp else net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = tb.make(method, 2, distributed="auto" if ddp else "off")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randn(8, 2, generator=gen)
        z, outs = model(x, forked=mode == "forked")
        losses = [(o.squeeze(-1) - y[:, i]).pow(2).mean() for i, o in enumerate(outs)]
        opt.zero_grad()
        if mode == "loss":
            bal(losses).backward()
        elif mode == "exact":
            bal.backward(losses, shared=net.body)
        else:
            bal.backward(losses, features=z)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ("mgda", "features"),
        ("mgda", "forked"),
        ("upgrad", "features"),
        ("pcgrad", "exact"),
        ("dwa", "loss"),
        ("uncertainty", "loss"),
    ],
)
def test_a_world_of_one_trains_like_one_process(world_of_one, method: str, mode: str) -> None:
    with_ddp = train(method, mode, ddp=True)
    without = train(method, mode, ddp=False)
    for a, b in zip(with_ddp, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
