"""The MMoE synthetic regression pair (Ma et al., KDD 2018) as a comparison problem.

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, §3.2: two regressions
``y_k = w_kᵀx + Σ_i sin(α_i w_kᵀx + β_i) + ε_k`` whose label correlation is set by the
cosine ``p`` of ``w_1`` and ``w_2`` (the generator of :mod:`taskbalance.problems.mmoe_synthetic`).
Here ``p = 0.5`` (label correlation ≈ 0.22): two weakly related tasks on the paper's
shared-bottom model (one shared layer of 113 units, towers of 8), where the balancer, not
the architecture, decides how the shared layer is split.

Data (independent of the run's seed): ``data_seed`` fixes ``w_1, w_2`` and the points;
targets standardised with training statistics (the reported MAE is in label units).
Adam lr 3e-3 (the paper's), batch 256. ``"full"``: 20,000 training and 5,000 test points,
10 epochs; ``"small"``: 1,024 / 1,024, 1 epoch. Metrics: ``y1_mae``, ``y2_mae`` (test MAE,
in Δm%) and the test losses (diagnostics).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from taskbalance.compare.problem import Size, register_problem
from taskbalance.models.hps import HardParameterSharing
from taskbalance.problems._supervised import SupervisedData, SupervisedProblem, SupervisedTask
from taskbalance.problems.mmoe_synthetic import DIM, TASKS, make_data


@register_problem
class MMoEPair(SupervisedProblem):
    """The MMoE paper's regression pair at task correlation ``p`` (default 0.5)."""

    name: ClassVar[str] = "mmoe_pair"
    description: ClassVar[str] = (
        "Ma et al. (KDD 2018) synthetic regression pair at label correlation ~0.22 (p=0.5) "
        "on the paper's shared-bottom model"
    )
    SIZES: ClassVar[dict[str, dict[str, int]]] = {
        "small": {"n_train": 1024, "n_test": 1024, "epochs": 1, "batch_size": 256},
        "full": {"n_train": 20_000, "n_test": 5_000, "epochs": 10, "batch_size": 256},
    }
    LR: ClassVar[float] = 3e-3

    def __init__(self, size: Size = "full", p: float = 0.5, data_seed: int = 0) -> None:
        super().__init__(size, data_seed)
        if not -1.0 <= p <= 1.0:
            raise ValueError(f"p is a cosine and must lie in [-1, 1], got {p}")
        self.p = float(p)

    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        return tuple(SupervisedTask(t, "regression") for t in TASKS)

    def build_data(self) -> SupervisedData:
        n_train, n_test = self.settings["n_train"], self.settings["n_test"]
        x, y = make_data(self.p, n_train + n_test, seed=self.data_seed)
        mean, std = y[:n_train].mean(dim=0), y[:n_train].std(dim=0, unbiased=False)
        y = (y - mean) / std
        targets = [{t: part[:, k].contiguous() for k, t in enumerate(TASKS)}
                   for part in (y[:n_train], y[n_train:])]  # fmt: skip
        scales = {t: float(std[k]) for k, t in enumerate(TASKS)}
        return SupervisedData(x[:n_train], targets[0], x[n_train:], targets[1], scales)

    def build_model(self) -> nn.Module:
        return HardParameterSharing(DIM, TASKS, shared_hidden=(113,), tower_hidden=(8,))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "p": self.p}
