"""Penguins: three tasks on the Palmer Archipelago penguin measurements.

Data: Horst, Hill, Gorman, "palmerpenguins: Palmer Archipelago (Antarctica) penguin data",
2020 (data collected by K. Gorman and the Palmer Station LTER), as shipped by the
``palmerpenguins`` Python package (``load_penguins()``, 344 birds; no download at run time).

Recipe (fixed here; the problem has no published multi-task baseline):

* rows with any missing value are dropped (333 birds remain);
* tasks: ``species`` (Adelie / Chinstrap / Gentoo, 3 classes), ``sex`` (female / male) and
  ``body_mass`` (a regression on the body mass in grams, standardised with the training
  mean and standard deviation);
* inputs (6): bill length, bill depth and flipper length, each standardised with the
  training mean and (population) standard deviation, and the island one-hot (Biscoe, Dream,
  Torgersen); the study year is left out (it describes the sampling, not the bird);
* split: 20 % of the birds of each (species, sex) group go to the test set, drawn by a
  NumPy generator seeded with ``data_seed`` only, so the split is the same for every method
  and training seed (265 training, 68 test birds).

Model: hard parameter sharing (:class:`~taskbalance.models.hps.HardParameterSharing`), a
shared MLP 6 → 32 → 32 (ReLU) and one linear head per task. Metrics: species and sex test
accuracy (higher is better) and the body-mass test MAE in grams (lower is better).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from taskbalance.compare.problem import register_problem
from taskbalance.models.hps import HardParameterSharing
from taskbalance.problems._supervised import SupervisedData, SupervisedProblem, SupervisedTask

if TYPE_CHECKING:
    import pandas as pd

TASKS = ("species", "sex", "body_mass")
SPECIES = ("Adelie", "Chinstrap", "Gentoo")
SEXES = ("female", "male")
ISLANDS = ("Biscoe", "Dream", "Torgersen")
#: the standardised measurements, in input order (then the island one-hot).
NUMERIC = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
FEATURES = (*NUMERIC, *(f"island_{i}" for i in ISLANDS))
#: the share of each (species, sex) group that goes to the test set.
TEST_FRACTION = 0.2

_INSTALL_HINT = "pip install 'taskbalance[problems]'"


@functools.lru_cache(maxsize=1)
def _raw_table() -> pd.DataFrame:
    try:
        from palmerpenguins import load_penguins
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the Penguins problem needs the palmerpenguins package: {_INSTALL_HINT}"
        ) from err
    return load_penguins()


def load_penguin_table() -> pd.DataFrame:
    """The penguins with every value present (333 rows), index reset to ``0..332``."""
    return _raw_table().dropna().reset_index(drop=True).copy()


def split_rows(table: pd.DataFrame, data_seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint sorted ``(train, test)`` row indices: per (species, sex) group, a shuffled
    :data:`TEST_FRACTION` of its rows (rounded) is held out."""
    rng = np.random.default_rng([data_seed, 0])
    train, test = [], []
    for species in SPECIES:
        for sex in SEXES:
            group = np.flatnonzero(
                (table["species"] == species).to_numpy() & (table["sex"] == sex).to_numpy()
            )
            group = rng.permutation(group)
            cut = round(len(group) * TEST_FRACTION)
            test.append(group[:cut])
            train.append(group[cut:])
    return (
        torch.as_tensor(np.sort(np.concatenate(train))),
        torch.as_tensor(np.sort(np.concatenate(test))),
    )


@dataclass(frozen=True, kw_only=True)
class PenguinsData(SupervisedData):
    """:class:`~taskbalance.problems._supervised.SupervisedData` plus what was used to build
    it: the row indices of each part in :func:`load_penguin_table`, and the training
    ``mean`` and population ``std`` of every standardised column (the measurements and
    ``body_mass_g``). ``scales["body_mass"]`` is ``std["body_mass_g"]``."""

    train_rows: Tensor
    test_rows: Tensor
    mean: dict[str, float]
    std: dict[str, float]


def _codes(values: Any, names: tuple[str, ...]) -> Tensor:
    lookup = {name: i for i, name in enumerate(names)}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long)


def make_penguins(data_seed: int = 0) -> PenguinsData:
    """The Penguins train and test sets (see the module docstring).

    ``x`` ``(N, 6)`` float32 in the order of :data:`FEATURES`; targets ``species`` and
    ``sex`` ``(N,)`` long (indices into :data:`SPECIES` and :data:`SEXES`), ``body_mass``
    ``(N,)`` float32, standardised with the training statistics (grams =
    ``mean + std · value``).
    """
    if data_seed < 0:
        raise ValueError(f"data_seed must be non-negative, got {data_seed}")
    table = load_penguin_table()
    train_rows, test_rows = split_rows(table, data_seed)
    train = table.iloc[train_rows.numpy()]
    mean = {c: float(train[c].mean()) for c in (*NUMERIC, "body_mass_g")}
    std = {c: float(train[c].std(ddof=0)) for c in (*NUMERIC, "body_mass_g")}

    def part(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        frame = table.iloc[rows.numpy()]
        numeric = [
            torch.tensor(((frame[c] - mean[c]) / std[c]).to_numpy(), dtype=torch.float32)
            for c in NUMERIC
        ]
        island = _codes(frame["island"], ISLANDS)
        onehot = nn.functional.one_hot(island, len(ISLANDS)).float()
        x = torch.cat([torch.stack(numeric, dim=1), onehot], dim=1)
        mass = (frame["body_mass_g"] - mean["body_mass_g"]) / std["body_mass_g"]
        ys = {
            "species": _codes(frame["species"], SPECIES),
            "sex": _codes(frame["sex"], SEXES),
            "body_mass": torch.tensor(mass.to_numpy(), dtype=torch.float32),
        }
        return x.contiguous(), ys

    x_train, y_train = part(train_rows)
    x_test, y_test = part(test_rows)
    return PenguinsData(
        x_train,
        y_train,
        x_test,
        y_test,
        {"body_mass": std["body_mass_g"]},
        train_rows=train_rows,
        test_rows=test_rows,
        mean=mean,
        std=std,
    )


@register_problem
class Penguins(SupervisedProblem):
    """Penguins (species, sex, body mass) for ``taskbalance compare``.

    Adam, lr 1e-3, batch 32; ``"small"``: 5 epochs, ``"full"``: see :attr:`SIZES` and
    ``docs/problems.md``. Metrics ``species_acc``, ``sex_acc`` (test accuracy),
    ``body_mass_mae`` (test MAE in grams) and the test losses ``*_loss`` (diagnostics, not
    in Δm%).
    """

    name: ClassVar[str] = "penguins"
    description: ClassVar[str] = (
        "Palmer penguins: species (3 classes), sex (2) and body mass (regression) from bill, "
        "flipper and island with a shared MLP"
    )
    #: per size: epochs and batch size.
    SIZES: ClassVar[dict[str, dict[str, int]]] = {
        "small": {"epochs": 5, "batch_size": 32},
        "full": {"epochs": 100, "batch_size": 32},
    }
    #: shared MLP widths.
    HIDDEN: ClassVar[tuple[int, ...]] = (32, 32)

    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        return (
            SupervisedTask("species", "classification"),
            SupervisedTask("sex", "classification"),
            SupervisedTask("body_mass", "regression", unit="g"),
        )

    def build_data(self) -> PenguinsData:
        return make_penguins(self.data_seed)

    def build_model(self) -> nn.Module:
        return HardParameterSharing(
            len(FEATURES),
            TASKS,
            shared_hidden=self.HIDDEN,
            tower_hidden=(),
            out_features={"species": len(SPECIES), "sex": len(SEXES), "body_mass": 1},
        )
