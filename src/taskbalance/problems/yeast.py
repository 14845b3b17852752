"""Yeast: 14 binary tasks on a shared network, the many-task case on real data.

Data: the MULAN multi-label Yeast set (Elisseeff & Weston, "A kernel method for
multi-labelled classification", NIPS 2001): 2,417 genes, 103 expression and phylogenetic
features, 14 functional classes (a gene has 4.24 on average). Read from the copy inside
the ``river`` wheel, fetched once from the package registry and cached
(:func:`taskbalance.data.load_yeast`); nothing is installed.

Recipe (fixed here; see ``docs/real_data.md``):

* split: 60 % training, 20 % validation, 20 % test rows, drawn by a NumPy generator seeded
  with ``data_seed`` only; every label must have positive and negative rows in each part
  (checked);
* inputs standardised with the training mean and (population) standard deviation;
* tasks ``class1`` … ``class14``, one logit each (binary cross-entropy);
* model: hard parameter sharing, a shared MLP 103 → 64 (ReLU) and a linear head per task.

Metrics: each task's test ROC AUC (``class<k>_auc``, in Δm%), then the mean AUC over the 14
tasks (``mean_auc``) and the Hamming loss of the 0.5-thresholded prediction (``hamming``),
both summaries left out of Δm% (they repeat the per-task numbers), then the test losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from taskbalance.compare.problem import Metric, RunResult, Size, register_problem
from taskbalance.models.hps import HardParameterSharing
from taskbalance.problems._scores import hamming_loss, roc_auc
from taskbalance.problems._supervised import SupervisedData, SupervisedProblem, SupervisedTask

N_LABELS = 14
TASKS = tuple(f"class{k}" for k in range(1, N_LABELS + 1))
#: shares of the training and validation parts (the rest is the test part).
TRAIN_FRACTION, VAL_FRACTION = 0.6, 0.2


def split_rows(labels: np.ndarray, data_seed: int = 0) -> tuple[np.ndarray, ...]:
    """Disjoint sorted ``(train, validation, test)`` row indices (60/20/20 %).

    Raises:
        ValueError: a label has no positive or no negative row in some part (pick another
            ``data_seed``).
    """
    n = len(labels)
    order = np.random.default_rng([data_seed, 0]).permutation(n)
    a, b = round(n * TRAIN_FRACTION), round(n * (TRAIN_FRACTION + VAL_FRACTION))
    parts = tuple(np.sort(order[i:j]) for i, j in ((0, a), (a, b), (b, n)))
    for name, rows in zip(("training", "validation", "test"), parts):
        positives = labels[rows].sum(axis=0)
        bad = [TASKS[k] for k in range(labels.shape[1]) if positives[k] in (0, len(rows))]
        if bad:
            raise ValueError(
                f"data_seed {data_seed}: the {name} part has only one class of "
                f"{', '.join(bad)}; pick another data_seed"
            )
    return parts


@register_problem
class Yeast(SupervisedProblem):
    """Yeast (14 binary tasks) for ``taskbalance compare``; see the module docstring.

    Adam, lr 1e-3; ``"small"``: 3 epochs, batch 64; ``"full"``: :attr:`SIZES`.
    """

    name: ClassVar[str] = "yeast"
    description: ClassVar[str] = (
        "Yeast (MULAN): 14 binary gene-function tasks on 103 features, shared MLP, AUC; "
        "data fetched from the package registry"
    )
    baselines: ClassVar[tuple[str, ...]] = ("single_task", "tuned_static")
    #: every run reports its metrics on the validation split too.
    has_validation: ClassVar[bool] = True
    SIZES: ClassVar[dict[str, dict[str, int]]] = {
        "small": {"epochs": 3, "batch_size": 64},
        "full": {"epochs": 25, "batch_size": 64},
    }
    #: shared MLP widths.
    HIDDEN: ClassVar[tuple[int, ...]] = (64,)

    def __init__(self, size: Size = "full", data_seed: int = 0, data_dir: str | None = None):
        super().__init__(size, data_seed)
        self.data_dir = data_dir

    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        return tuple(SupervisedTask(t, "binary") for t in TASKS)

    def summary_metrics(self) -> tuple[Metric, ...]:
        return (
            Metric("mean_auc", "all", higher_is_better=True, in_delta_m=False),
            Metric("hamming", "all", higher_is_better=False, in_delta_m=False),
        )

    def summary_values(
        self, outputs: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> dict[str, float]:
        aucs = [roc_auc(outputs[t].reshape(-1), targets[t], name=t) for t in TASKS]
        logits = torch.stack([outputs[t].reshape(-1) for t in TASKS], dim=1)
        labels = torch.stack([targets[t] for t in TASKS], dim=1)
        return {"mean_auc": float(np.mean(aucs)), "hamming": hamming_loss(logits, labels)}

    def combine_single_task(self, results: Mapping[str, RunResult]) -> dict[str, float]:
        """The single-task row's summaries: the mean of the 14 networks' own AUCs, and the
        Hamming loss as the mean of each network's error rate on its own label."""
        combined = super().combine_single_task(results)
        aucs = [results[t].metrics[f"{t}_auc"] for t in TASKS]
        errors = [results[t].extras["label_errors"][t] for t in TASKS]
        combined.update(mean_auc=float(np.mean(aucs)), hamming=float(np.mean(errors)))
        return combined

    def run_extras(self, model: nn.Module, data: SupervisedData) -> dict[str, Any]:
        """``label_errors``: each label's test error rate at the 0.5 threshold (for the
        single-task row's Hamming loss)."""
        model.eval()
        with torch.no_grad():
            outputs = model.heads(model.features(data.x_test), data.x_test)  # type: ignore[operator]
        wrong = {t: (outputs[t].reshape(-1) > 0) != (data.y_test[t] == 1) for t in TASKS}
        return {"label_errors": {t: float(w.double().mean()) for t, w in wrong.items()}}

    def build_data(self) -> SupervisedData:
        from taskbalance.data import load_yeast

        features, labels = load_yeast(self.data_dir)
        train, val, test = split_rows(labels, self.data_seed)
        mean = features[train].mean(axis=0)
        std = features[train].std(axis=0)
        std[std == 0] = 1.0

        def part(rows: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
            x = torch.from_numpy(((features[rows] - mean) / std).astype(np.float32))
            ys = {t: torch.from_numpy(labels[rows, k].astype(np.float32)) for k, t in
                  enumerate(TASKS)}  # fmt: skip
            return x, ys

        (x_train, y_train), (x_val, y_val), (x_test, y_test) = part(train), part(val), part(test)
        return SupervisedData(x_train, y_train, x_test, y_test, x_val=x_val, y_val=y_val)

    def build_model(self) -> nn.Module:
        return HardParameterSharing(
            self.data().x_train.shape[1], TASKS, shared_hidden=self.HIDDEN, tower_hidden=()
        )
