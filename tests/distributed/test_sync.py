"""The ``distributed=`` setting and the :class:`~taskbalance.distributed.Sync` collectives,
in this process (a one-rank gloo group; the two-rank behaviour is ``test_ddp.py``'s)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import taskbalance as tb
from taskbalance.distributed import Sync, active_sync, check_setting

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


@pytest.fixture
def one_rank() -> Iterator[Sync]:
    """An initialised default group of one rank (destroyed afterwards)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Sync(None, 1, 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", ["on", "ddp", 1, None, True])
def test_distributed_setting_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match="distributed"):
        tb.make("equal", 2, distributed=bad)
    with pytest.raises(ValueError, match="distributed"):
        check_setting(bad)


def test_nothing_to_synchronise_without_a_process_group() -> None:
    assert not dist.is_initialized()
    for setting in ("auto", "off"):
        assert active_sync(setting) is None
        assert tb.make("pcgrad", 3, distributed=setting).current_sync() is None


def test_a_world_of_one_synchronises_too(one_rank: Sync) -> None:
    # trivially, but on the path that keeps the features mode out of DDP's hooks
    # (tests/distributed/test_ddp_world_one.py trains through it)
    for setting in ("auto", dist.group.WORLD):
        sync = active_sync(setting)
        assert sync is not None and sync.world_size == 1 and sync.rank == 0
    assert active_sync("off") is None
    bal = tb.make("upgrad", 2, distributed=dist.group.WORLD)
    assert bal.current_sync() is not None


def test_all_reduce_packs_by_dtype_and_scales(one_rank: Sync) -> None:
    a = torch.tensor([1.0, 2.0])
    b = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    c = torch.tensor([[3.0]])
    out = one_rank.all_reduce([a, b, c], [0.5, 2.0, 1.0])
    assert [t.dtype for t in out] == [torch.float32, torch.float64, torch.float32]
    assert [t.shape for t in out] == [a.shape, b.shape, c.shape]
    torch.testing.assert_close(out[0], a * 0.5)
    torch.testing.assert_close(out[1], b * 2.0)
    torch.testing.assert_close(out[2], c)
    assert out[0].data_ptr() != a.data_ptr()  # the inputs are untouched
    torch.testing.assert_close(one_rank.mean([a])[0], a)
    with pytest.raises(ValueError, match="scales"):
        one_rank.all_reduce([a, b], [1.0])


def test_all_gather_columns_and_generator_broadcast(one_rank: Sync) -> None:
    matrix = torch.randn(3, 5)
    full, offset = one_rank.all_gather_columns(matrix)
    torch.testing.assert_close(full, matrix)
    assert offset == 0
    gen = torch.Generator().manual_seed(4)
    gen.manual_seed(4)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(4))
    one_rank.broadcast_generator(gen)
    torch.testing.assert_close(torch.rand(3, generator=gen), expected)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.tanh(self.body(x))
        return z, [h(z).squeeze(-1) for h in self.heads]


def test_ddp_output_wrapper_is_seen_through_in_the_exact_mode(one_rank: Sync) -> None:
    """DDP(find_unused_parameters=True) links every output to every head; the engine follows
    each loss to its own head only, as without DDP."""
    torch.manual_seed(0)
    net = _Net()
    plain = copy.deepcopy(net)
    model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    x, y = torch.randn(6, 4), torch.randn(6)
    results = []
    for module, params in ((model, net), (plain, plain)):
        _, outs = module(x)
        tb.make("upgrad", 2).backward([((o - y) ** 2).mean() for o in outs], shared=params.body)
        results.append([p.grad.clone() for p in params.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    z, outs = model(x)
    with pytest.raises(tb.BalancerUsageError, match="find_unused_parameters"):
        tb.make("upgrad", 2).backward([o.mean() for o in outs], features=z)


def test_mean_in_place(one_rank: Sync) -> None:
    t = torch.arange(4.0)
    assert one_rank.mean_(t) is t
    torch.testing.assert_close(t, torch.arange(4.0))
