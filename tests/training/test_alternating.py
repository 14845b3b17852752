"""Alternating training: one task per step, per-task data and optimizers."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch import nn

from taskbalance.training import dataset_size, task_schedule, train_alternating


class TwoHeads(nn.Module):
    def __init__(self, tasks=("fr", "de")) -> None:
        super().__init__()
        self.body = nn.Linear(2, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {t: head(h) for t, head in self.heads.items()}


def batches(n: int, value: float, batch: int = 4) -> list:
    """``n`` batches whose targets all equal ``value`` (to tell datasets apart)."""
    g = torch.Generator().manual_seed(int(value * 10) % 97)
    return [(torch.randn(batch, 2, generator=g), torch.full((batch, 1), value)) for _ in range(n)]


def test_round_robin_visits_tasks_in_order() -> None:
    tasks = ("a", "b", "c")
    data = {t: batches(2, v) for t, v in zip(tasks, (1.0, 2.0, 3.0))}
    model = TwoHeads(tasks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = train_alternating(
        model, data, nn.MSELoss(), opt, steps=10, schedule="round_robin", progress=False
    )
    assert res.order == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a"]
    assert res.step_counts == {"a": 4, "b": 3, "c": 3}
    assert {t: len(v) for t, v in res.losses.items()} == res.step_counts


def test_proportional_schedule_frequencies_match_sizes() -> None:
    sizes = {"a": 100, "b": 300, "c": 600}
    stream = task_schedule(tuple(sizes), "proportional", sizes=sizes, seed=3)
    counts = Counter(itertools.islice(stream, 50_000))
    for t, n in sizes.items():
        assert counts[t] / 50_000 == pytest.approx(n / 1000, abs=0.01)


def test_proportional_training_uses_dataset_sizes() -> None:
    data = {"fr": batches(10, 1.0), "de": batches(30, -1.0)}  # 40 vs 120 examples
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = train_alternating(
        model, data, nn.MSELoss(), opt, steps=2000, schedule="proportional", progress=False
    )
    assert res.step_counts["fr"] / 2000 == pytest.approx(0.25, abs=0.04)
    assert res.step_counts["de"] / 2000 == pytest.approx(0.75, abs=0.04)


def test_random_schedule_is_seeded_and_roughly_uniform() -> None:
    first = list(itertools.islice(task_schedule(("a", "b"), "random", seed=1), 4000))
    again = list(itertools.islice(task_schedule(("a", "b"), "random", seed=1), 4000))
    other = list(itertools.islice(task_schedule(("a", "b"), "random", seed=2), 4000))
    assert first == again
    assert first != other
    assert first.count("a") / 4000 == pytest.approx(0.5, abs=0.04)


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="schedule"):
        next(task_schedule(("a",), "sometimes"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        next(task_schedule(("a", "b"), "proportional", sizes={"a": 1}))


@pytest.mark.parametrize("shared_optimizer", [False, True])
def test_a_step_touches_only_its_head_and_the_shared_body(shared_optimizer: bool) -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    if shared_optimizer:
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
    else:
        opt = {
            t: torch.optim.Adam([*model.body.parameters(), *model.heads[t].parameters()], lr=0.1)
            for t in ("fr", "de")
        }
    data = {"fr": batches(3, 1.0), "de": batches(3, -1.0)}
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_alternating(
        model, data, nn.MSELoss(), opt, steps=1, schedule="round_robin", progress=False
    )
    assert res.order == ["fr"]
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), snapshot[name])
        assert moved == (not name.startswith("heads.de")), name
    if not shared_optimizer:
        assert len(opt["de"].state) == 0
        assert len(opt["fr"].state) == 4  # body weight and bias, fr head weight and bias


def test_each_task_reads_its_own_data_of_a_different_size() -> None:
    seen: dict[str, set[float]] = {"fr": set(), "de": set()}

    def make(task):
        def crit(out, target):
            seen[task].update(target.flatten().tolist())
            return ((out - target) ** 2).mean()

        return crit

    data = {"fr": batches(5, 1.0), "de": batches(2, -1.0)}
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = train_alternating(
        model,
        data,
        {t: make(t) for t in data},
        opt,
        steps=20,
        schedule="round_robin",
        progress=False,
    )
    assert seen == {"fr": {1.0}, "de": {-1.0}}
    assert res.step_counts == {"fr": 10, "de": 10}
    # 10 draws from 5 batches restart once; from 2 batches, four times
    assert res.epochs == {"fr": 1, "de": 4}


def test_per_task_forwards_and_default_steps() -> None:
    body = nn.Linear(2, 3)
    heads = {t: nn.Linear(3, 1) for t in ("fr", "de")}
    forwards = {t: nn.Sequential(body, heads[t]) for t in heads}
    params = [*body.parameters(), *heads["fr"].parameters(), *heads["de"].parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    data = {"fr": batches(3, 1.0), "de": batches(5, -1.0)}
    res = train_alternating(forwards, data, nn.MSELoss(), opt, seed=0, progress=True)
    assert sum(res.step_counts.values()) == 8
    assert len(res.order) == 8


def test_losses_fall_for_both_tasks() -> None:
    torch.manual_seed(1)
    model = TwoHeads()
    opt = {t: torch.optim.Adam(model.parameters(), lr=0.05) for t in ("fr", "de")}
    data = {"fr": batches(4, 1.0), "de": batches(7, -1.0)}
    res = train_alternating(model, data, nn.MSELoss(), opt, steps=300, progress=False)
    for t in ("fr", "de"):
        assert res.losses[t][-1] < 0.1 * res.losses[t][0]


def test_mismatched_keys_and_empty_data_raise() -> None:
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = {"fr": batches(2, 1.0), "de": batches(2, -1.0)}
    with pytest.raises(ValueError, match="loss_fns"):
        train_alternating(model, data, {"fr": nn.MSELoss()}, opt, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_alternating(
            model,
            {"fr": [], "de": data["de"]},
            nn.MSELoss(),
            opt,
            steps=3,
            schedule="round_robin",
            progress=False,
        )


def test_dataset_size_prefers_examples_over_batches() -> None:
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 2), torch.zeros(10, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert dataset_size(loader) == 10
    assert dataset_size([1, 2, 3]) == 3
