"""``BalancerMixin`` under Lightning's DDP: 2 CPU ranks (gloo), compared with one process.

``torchrun --nproc_per_node=2`` runs ``lightning_ddp_worker.py`` once (every case, the
resume and the refusals), and ``strategy="ddp_fork"`` is launched once, at the same time
(one module fixture). The tests compare with a plain PyTorch loop in this process on
the whole global batches (the ranks' halves put together):

* every case's weights agree across the ranks (1e-6) and equal the single process's
  (1e-5), the parameters too (1e-5): DWA (loss method, epoch periods), UPGrad in exact
  mode, MGDA in representation mode;
* what is logged (``loss/<task>``, ``weight/<task>``, ``weighted_loss``) and what
  ``balanced_step`` returns are the global values the balancer used, the same on both
  ranks: the losses of the single process on the global batch;
* DWA resumed from a checkpoint that rank 0 wrote after 2 epochs ends where one
  uninterrupted single-process run ends;
* ``distributed="off"`` under the 2-rank group is refused (under Lightning and in a plain
  loop) and ``distributed="local"`` trains each rank on its own: the ranks then differ,
  which shows the comparisons above can fail;
* after ``strategy="ddp_fork"`` the launching process's balancer holds what rank 0's
  held at the end of its fit (Lightning hands back the module's ``state_dict()`` only).
  ``ddp_spawn`` takes the same path (the same launcher) but re-imports Lightning in every
  rank (12 to 19 s here, against 4 s); what it adds, pickling the module, is checked without
  processes. ``python lightning_ddp_worker.py ddp_spawn OUT`` runs it by hand.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import torchrun_command

pytest.importorskip("lightning")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
    pytest.skip("strategy='ddp_fork' needs the fork start method", allow_module_level=True)

import lightning_ddp_worker as worker  # noqa: E402 - needs Lightning

from taskbalance.integrations.lightning import HANDBACK_KEY  # noqa: E402

# one xdist worker launches the processes (pytest-xdist --dist loadgroup)
pytestmark = [
    pytest.mark.xdist_group("lightning_ddp"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]

WORKER = Path(worker.__file__)
LAUNCH_TIMEOUT = 300
STEPS = worker.EPOCHS * worker.BATCHES


def _start(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(process: subprocess.Popen[str], what: str) -> None:
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what} timed out after {LAUNCH_TIMEOUT} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{what} failed ({process.returncode}):\n{output[-6000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both launches, side by side: the two ranks' results and the ddp_fork results."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    ddp = _start(torchrun_command(WORKER, "ddp", str(out)))
    spawn = _start([sys.executable, str(WORKER), "ddp_fork", str(out)])
    _wait(ddp, "torchrun (strategy='ddp')")
    _wait(spawn, "strategy='ddp_fork'")
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    return {
        "ranks": [load(f"rank{r}.pt") for r in range(worker.WORLD)],
        "spawn": load("spawn.pt"),
        "spawn-rank0": load("spawn-rank0.pt"),
    }


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max())


SYNCED = [name for name, (_, _, options) in worker.CASES.items() if "distributed" not in options]


@pytest.mark.parametrize("name", SYNCED)
def test_ranks_agree_and_match_one_process(name: str, launched: dict[str, Any]) -> None:
    first, second = (rank[name] for rank in launched["ranks"])
    single = worker.plain_run(name)
    for result in (first, second):
        assert result["weights"].shape == (STEPS, len(worker.TASKS))
        assert int(result["global_step"]) == STEPS
    assert max_gap(first["weights"], second["weights"]) <= 1e-6
    assert max_gap(first["weights"], single["weights"]) <= 1e-5
    assert max_gap(first["params"], second["params"]) <= 1e-6
    assert max_gap(first["params"], single["params"]) <= 1e-5
    assert not torch.equal(single["params"], worker.Net().flat())  # it trained
    if name == "dwa":  # the periods were closed on every rank: weights leave 1 in epoch 3
        assert torch.equal(first["weights"][: 2 * worker.BATCHES], torch.ones(8, 3).double())
        assert max_gap(first["weights"][2 * worker.BATCHES :], torch.ones(4, 3)) > 1e-3


@pytest.mark.parametrize("name", SYNCED)
def test_logged_and_returned_values_are_the_global_ones(
    name: str, launched: dict[str, Any]
) -> None:
    """Rank 0's dashboard shows the losses the logged weights were computed from."""
    single = worker.plain_run(name)
    for result in (rank[name] for rank in launched["ranks"]):
        for i, task in enumerate(worker.TASKS):
            logged_loss = result[f"logged/loss/{task}"]
            logged_weight = result[f"logged/weight/{task}"]
            assert logged_loss.shape == logged_weight.shape == (STEPS,)
            assert max_gap(logged_loss, single["losses"][:, i]) <= 1e-5
            assert max_gap(logged_weight, single["weights"][:, i]) <= 1e-5
        weighted = (single["weights"] * single["losses"]).sum(1)
        assert max_gap(result["logged/weighted_loss"], weighted) <= 1e-5
        assert max_gap(result["returned"], weighted) <= 1e-5


def test_resume_from_a_rank_zero_checkpoint_continues_exactly(launched: dict[str, Any]) -> None:
    single = worker.plain_run("dwa")
    first, second = (rank["dwa-resumed"] for rank in launched["ranks"])
    assert max_gap(first["weights"], second["weights"]) <= 1e-6
    assert first["weights"].shape == (STEPS, len(worker.TASKS))  # the history came back
    assert max_gap(first["weights"], single["weights"]) <= 1e-5
    assert max_gap(first["params"], single["params"]) <= 1e-5
    assert max_gap(second["params"], single["params"]) <= 1e-5


def test_distributed_off_is_refused_under_a_two_rank_group(launched: dict[str, Any]) -> None:
    for result in launched["ranks"]:
        for message in (result["plain"]["off_loss"], result["plain"]["off_grad"]):
            assert "distributed='off'" in message and "distributed='local'" in message
        assert "distributed='local'" in result["lightning_off"]


def test_distributed_local_lets_the_ranks_diverge(launched: dict[str, Any]) -> None:
    first, second = (rank["mgda-exact-local"] for rank in launched["ranks"])
    assert max_gap(first["params"], second["params"]) > 1e-3
    assert max_gap(first["weights"], second["weights"]) > 1e-4
    plain = [rank["plain"]["local_weights"] for rank in launched["ranks"]]
    assert max_gap(plain[0], plain[1]) > 1e-4  # each rank's own losses, no collective


def test_ddp_fork_hands_the_balancer_back_to_the_launching_process(
    launched: dict[str, Any],
) -> None:
    main, rank0 = launched["spawn"], launched["spawn-rank0"]
    assert int(rank0["steps"]) == STEPS
    assert int(main["steps"]) == STEPS
    assert torch.equal(main["weights"], rank0["weights"])
    assert torch.equal(main["params"], rank0["params"])


def test_the_hand_back_survives_pickling_and_leaves_other_state_dicts_alone() -> None:
    """What ``ddp_spawn`` adds to ``ddp_fork``: the module is pickled into every rank."""
    trained = worker.MultiTask("dwa")
    x, y = worker.dataset().tensors
    for step in range(3):
        losses, _ = trained.net.losses(x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8])
        trained.balancer(losses)
    assert HANDBACK_KEY not in trained.state_dict()  # checkpoints and users see no extra key
    worker_copy = pickle.loads(pickle.dumps(trained))  # as ddp_spawn sends it to a rank
    worker_copy._tb_hand_back = True  # what on_fit_end sets in a spawned rank
    handed = worker_copy.state_dict()
    assert handed[HANDBACK_KEY]["balancer"]["steps"] == 3

    launching = worker.MultiTask("dwa")
    launching.load_state_dict(handed)  # strict: the extra key is taken out first
    assert launching.balancer.steps == 3
    assert torch.equal(launching.balancer.history.weights, trained.balancer.history.weights)
    assert HANDBACK_KEY in handed  # the caller's dict is left as it was
    assert HANDBACK_KEY not in launching.state_dict()
