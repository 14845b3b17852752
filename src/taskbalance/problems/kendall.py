"""The uncertainty-weighting toy of Kendall, Gal and Cipolla (CVPR 2018).

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018; recipe of the authors' group's public example:

* data: N = 100, x ~ N(0, 1), y1 = 2x + 8 + 10 e1, y2 = 3x + 3 + e2, e ~ N(0, 1);
* model: one shared hidden layer of 1024 ReLU units, one linear head per task;
* loss: uncertainty weighting ``sum_i exp(-s_i) MSE_i + s_i`` with ``s_i = log sigma_i^2``
  (init 0), i.e. ``taskbalance.make("uncertainty", tasks=["y1", "y2"])``;
* Adam lr 1e-3, batch 20, reshuffled every epoch, 2000 epochs.

The learned sigmas should approach the noise levels (10, 1); the public runs report
(8.648, 0.925) in Keras and (8.587, 0.920) in PyTorch: below (10, 1) because the network
fits part of the noise, so compare with the published values.

:func:`claims` turns learned sigmas into the demo's verdicts, with this rule: a claim is
reproduced when every learned sigma is within a relative tolerance of the reference. The
tolerances come from the spread of the toy itself. At the optimum of uncertainty weighting
``sigma_i`` is the RMS training residual of task i, and the RMS of n = 100 noise draws
varies by ``1/sqrt(2n)`` ≈ 7% (relative standard deviation) from one data draw to another:

* against the published run (a different data draw), two runs differ by ≈ 10% (√2 × 7%):
  tolerance :data:`PUBLISHED_TOLERANCE` = 20%, two standard deviations;
* against the true noise: the published runs themselves end 14% (y1) and 8% (y2) below it,
  so the tolerance :data:`TRUE_TOLERANCE` = 30% is that shortfall plus two standard
  deviations of one run (14%).

One seed cannot tell much more: a regulariser scaled by 0.8 or 0.7 moves the mean sigma by
+6% / +9% (y1) and +12% / +20% (y2), about one standard deviation of the difference between
two single runs (5.5% and 12.6%). :func:`run_kendall_seeds` trains several seeds side by
side (10 seeds of the full 2000 epochs in about 15 s on one core), and the test suite checks
the *mean* over seeds 0-9 against the published run, with the tolerance
:func:`mean_tolerance`: three standard errors of a mean of n runs,
``3 * SEED_STD / sqrt(n)``, where :data:`SEED_STD` is the standard deviation of one run's
sigma over seeds 0-19, measured: (0.33, 0.083), i.e. 3.9% and 8.9% of the published
values. For n = 10 that is 3.6% (y1) and 8.6% (y2).

Measured, mean over seeds 0-9 (over seeds 0-19 in brackets), 2000 epochs:

====================  =============================  =====================
regulariser           mean sigma (y1, y2)            against (8.59, 0.92)
====================  =============================  =====================
``s_i`` (the method)  (8.48, 0.947) [(8.46, 0.931)]  -1.3%, +2.9%: passes
``0.8 s_i``           (8.96, 1.060) [(8.94, 1.042)]  +4.3%, +15.2%: fails
``0.7 s_i``           (9.21, 1.134) [(9.19, 1.115)]  +7.2%, +23.3%: fails
====================  =============================  =====================

The tolerance treats the published value as the expected outcome of the recipe. It is
itself one run on one unseeded data draw, so it carries one run's spread too; three public
runs agree closely ((8.648, 0.925), (8.587, 0.920), a blog's (8.58, 0.90)), and our mean over
20 seeds lands within 2.2% of them, so the reference holds; a tolerance that also covered
the published draw's spread (about 4% and 9%) could not tell the 0.8-scaled regulariser
from the method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from taskbalance.balancer import Balancer
from taskbalance.history import History
from taskbalance.registry import make
from taskbalance.training.joint import train_joint

TASKS = ("y1", "y2")
TRUE_SIGMA = (10.0, 1.0)
#: the PyTorch notebook's result (the Keras one is (8.648, 0.925)).
PUBLISHED_SIGMA = (8.59, 0.92)
#: relative tolerance of the claim "sigma learns the true noise" (module docstring).
TRUE_TOLERANCE = 0.30
#: relative tolerance of the claim "sigma matches the published run" (module docstring).
PUBLISHED_TOLERANCE = 0.20
#: standard deviation of one run's learned sigma (y1, y2) over seeds 0-19 (measured, 2000
#: epochs; module docstring).
SEED_STD = (0.33, 0.083)


def make_data(n: int = 100, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y1, y2)``, each of shape ``(n, 1)``, drawn from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    y1 = 2.0 * x + 8.0 + TRUE_SIGMA[0] * torch.randn(n, 1, generator=g)
    y2 = 3.0 * x + 3.0 + TRUE_SIGMA[1] * torch.randn(n, 1, generator=g)
    return x, y1, y2


class KendallNet(nn.Module):
    """A shared hidden layer of ``hidden`` ReLU units and one linear head per task."""

    def __init__(self, hidden: int = 1024, tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {t: head(h) for t, head in self.heads.items()}


class ShuffledBatches:
    """In-memory ``(x, {task: y})`` mini-batches, reshuffled at every pass (seeded)."""

    def __init__(self, x: Tensor, ys: dict[str, Tensor], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.ys, self.batch_size = x, ys, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for idx in order.split(self.batch_size):
            yield self.x[idx], {t: y[idx] for t, y in self.ys.items()}


@dataclass
class KendallResult:
    """Learned ``sigma`` (y1, y2), ``sigma_history`` ``(epochs, 2)`` at each epoch end,
    mean training losses per epoch, the balancer's per-step history and the wall time."""

    sigma: tuple[float, float]
    sigma_history: Tensor
    epoch_losses: dict[str, list[float]]
    history: History | None
    seconds: float
    balancer: Balancer
    model: nn.Module


def run_kendall(
    epochs: int = 2000,
    batch_size: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    n: int = 100,
    hidden: int = 1024,
    threads: int | None = 1,
    progress: bool = False,
) -> KendallResult:
    """Train the toy with uncertainty weighting and return the learned sigmas.

    ``lr`` is used by both the model's Adam and the balancer's own Adam (one optimizer
    in the original recipe). ``threads`` caps torch's intra-op threads during the run
    (the model is too small to gain from more; ``None`` leaves the setting alone).
    """
    x, y1, y2 = make_data(n, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KendallNet(hidden)
    balancer = make("uncertainty", tasks=list(TASKS), lr=lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    data = ShuffledBatches(x, {"y1": y1, "y2": y2}, batch_size, seed + 1)
    mse = nn.functional.mse_loss
    sigmas: list[Tensor] = []
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        result = train_joint(
            model,
            data,
            {"y1": mse, "y2": mse},
            optimizer,
            balancer,
            epochs=epochs,
            shared_parameters=model.body.parameters(),
            on_epoch_end=lambda _epoch, _res: sigmas.append(balancer.sigma.clone()),
            progress=progress,
            description="kendall",
        )
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    history = torch.stack(sigmas).double() if sigmas else torch.empty(0, len(TASKS))
    final = balancer.sigma.tolist()
    return KendallResult(
        (final[0], final[1]), history, result.epoch_losses, result.history, seconds,
        balancer, model,
    )  # fmt: skip


class StackedKendallNets(nn.Module):
    """One :class:`KendallNet` per seed, run as one batched model.

    Net ``j`` starts from the weights ``run_kendall(seed=seeds[j])`` starts from (a
    :class:`KendallNet` built right after ``torch.manual_seed(seeds[j])``). Input
    ``(S, B, 1)``, output ``(S, B, 2)`` (the heads y1, y2 in the last dimension); net ``j``
    sees only ``x[j]`` and its parameters only reach ``out[j]``.
    """

    def __init__(self, seeds: Sequence[int], hidden: int = 1024) -> None:
        super().__init__()
        nets = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nets.append(KendallNet(hidden))
        with torch.no_grad():
            body = [net.body[0] for net in nets]
            heads = [[net.heads[t] for t in TASKS] for net in nets]
            self.w1 = nn.Parameter(torch.stack([b.weight.T for b in body]))  # (S, 1, H)
            self.b1 = nn.Parameter(torch.stack([b.bias.unsqueeze(0) for b in body]))  # (S, 1, H)
            self.w2 = nn.Parameter(
                torch.stack([torch.cat([h.weight.T for h in hs], 1) for hs in heads])
            )  # (S, H, 2)
            self.b2 = nn.Parameter(
                torch.stack([torch.cat([h.bias for h in hs]).unsqueeze(0) for hs in heads])
            )  # (S, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.b2, hidden, self.w2)


@dataclass
class KendallSeedsResult:
    """Learned ``sigma`` ``(len(seeds), 2)`` (float64, columns y1, y2) of one run per seed."""

    seeds: tuple[int, ...]
    sigma: Tensor
    epochs: int
    seconds: float

    @property
    def mean(self) -> tuple[float, float]:
        """Mean learned sigma (y1, y2) over the seeds."""
        m = self.sigma.mean(0).tolist()
        return (m[0], m[1])

    @property
    def std(self) -> tuple[float, float]:
        """Standard deviation over the seeds (Bessel's correction; 0 for one seed)."""
        if len(self.seeds) < 2:
            return (0.0, 0.0)
        s = self.sigma.std(0).tolist()
        return (s[0], s[1])


def run_kendall_seeds(
    seeds: Sequence[int] = tuple(range(10)),
    epochs: int = 2000,
    batch_size: int = 20,
    lr: float = 1e-3,
    n: int = 100,
    hidden: int = 1024,
    threads: int | None = 1,
) -> KendallSeedsResult:
    """The runs ``run_kendall(seed=s)`` for every ``s`` in ``seeds``, trained side by side.

    The same recipe, data, initial weights and batch order per seed as :func:`run_kendall`,
    but the seeds share one batched model (:class:`StackedKendallNets`) and one uncertainty
    balancer over ``2 * len(seeds)`` tasks (``"y1/seed0", "y2/seed0", ...``) and are stepped
    together: far less Python per seed. The runs stay independent: each task's loss
    depends on its own seed's net and ``s_i`` only, and Adam acts element by element, so
    each seed gets the updates of its own run (up to float rounding, which the long
    training amplifies: a seed's sigma ends within about 1% of ``run_kendall``'s).

    Raises:
        ValueError: ``seeds`` is empty or repeats a seed, or ``epochs`` is negative.
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"seeds must be one or more distinct integers such as range(10), got {list(seeds)}"
        )
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = [make_data(n, seed) for seed in seeds]
    x = torch.stack([d[0] for d in data])  # (S, n, 1)
    y = torch.stack([torch.cat([d[1], d[2]], 1) for d in data])  # (S, n, 2)
    model = StackedKendallNets(seeds, hidden)
    tasks = [f"{task}/seed{seed}" for seed in seeds for task in TASKS]
    balancer = make("uncertainty", tasks=tasks, lr=lr, record=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    # the batch order of ShuffledBatches(..., seed + 1) in run_kendall, per seed
    generators = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
    rows = torch.arange(len(seeds)).unsqueeze(1)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in generators])
            for idx in order.split(batch_size, dim=1):
                optimizer.zero_grad(set_to_none=True)
                losses = (model(x[rows, idx]) - y[rows, idx]).pow(2).mean(dim=1).flatten()
                balancer(losses).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(previous_threads)
    sigma = balancer.sigma.double().reshape(len(seeds), len(TASKS))
    return KendallSeedsResult(seeds, sigma, epochs, time.perf_counter() - start)


def mean_tolerance(n_seeds: int) -> tuple[float, float]:
    """Relative tolerance (y1, y2) of the mean sigma of ``n_seeds`` runs against the
    published run: three standard errors of the mean, ``3 * SEED_STD / sqrt(n_seeds)``,
    relative to :data:`PUBLISHED_SIGMA` (module docstring). 10 seeds: (3.6%, 8.6%).

    Raises:
        ValueError: ``n_seeds`` is below 1.
    """
    if n_seeds < 1:
        raise ValueError(
            f"n_seeds must be at least 1 (the number of seeds averaged), got {n_seeds}"
        )
    return (
        3.0 * SEED_STD[0] / math.sqrt(n_seeds) / PUBLISHED_SIGMA[0],
        3.0 * SEED_STD[1] / math.sqrt(n_seeds) / PUBLISHED_SIGMA[1],
    )


def plot_sigma(result: KendallResult, path: str | Path) -> Path:
    """Save a PNG of sigma per epoch with the published values dashed; return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    epochs = torch.arange(1, len(result.sigma_history) + 1)
    for i, (ax, task) in enumerate(zip(axes, TASKS)):
        ax.plot(epochs, result.sigma_history[:, i], label=f"learned sigma ({task})")
        ax.axhline(PUBLISHED_SIGMA[i], ls="--", color="k", label=f"published {PUBLISHED_SIGMA[i]}")
        ax.axhline(TRUE_SIGMA[i], ls=":", color="gray", label=f"true noise {TRUE_SIGMA[i]:g}")
        history = result.sigma_history[:, i]
        top = max(float(history.max()) if len(history) else 0.0, TRUE_SIGMA[i])
        ax.set_ylim(0.0, 1.15 * top)
        ax.set_xlabel("epoch")
        ax.set_ylabel("sigma")
        ax.set_title(task)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle("Kendall et al. (CVPR 2018) toy: uncertainty weighting")
    fig.savefig(path, dpi=100)
    return path


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims checked on learned sigmas: every ``sigma_i`` must be within
    ``tolerance`` (relative) of ``reference[i]``; ``offsets[i] = sigma_i / reference_i - 1``."""

    text: str
    reference: tuple[float, float]
    tolerance: float
    offsets: tuple[float, float]

    @property
    def reproduced(self) -> bool:
        return all(abs(offset) <= self.tolerance for offset in self.offsets)

    def line(self) -> str:
        """The demo's verdict line: the claim, the verdict, the rule and the numbers."""
        verdict = "reproduced" if self.reproduced else "NOT reproduced here"
        here = ", ".join(f"{offset:+.1%}" for offset in self.offsets)
        return (
            f"paper's claim '{self.text}': {verdict} "
            f"(rule: each sigma within {self.tolerance:.0%} of it; here {here})"
        )


def claims(
    sigma: Sequence[float],
    true_tolerance: float = TRUE_TOLERANCE,
    published_tolerance: float = PUBLISHED_TOLERANCE,
) -> list[Claim]:
    """Check learned ``sigma`` (y1, y2) against the true noise and the published run.

    The default tolerances and their reason are in the module docstring.

    Raises:
        ValueError: ``sigma`` is not two finite positive numbers, or a tolerance is not
            positive.
    """
    values = [float(v) for v in sigma]
    if len(values) != len(TASKS) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"sigma must be {len(TASKS)} finite positive numbers (y1, y2), got {list(sigma)}; "
            "pass KendallResult.sigma"
        )
    if not (true_tolerance > 0 and published_tolerance > 0):
        raise ValueError(
            f"tolerances must be positive fractions such as 0.2, got {true_tolerance} and "
            f"{published_tolerance}"
        )

    def claim(text: str, reference: tuple[float, float], tolerance: float) -> Claim:
        offsets = (values[0] / reference[0] - 1.0, values[1] / reference[1] - 1.0)
        return Claim(text, reference, tolerance, offsets)

    true = ", ".join(f"{v:g}" for v in TRUE_SIGMA)
    published = ", ".join(f"{v:g}" for v in PUBLISHED_SIGMA)
    return [
        claim(f"sigma learns each task's noise ({true})", TRUE_SIGMA, true_tolerance),
        claim(
            f"sigma matches the published run ({published})", PUBLISHED_SIGMA, published_tolerance
        ),
    ]
