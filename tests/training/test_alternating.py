"""Alternating training: one task per step, per-task data and optimizers."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from taskbalance.errors import NotScalarLossError, TaskBalanceWarning, TaskMismatchError
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


# ------------------------------------------------------------------------------ misuse


def setup() -> tuple[TwoHeads, torch.optim.Optimizer, dict[str, list]]:
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, {"fr": batches(2, 1.0), "de": batches(3, -1.0)}


def test_one_loader_instead_of_a_dict_says_to_key_it_by_task() -> None:
    model, opt, data = setup()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4
    )
    with pytest.raises(
        TypeError,
        match=r"data must be \{task: batches\}.*got a DataLoader.*"
        r"data=\{'fr': loader_fr, 'de': loader_de\}",
    ):
        train_alternating(model, loader, nn.MSELoss(), opt, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a list of 2 entries"):
        train_alternating(model, [data["fr"], data["de"]], nn.MSELoss(), opt, progress=False)  # type: ignore[arg-type]


def test_a_task_missing_from_the_model_outputs_is_named() -> None:
    model, opt, data = setup()
    data = {"french": data["fr"], "de": data["de"]}
    with pytest.raises(
        TaskMismatchError,
        match=r"task 'french'.*outputs are keyed \['de', 'fr'\]"
        r".*no 'french'",
    ):
        train_alternating(model, data, nn.MSELoss(), opt, schedule="round_robin", progress=False)


def test_targets_keyed_by_other_tasks_are_refused() -> None:
    model, opt, _ = setup()
    both = [(x, {"fr": y, "es": -y}) for x, y in batches(2, 1.0)]
    with pytest.raises(TaskMismatchError, match=r"task 'de'.*targets are keyed \['es', 'fr'\]"):
        train_alternating(
            model,
            {"fr": both, "de": both},
            nn.MSELoss(),
            opt,
            schedule="round_robin",
            progress=False,
        )


def test_one_output_for_every_task_warns_once() -> None:
    body = nn.Linear(2, 1)
    opt = torch.optim.SGD(body.parameters(), lr=0.01)
    data = {"fr": batches(2, 1.0), "de": batches(2, -1.0)}
    with pytest.warns(
        TaskBalanceWarning,
        match=r"one Tensor.*every task's criterion gets the "
        r"same output.*model=\{task: forward\}",
    ) as caught:
        train_alternating(body, data, nn.MSELoss(), opt, steps=6, progress=False)
    assert len([w for w in caught if issubclass(w.category, TaskBalanceWarning)]) == 1


def test_shared_output_on_purpose_is_silent() -> None:
    body = nn.Linear(2, 1)
    opt = torch.optim.SGD(body.parameters(), lr=0.01)
    data = {"fr": batches(2, 1.0), "de": batches(2, -1.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = train_alternating(
            dict.fromkeys(data, body), data, nn.MSELoss(), opt, steps=4, progress=False
        )
    assert sum(res.step_counts.values()) == 4


def test_a_module_dict_of_forwards_is_one_forward_per_task() -> None:
    body = nn.Linear(2, 3)
    forwards = nn.ModuleDict({t: nn.Sequential(body, nn.Linear(3, 1)) for t in ("fr", "de")})
    opt = torch.optim.SGD(forwards.parameters(), lr=0.01)
    data = {"fr": batches(2, 1.0), "de": batches(2, -1.0)}
    res = train_alternating(forwards, data, nn.MSELoss(), opt, steps=4, progress=False)
    assert sum(res.step_counts.values()) == 4


def test_an_optimizer_dict_missing_a_task_says_what_to_give() -> None:
    model, _, data = setup()
    opts = {"fr": torch.optim.SGD(model.parameters(), lr=0.01)}
    with pytest.raises(
        TaskMismatchError,
        match=r"optimizer has no entry for task 'de'.*one "
        r"optimizer per task.*or a single optimizer",
    ):
        train_alternating(model, data, nn.MSELoss(), opts, progress=False)


def test_a_dict_with_an_extra_task_is_named() -> None:
    model, opt, data = setup()
    crits = {"fr": nn.MSELoss(), "de": nn.MSELoss(), "en": nn.MSELoss()}
    with pytest.raises(
        TaskMismatchError,
        match=r"loss_fns has an entry for 'en', which data "
        r"does not name",
    ):
        train_alternating(model, data, crits, opt, progress=False)


def test_empty_data_is_refused_before_training() -> None:
    model, opt, _ = setup()
    with pytest.raises(ValueError, match=r"the data of task 'fr' is empty.*drop_last"):
        train_alternating(model, {"fr": [], "de": []}, nn.MSELoss(), opt, progress=False)


def test_a_drop_last_loader_smaller_than_a_batch_is_empty() -> None:
    model, opt, data = setup()
    tiny = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(3, 2), torch.randn(3, 1)),
        batch_size=4,
        drop_last=True,
    )
    with pytest.raises(ValueError, match=r"task 'de' is empty.*3 examples.*batch_size=4"):
        train_alternating(
            model, {"fr": data["fr"], "de": tiny}, nn.MSELoss(), opt, steps=3, progress=False
        )


def test_an_exhausted_one_shot_iterator_is_not_called_empty() -> None:
    model, opt, data = setup()
    once = iter(data["fr"])
    with pytest.raises(ValueError, match=r"task 'fr'.*one-shot iterator.*after 2 batches"):
        train_alternating(
            model,
            {"fr": once, "de": data["de"]},
            nn.MSELoss(),
            opt,
            steps=8,
            schedule="round_robin",
            progress=False,
        )


def test_unsized_data_needs_steps() -> None:
    model, opt, data = setup()
    endless = itertools.cycle(data["fr"])
    with pytest.raises(TypeError, match=r"task 'fr' has no len\(\).*pass steps="):
        train_alternating(
            model, {"fr": endless, "de": data["de"]}, nn.MSELoss(), opt, progress=False
        )
    res = train_alternating(
        model,
        {"fr": endless, "de": data["de"]},
        nn.MSELoss(),
        opt,
        steps=6,
        schedule="round_robin",
        progress=False,
    )
    assert res.step_counts == {"fr": 3, "de": 3}


def test_proportional_with_unsized_data_names_the_task() -> None:
    model, opt, data = setup()
    endless = itertools.cycle(data["fr"])
    with pytest.raises(TypeError, match=r"task 'fr'.*sizes=\{task: n_examples\}"):
        train_alternating(
            model,
            {"fr": endless, "de": data["de"]},
            nn.MSELoss(),
            opt,
            steps=4,
            schedule="proportional",
            progress=False,
        )


def test_a_misspelt_schedule_is_refused_before_training_with_a_suggestion() -> None:
    model, opt, data = setup()
    with pytest.raises(ValueError, match=r"'round-robin'; did you mean 'round_robin'\?"):
        train_alternating(
            model,
            data,
            nn.MSELoss(),
            opt,
            schedule="round-robin",  # type: ignore[arg-type]
            steps=0,
            progress=False,
        )


def test_sizes_without_the_proportional_schedule_warn() -> None:
    model, opt, data = setup()
    with pytest.warns(TaskBalanceWarning, match=r"sizes.*only.*schedule='proportional'"):
        train_alternating(
            model, data, nn.MSELoss(), opt, sizes={"fr": 1, "de": 3}, steps=2, progress=False
        )


def test_steps_must_be_a_whole_number() -> None:
    model, opt, data = setup()
    with pytest.raises(TypeError, match=r"steps must be a non-negative int.*got 10\.0"):
        train_alternating(model, data, nn.MSELoss(), opt, steps=10.0, progress=False)  # type: ignore[arg-type]


def test_a_non_scalar_loss_names_the_task() -> None:
    model, opt, data = setup()
    with pytest.raises(NotScalarLossError, match=r"task 'fr'.*shape \(4, 1\).*reduction"):
        train_alternating(
            model,
            data,
            nn.MSELoss(reduction="none"),
            opt,
            steps=1,
            schedule="round_robin",
            progress=False,
        )


def test_a_loss_that_is_not_a_tensor_names_the_task() -> None:
    model, opt, data = setup()
    with pytest.raises(TypeError, match=r"criterion of task 'fr' returned a float"):
        train_alternating(
            model,
            data,
            lambda out, y: 1.0,
            opt,
            steps=1,  # type: ignore[arg-type,return-value]
            schedule="round_robin",
            progress=False,
        )


def test_data_that_is_not_iterable_names_the_task() -> None:
    model, opt, data = setup()
    with pytest.raises(TypeError, match=r"the data of task 'de' is None, not an iterable"):
        train_alternating(
            model,
            {"fr": data["fr"], "de": None},
            nn.MSELoss(),
            opt,
            steps=2,  # type: ignore[dict-item]
            progress=False,
        )
