"""A tiny comparison problem for the runner's tests: two regressions on a shared linear body."""

from __future__ import annotations

import time

import torch
from torch import nn

from taskbalance.compare import (
    ComparisonProblem,
    Metric,
    RunResult,
    after_step,
    balanced_backward,
)


class TwoRegressions(ComparisonProblem):
    name = "two_regressions"
    description = "two linear regressions sharing a body (tests only)"

    def __init__(self, size="small", fail_for: str | None = None, nan_for: str | None = None):
        super().__init__(size)
        self.fail_for = fail_for
        self.nan_for = nan_for
        self.calls: list[tuple[str, int]] = []

    tasks = ("a", "b")
    metrics = (
        Metric("mse_a", "a", higher_is_better=False),
        Metric("score_b", "b", higher_is_better=True),
        Metric("steps_seen", "a", higher_is_better=True, in_delta_m=False),
    )
    default_epochs = 2

    def run(self, make_balancer, *, seed, epochs, progress=False):
        balancer = make_balancer()
        self.calls.append((balancer.method_name, seed))
        if balancer.method_name == self.fail_for:
            raise RuntimeError("forced failure")
        torch.manual_seed(seed)
        body = nn.Linear(3, 4)
        heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})
        params = [*body.parameters(), *heads.parameters()]
        opt = torch.optim.SGD(params, lr=0.05)
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(64, 3, generator=gen)
        y = {"a": x @ torch.tensor([1.0, -2.0, 0.5]), "b": x @ torch.tensor([0.0, 1.0, 3.0])}
        epoch_losses = {t: [] for t in self.tasks}
        elapsed, steps = 0.0, 0
        for _ in range(epochs):
            sums = dict.fromkeys(self.tasks, 0.0)
            for i in range(0, 64, 16):
                start = time.perf_counter()
                opt.zero_grad()
                z = torch.tanh(body(x[i : i + 16]))
                losses = {
                    t: ((heads[t](z).squeeze(-1) - y[t][i : i + 16]) ** 2).mean()
                    for t in self.tasks
                }
                balanced_backward(
                    balancer,
                    losses,
                    body.parameters(),
                    features=z,
                    kpi=lambda: {"a": 0.5, "b": 0.5},
                )
                opt.step()
                xb = x[i : i + 16]
                after_step(
                    balancer,
                    lambda xb=xb, i=i: {
                        t: (
                            (heads[t](torch.tanh(body(xb))).squeeze(-1) - y[t][i : i + 16]) ** 2
                        ).mean()
                        for t in self.tasks
                    },
                )
                elapsed += time.perf_counter() - start
                steps += 1
                for t in self.tasks:
                    sums[t] += float(losses[t].detach()) / 4
            balancer.end_period()
            for t in self.tasks:
                epoch_losses[t].append(sums[t])
        with torch.no_grad():
            z = torch.tanh(body(x))
            mse = {t: float(((heads[t](z).squeeze(-1) - y[t]) ** 2).mean()) for t in self.tasks}
        metrics = {"mse_a": mse["a"], "score_b": 1.0 / (1.0 + mse["b"]), "steps_seen": steps}
        if balancer.method_name == self.nan_for:
            metrics["mse_a"] = float("nan")
        return RunResult(
            metrics=metrics,
            epoch_losses=epoch_losses,
            step_time=elapsed / steps,
            steps=steps,
            histories={"main": balancer.history},
            extras={"final": [1.0, 2.0]},
        )
