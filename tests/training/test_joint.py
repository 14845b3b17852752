"""Joint training loop: all tasks every step, any balancer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.training import split_batch, train_joint

TASKS = ["a", "b"]
MSE = {t: nn.MSELoss() for t in TASKS}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"features": h, **{t: head(h) for t, head in self.heads.items()}}


def make_batches(n_batches: int = 4, batch: int = 8, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, generator=g)
        targets = {"a": x[:, :1] * 2.0, "b": x[:, 1:2] - x[:, 2:3]}
        out.append((x, targets))
    return out


def setup(seed: int = 0) -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyNet()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


class Recorder:
    """Criteria that remember every loss value they return (to check the epoch means)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {t: [] for t in TASKS}

    def criteria(self) -> dict:
        def make(task: str):
            def crit(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                loss = ((out - target) ** 2).mean()
                self.values[task].append(loss.item())
                return loss

            return crit

        return {t: make(t) for t in TASKS}


@pytest.mark.parametrize("method", ["equal", "dwa", "uncertainty"])
def test_epoch_means_match_the_losses_seen(method: str) -> None:
    model, opt = setup()
    data = make_batches()
    rec = Recorder()
    bal = tb.make(method, tasks=TASKS)
    res = train_joint(model, data, rec.criteria(), opt, bal, epochs=3, progress=False)
    assert res.steps == 12 and res.epochs == 3
    assert len(bal.history) == 12
    for t in TASKS:
        expected = [sum(rec.values[t][4 * e : 4 * e + 4]) / 4 for e in range(3)]
        assert res.epoch_losses[t] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["equal", "dwa", "uncertainty"])
def test_training_reduces_the_losses(method: str) -> None:
    model, opt = setup()
    bal = tb.make(method, tasks=TASKS)
    res = train_joint(model, make_batches(), MSE, opt, bal, epochs=40, progress=False)
    for t in TASKS:
        assert res.epoch_losses[t][-1] < 0.5 * res.epoch_losses[t][0]


def test_one_equal_step_matches_a_manual_step() -> None:
    model, _ = setup()
    twin, _ = setup()
    data = make_batches(n_batches=1)
    x, ys = data[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_joint(model, data, MSE, opt, tb.make("equal", tasks=TASKS), progress=False)
    out = twin(x)
    total = sum(((out[t] - ys[t]) ** 2).mean() for t in TASKS)
    grads = torch.autograd.grad(total, list(twin.parameters()))
    for p, q, g in zip(model.parameters(), twin.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * g)


def test_dwa_periods_close_at_epoch_ends() -> None:
    model, opt = setup()
    rec = Recorder()
    bal = tb.make("dwa", tasks=TASKS, temperature=2.0)
    res = train_joint(model, make_batches(), rec.criteria(), opt, bal, epochs=3, progress=False)
    m = {t: res.epoch_losses[t] for t in TASKS}
    r = torch.tensor([m[t][1] / m[t][0] for t in TASKS], dtype=torch.float64)
    expected = 2 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    weights = bal.history.weights
    torch.testing.assert_close(weights[:8], torch.ones(8, 2, dtype=torch.float64))
    torch.testing.assert_close(weights[8:], expected.expand(4, 2), rtol=1e-5, atol=1e-6)


def test_uncertainty_parameters_learn_without_the_model_optimizer() -> None:
    model, opt = setup()
    bal = tb.make("uncertainty", tasks=TASKS)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for p in bal.parameters())
    train_joint(model, make_batches(), MSE, opt, bal, epochs=2, progress=False)
    assert not torch.equal(bal.log_vars.detach(), torch.zeros(2))


class Spy(tb.EqualWeighting):
    """Equal weighting that records what ``backward`` receives."""

    calls: list

    def backward(self, losses, shared=None, features=None, **context):
        self.calls.append((shared, features, context))
        return super().backward(losses, shared=shared, features=features, **context)


def test_shared_features_and_context_reach_the_balancer() -> None:
    model, opt = setup()
    spy = Spy(TASKS)
    spy.calls = []
    seen = []

    def features_fn(outputs):
        seen.append(outputs["features"])
        return outputs["features"]

    train_joint(
        model,
        make_batches(n_batches=2),
        MSE,
        opt,
        spy,
        shared_parameters=model.body.parameters(),
        features_fn=features_fn,
        context_fn=lambda outputs, batch: {"kpi": [0.5, 0.5]},
        progress=False,
    )
    assert len(spy.calls) == 2
    body = list(model.body.parameters())
    for (shared, features, context), feats in zip(spy.calls, seen):
        assert [id(p) for p in shared] == [id(p) for p in body]
        assert features is feats
        assert context == {"kpi": [0.5, 0.5]}


def test_dtp_gets_kpis_from_context_fn() -> None:
    model, opt = setup()
    bal = tb.make("dtp", tasks=TASKS, gamma=1.0, alpha=1.0)
    train_joint(
        model,
        make_batches(n_batches=1),
        MSE,
        opt,
        bal,
        context_fn=lambda outputs, batch: {"kpi": {"a": 0.5, "b": 0.25}},
        progress=False,
    )
    expected = torch.tensor([-(0.5) * math.log(0.5), -(0.75) * math.log(0.25)])
    torch.testing.assert_close(bal.history.weights[0].float(), expected)


def test_positional_losses_from_a_loss_function() -> None:
    model, opt = setup()

    def loss_fn(outputs, batch):
        _, ys = batch
        return [((outputs[t] - ys[t]) ** 2).mean() for t in TASKS]

    bal = tb.make("equal", tasks=TASKS)
    res = train_joint(model, make_batches(), loss_fn, opt, bal, epochs=2, progress=False)
    assert len(res.epoch_losses["a"]) == 2
    assert all(v > 0 for v in res.epoch_losses["b"])


def test_skipped_steps_do_not_move_the_model() -> None:
    model, opt = setup()
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(outputs, batch):
        return {"a": outputs["a"].sum() * float("nan"), "b": outputs["b"].pow(2).mean()}

    bal = tb.make("equal", tasks=TASKS, nonfinite="skip_step")
    res = train_joint(model, make_batches(n_batches=2), nan_loss, opt, bal, progress=False)
    assert res.skipped_steps == 2 and res.steps == 2
    assert all(math.isnan(res.epoch_losses[t][0]) for t in TASKS)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_progress_bar_and_epoch_callback(capsys: pytest.CaptureFixture[str]) -> None:
    model, opt = setup()
    epochs_seen = []
    train_joint(
        model,
        make_batches(),
        MSE,
        opt,
        tb.make("equal", tasks=TASKS),
        epochs=2,
        on_epoch_end=lambda e, res: epochs_seen.append((e, res.epochs)),
        progress=True,
        description="tiny",
    )
    assert epochs_seen == [(0, 1), (1, 2)]
    assert "tiny" in capsys.readouterr().out


def test_negative_epochs_rejected() -> None:
    model, opt = setup()
    with pytest.raises(ValueError, match="epochs"):
        train_joint(model, [], MSE, opt, tb.make("equal", tasks=TASKS), epochs=-1)


def test_split_batch() -> None:
    x, y1, y2 = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert split_batch((x, y1)) == (x, y1)
    assert split_batch((x, y1, y2)) == (x, (y1, y2))
    assert split_batch({"input": x, "a": y1}) == (x, {"a": y1})
    assert split_batch(x) == (x, None)
