"""Every balancer under DistributedDataParallel: same weights on every rank, same update as
one process on the global batch.

``torchrun --nproc_per_node=2`` (``python -m torch.distributed.run``, gloo backend, CPU) is
launched ONCE for all configurations: ``ddp_worker.py`` trains each of them on two ranks
(4 samples each) and saves the results; the tests below train the same configurations in
this process on the 8-sample global batch and compare:

* (a) the weights of every step agree across the ranks to 1e-6;
* (b) after 4 SGD steps the parameters equal the single-process run to 1e-5.

Both must hold for every registered method in every mode it has (loss, exact, features,
forked), for the variants with learnable parameters or randomness, and with gradient
accumulation (see ``docs/scaling.md`` for why they hold exactly). The control
configurations run with ``distributed="local"`` and must differ, which shows the comparison
is sensitive.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import ddp_worker as worker
import pytest
import torch

from conftest import torchrun_command

# one worker runs the module fixture once (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ddp_torchrun")

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(worker.__file__)
REQUIRED = {"equal", "dwa", "uncertainty", "mgda", "pcgrad", "upgrad", "nash_mtl"}
LAUNCH_TIMEOUT = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Launch torchrun once; the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = torchrun_command(WORKER, str(out))
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


CONFIGS = worker.configs()
IDS = [worker.key(c) for c in CONFIGS]


def test_every_required_method_and_mode_is_launched() -> None:
    launched = {(m, mode) for m, mode, _, _ in CONFIGS}
    assert {m for m, _ in launched} >= REQUIRED
    for method in worker.tb.list_methods():
        for mode in worker.modes_of(method):
            assert (method, mode) in launched
    assert {mode for _, mode in launched} == {"loss", "exact", "features", "forked"}
    assert any(acc > 1 for _, _, acc, _ in CONFIGS)


def params(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in result.items() if k.startswith("param/")}


def max_param_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_ranks_agree_and_match_one_process(
    config: worker.Config, ranks: list[dict[str, Any]]
) -> None:
    name = worker.key(config)
    first, second = ranks[0][name], ranks[1][name]
    single = worker.run(config, rank=0, world=1)
    steps = worker.STEPS * config[2]
    assert first["weights"].shape == second["weights"].shape == (steps, worker.K)
    assert torch.isfinite(first["weights"]).all()
    # (a) the same weights on every rank, at every step (micro-batch)
    torch.testing.assert_close(first["weights"], second["weights"], rtol=0, atol=1e-6)
    # ... which are the weights of the single process on the global batch
    torch.testing.assert_close(first["weights"], single["weights"], rtol=0, atol=1e-5)
    # (b) the same parameters as the single process (hence on every rank)
    assert max_param_gap(first, single) <= 1e-5, name
    assert max_param_gap(second, single) <= 1e-5, name
    assert int(first["steps"]) == int(single["steps"]) == worker.STEPS
    # (c) diagnostics=: every rank records those of the single process on the global batch
    diagnosed = [k for k in single if k.startswith("diag/")]
    assert bool(diagnosed) == bool(config[3].get("diagnostics")), name
    for k in diagnosed:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(first[k], single[k], rtol=1e-4, atol=1e-5, equal_nan=True)


CONTROLS = worker.controls()


@pytest.mark.parametrize("config", CONTROLS, ids=[worker.key(c) for c in CONTROLS])
def test_without_synchronisation_the_runs_differ(
    config: worker.Config, ranks: list[dict[str, Any]]
) -> None:
    name = worker.key(config)
    first, second = ranks[0][name], ranks[1][name]
    single = worker.run(config, rank=0, world=1)
    rank_gap = float((first["weights"] - second["weights"]).abs().max())
    assert rank_gap > 1e-4 or max_param_gap(first, single) > 1e-3, name
