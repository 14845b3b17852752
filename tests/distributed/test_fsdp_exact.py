"""The exact mode (``shared=``) of the gradient methods on a body sharded by ``fully_shard``
(:mod:`taskbalance.sharded`): on two gloo ranks it trains like one process on the global
batch; on one rank, what it does not support is refused with the fix before any gradient is
written."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from conftest import plain_failure, torchrun_command

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).parent / "fsdp_exact_worker.py"
GRADIENT = {"mgda", "upgrad", "nash_mtl"}
JACOBIAN = {"graddrop", "db_mtl", "moco", "lr_annealing", "m_config"}
VARIANTS = {
    "upgrad body",
    "upgrad weighted",
    "upgrad sampled",
    "upgrad before",
    "mgda accumulated",
    "mgda diagnostics",
    "dwa diagnostics",
    "graddrop body",
    "graddrop columns",
    "db_mtl accumulated",
    "graddrop diagnostics",
}
DIAGNOSED = {"mgda diagnostics", "dwa diagnostics", "graddrop diagnostics"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Launch torchrun once (about 5 s); the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("fsdp_exact")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = torchrun_command(WORKER, str(out))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


# two torchrun launches at once would compete for the 2 cores: run with DDP's (loadgroup)
@pytest.mark.xdist_group("ddp_torchrun")
def test_two_ranks_train_like_one_process_on_the_global_batch(
    ranks: list[dict[str, Any]],
) -> None:
    """DWA, MGDA, UPGrad and Nash-MTL, the Jacobian methods (J all-gathered) and the
    variants after 4 SGD steps: the parameters of one process on the 8-sample batch to 1e-5,
    while one rank's 4 samples alone are more than 1e-3 away (the comparison can fail)."""
    for result in ranks:
        assert set(result["gaps"]) == {"dwa"} | GRADIENT | JACOBIAN | VARIANTS
        for config, (gap, control) in result["gaps"].items():
            assert gap <= 1e-5, (config, gap)
            assert control > 1e-3, (config, control)


@pytest.mark.xdist_group("ddp_torchrun")
def test_two_ranks_take_the_same_weights(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["weights"] for r in ranks)
    assert set(first) == set(second) == {"dwa"} | GRADIENT | JACOBIAN | VARIANTS
    for config, trace in first.items():
        assert trace.shape == (4, 3), config
        torch.testing.assert_close(trace, second[config], rtol=0, atol=0)
    assert bool((first["upgrad sampled"] == 0).sum(dim=1).eq(1).all())  # one task of 3 left out
    assert not torch.allclose(first["mgda"], first["upgrad"])  # methods, not equal weighting


@pytest.mark.xdist_group("ddp_torchrun")
def test_diagnostics_are_those_of_one_process(ranks: list[dict[str, Any]]) -> None:
    """MGDA's (the global Gramian of the step), DWA's (a loss method: the task Gramian
    computed for the diagnostics, heads inside fully_shard) and GradDrop's (from the
    gathered J and its own direction)."""
    for result in ranks:
        assert set(result["diagnostics"]) == DIAGNOSED
        for pair in result["diagnostics"].values():
            got, expected = pair["ranks"], pair["single"]
            assert got is not None and set(got) == set(expected)
            assert "diag/cos/0-1" in got
            for name, value in expected.items():
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.xdist_group("ddp_torchrun")
def test_two_ranks_refuse_what_is_not_supported(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        refusals = result["refusals"]
        assert refusals["modo"].startswith("MoDo has a step of its own")
        assert "Leave jacobian_free=False" in refusals["jacobian free"]
        assert "a head inside fully_shard" in refusals["root"]
        assert "fully_shard(model.body)" in refusals["root"]
        assert refusals["no sync"].startswith("gradient sync is off on the sharded body")
        assert refusals["local"].startswith("distributed='local' with a body sharded")
        assert "is sharded on a mesh of 2 dimensions (HSDP" in refusals["hsdp"]
        assert "sharded over 2 ranks but the balancer synchronises 1" in refusals["group"]
        assert "distributed=group" in refusals["group"]


# ---------------------------------------------------------------------- one rank
TASKS = ["cls", "depth", "seg"]
X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    """A trunk ``body`` and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.body(x)
        return {t: h(z).pow(2).mean() for t, h in zip(TASKS, self.heads)}


def sharded(layers: bool = True) -> Net:
    from torch.distributed.fsdp import fully_shard

    net = Net()
    if layers:
        fully_shard(net.body[0])
        fully_shard(net.body[2])
    fully_shard(net.body)
    return net


def no_gradient(net: Net) -> bool:
    return all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", ["mgda", "upgrad", "nash_mtl", "pcgrad"])
def test_one_rank_gives_the_gradients_of_the_unsharded_model(
    process_group: None, method: str
) -> None:
    """The sharded gradients (through FSDP's reduce-scatter) and the heads' equal those of
    the same model unsharded, with ``.grad`` already holding an earlier backward's."""
    net, plain = sharded(), Net()
    with plain_failure():
        for model in (net, plain):
            sum(model(X).values()).backward()  # gradients the balancer must add to
        weights = tb.make(method, TASKS).backward(net(X), shared=net.body)
        local = tb.make(method, TASKS, distributed="local")
        expected = local.backward(plain(X), shared=plain.body)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
        for p, q in zip(net.parameters(), plain.parameters()):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("graddrop", {}),
        ("db_mtl", {}),
        ("metabalance", {}),
        ("lr_annealing", {"variant": "code"}),
        ("excess_mtl", {}),
    ],
)
def test_one_rank_runs_a_jacobian_method_like_the_unsharded_model(
    process_group: None, method: str, options: dict[str, Any]
) -> None:
    """A method that needs J itself (per-tensor statistics for MetaBalance and LR
    annealing's code variant) over two steps: the weights and the gradients (added to an
    earlier backward's) of the same model unsharded."""
    net, plain = sharded(), Net()
    bal = tb.make(method, TASKS, **options)
    local = tb.make(method, TASKS, distributed="local", **options)
    with plain_failure():
        for _ in range(2):
            for model in (net, plain):
                for p in model.parameters():
                    p.grad = None
                sum(model(X).values()).backward()  # gradients the balancer must add to
            weights = bal.backward(net(X), shared=net.body)
            expected = local.backward(plain(X), shared=plain.body)
            torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
            for p, q in zip(net.parameters(), plain.parameters()):
                got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                torch.testing.assert_close(got, q.grad, rtol=1e-5, atol=1e-6)


def test_a_method_with_a_step_of_its_own_is_refused(process_group: None) -> None:
    net = sharded()
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match="MoDo has a step of its own"):
            tb.make("modo", TASKS).backward(net(X), shared=net.body)
        assert no_gradient(net)


def test_heads_inside_fully_shard_are_refused(process_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    net = Net()
    fully_shard(net.body)
    fully_shard(net)
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match="a head inside fully_shard") as caught:
            tb.make("upgrad", TASKS).backward(net(X), shared=net.body)
        assert "keep the 3 heads out of it" in str(caught.value)
        assert no_gradient(net)


def test_shared_mixing_sharded_and_plain_parameters_is_refused(process_group: None) -> None:
    net = sharded()
    shared = [*net.body.parameters(), *net.heads[0].parameters()]
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match="shared= mixes parameters sharded"):
            tb.make("upgrad", TASKS).backward(net(X), shared=shared)
        assert no_gradient(net)


def test_gradient_sync_turned_off_is_refused(process_group: None) -> None:
    net = sharded()
    net.body.set_requires_gradient_sync(False)
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match="give the balancer accumulation_steps"):
            tb.make("upgrad", TASKS).backward(net(X), shared=net.body)
        assert no_gradient(net)


def test_a_part_of_the_body_left_out_of_shared_is_refused(process_group: None) -> None:
    net = sharded()
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match="a part of the body left out of shared"):
            tb.make("upgrad", TASKS).backward(net(X), shared=net.body[2])
        assert no_gradient(net)


def test_a_shared_layer_one_task_reaches_is_warned_about_once(process_group: None) -> None:
    """A head passed in ``shared=`` along with the body (all sharded): warned, once."""
    from torch.distributed.fsdp import fully_shard

    net = Net()
    fully_shard(net.body)
    fully_shard(net.heads[0])
    shared = [*net.body.parameters(), *net.heads[0].parameters()]
    bal = tb.make("upgrad", TASKS)
    with plain_failure():
        with pytest.warns(tb.TaskBalanceWarning, match=r"only one task's loss reaches .*'cls'"):
            bal.backward(net(X), shared=shared)
        with warnings_as_errors():
            bal.backward(net(X), shared=[*net.body.parameters(), *net.heads[0].parameters()])


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", tb.TaskBalanceWarning)
        yield


def test_a_non_finite_loss_skips_and_keeps_the_gradients(process_group: None) -> None:
    """``nonfinite="skip_step"``: nothing added, the earlier backward's gradients kept."""
    net = sharded()
    with plain_failure():
        sum(net(X).values()).backward()
        before = [p.grad.full_tensor().clone() for p in net.body.parameters()]
        losses = net(X)
        losses["seg"] = losses["seg"] * float("nan")
        bal = tb.make("upgrad", TASKS, nonfinite="skip_step")
        assert bal.backward(losses, shared=net.body) is None
        assert bal.last_step_skipped
        for p, old in zip(net.body.parameters(), before):
            torch.testing.assert_close(p.grad.full_tensor(), old, rtol=0, atol=0)


def test_a_gradient_left_unreduced_by_fsdp_is_refused(process_group: None) -> None:
    """A backward with gradient sync off leaves an unsharded gradient that FSDP would fold
    into the first task's shard: refused, although sync is back on for the call."""
    net = sharded()
    net.body.set_requires_gradient_sync(False)
    with plain_failure():
        sum(net(X).values()).backward()
        net.body.set_requires_gradient_sync(True)
        with pytest.raises(tb.BalancerUsageError, match="has not reduce-scattered yet"):
            tb.make("upgrad", TASKS).backward(net(X), shared=net.body)


def test_jacobian_free_is_refused(process_group: None) -> None:
    net = sharded()
    with plain_failure():
        with pytest.raises(tb.BalancerUsageError, match=r"Leave jacobian_free=False"):
            tb.make("upgrad", TASKS, jacobian_free=True).backward(net(X), shared=net.body)
        assert no_gradient(net)


def test_a_loss_method_is_diagnosed_on_a_sharded_body(process_group: None) -> None:
    """DWA with ``diagnostics=1`` and ``shared=`` sharded (heads inside ``fully_shard``
    too): the diagnostics and the gradients (added to an earlier backward's) are those of
    the unsharded model."""
    from torch.distributed.fsdp import fully_shard

    net, plain = Net(), Net()
    fully_shard(net.body[0])
    fully_shard(net.body[2])
    fully_shard(net)
    bal = tb.make("dwa", TASKS, diagnostics=1)
    local = tb.make("dwa", TASKS, diagnostics=1, distributed="local")
    with plain_failure():
        for model in (net, plain):
            sum(model(X).values()).backward()
        bal.backward(net(X), shared=net.body)
        local.backward(plain(X), shared=plain.body)
        assert bal.last_diagnostics is not None and local.last_diagnostics is not None
        assert set(bal.last_diagnostics) == set(local.last_diagnostics)
        for name, value in local.last_diagnostics.items():
            torch.testing.assert_close(bal.last_diagnostics[name], value, rtol=1e-5, atol=1e-6)
        for p, q in zip(net.parameters(), plain.parameters()):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, q.grad, rtol=1e-5, atol=1e-6)
