"""The synthetic experiment of MMoE (Ma et al., KDD 2018, §3.2 and §5.1).

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018. Two regression tasks whose relatedness is set by
the cosine ``p`` between their ground-truth weight vectors:

* ``u1, u2`` orthonormal in R^d (d = 100), drawn from the seed (QR of a Gaussian matrix);
  ``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p²) u2)``, so ``cos(w1, w2) = p`` exactly;
* ``x ~ N(0, I_d)``; ``y_k = w_kᵀx + Σ_{i=1..m} sin(α_i w_kᵀx + β_i) + ε``, ε ~ N(0, 0.01²).

The paper does not give c, m, α, β. Default (:data:`AUTHORS`): the generator published
by the authors' group (google-research, "Simple generator for synthetic multi-task data"):
``c = 1``, ``m = 10``, ``α_i = i`` (1..10), ``β_i = (i - 1)²`` (0, 1, 4, ..., 81; the code
indexes β from 0), noise std 0.01. :func:`keras_constants` gives the popular Keras
variant (``c = 0.3``, ``m = 5``, α, β ~ N(0, 1) drawn from a seed).

Label correlation ``corr(y1, y2)`` (exact Gaussian expectations, :func:`label_correlation`):

======  ==========  =====================================
p       AUTHORS     Keras variant (seeds 0 / 1 / 2)
======  ==========  =====================================
1.0     1.000       0.998 / 1.000 / 0.994
0.9     0.458       0.883 / 0.899 / 0.850
0.5     0.218       0.466 / 0.498 / 0.375
======  ==========  =====================================

(with ``β_i = i²`` for i = 1..10 instead, the AUTHORS correlations would be 0.293 at
p = 0.9 and 0.106 at p = 0.5: β matters.) Under AUTHORS a label has variance 7.057, of
which the best linear function of ``w_kᵀx`` leaves 4.065 (mostly high-frequency sines).

Models as in §5.1: shared-bottom with one hidden layer of 113 units, OMoE and MMoE with
8 single-layer experts of 16 units; towers of 8 hidden units; Adam, MSE, equal weighting
(``make("equal")``). Training (:class:`Config` defaults): per seed a fixed split of 100,000
training and 10,000 test points, mini-batches of 1,024, 4,000 Adam steps (41 epochs), one
torch thread per run. The learning rate 3e-3 was chosen once, on seed 100 (not an
evaluation seed), as the best of {1e-3, 3e-3, 1e-2} by the mean final test loss over the
three models at p ∈ {1, 0.5} (0.521, 0.354, 0.377); the paper searched {1e-4, 1e-3, 1e-2}.
Data, basis and initialisation depend on the seed only, so the runs at different ``p``
for one seed share their inputs and initial weights. Paper's claim (Fig. 4): both MoE
models beat shared-bottom at every p; OMoE degrades as p falls while MMoE barely changes.

Measured with the defaults (seeds 0-2, final test MSE averaged over the two tasks,
mean ± std over seeds; 1 torch thread per run, x86-64 CPU):

=====  ===============  ===============  ===============  =====================
p      shared_bottom    omoe             mmoe             shared_bottom − mmoe
=====  ===============  ===============  ===============  =====================
1.0    0.343 ± 0.052    0.238 ± 0.062    0.261 ± 0.053    +0.082
0.9    0.337 ± 0.037    0.278 ± 0.018    0.244 ± 0.052    +0.093
0.5    0.357 ± 0.044    0.422 ± 0.117    0.298 ± 0.058    +0.059
=====  ===============  ===============  ===============  =====================

MMoE beats shared-bottom at every p and OMoE degrades far more than MMoE as p falls, as
in the paper; but OMoE is worse than shared-bottom at p = 0.5, and MMoE's advantage does
not grow as p falls (shared-bottom hardly degrades here): seed-to-seed spread is as
large as the differences.

The test suite's smaller run (:data:`SMALL`, in ``make test``; 27 s of CPU on one core):
p = 0.5 only, shared-bottom and MMoE only, seeds 0-2, 3,000 Adam steps of 256 points,
with the defaults' data and learning rate. Fewer points per step buys more steps: MMoE
overtakes shared-bottom late (after 1,000 steps of 1,024 points, or of 256, shared-bottom
is still ahead on average), and a smaller training set over-fits (30,000 points: test
MSE 1.2-4.2 after 2,000 steps). Measured, final test MSE:

=================================  =====================  =====
model at p = 0.5                   seeds 0 / 1 / 2        mean
=================================  =====================  =====
shared_bottom                      0.940 / 0.660 / 0.541  0.714
mmoe                               0.664 / 0.566 / 0.391  0.540
mmoe, gates forced uniform         1.020 / 0.837 / 1.007  0.955
mmoe, experts collapsed into one   0.997 / 0.765 / 0.816  0.859
mmoe, both towers read one gate    0.784 / 0.738 / 0.661  0.728
=================================  =====================  =====

The claim checked: MMoE's mean test MSE is below shared-bottom's, and MMoE is better on
at least two of the three seeds. The three broken MMoEs (a modified copy of the model
code) fail it; the one-gate variant comes closest (mean gap -0.014) and wins on one
seed. It is a claim about these seeds: on seeds 3 and 4 the gap is +0.093 and -0.177
(mean over seeds 0-4: +0.087).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn

from taskbalance.models.hps import HardParameterSharing
from taskbalance.models.mmoe import MMoE, OMoE
from taskbalance.registry import make
from taskbalance.training.joint import make_progress

DIM = 100
TASKS = ("y1", "y2")


@dataclass(frozen=True)
class Constants:
    """Label constants: scale ``c``, sine frequencies ``alphas``, phases ``betas``, noise."""

    c: float
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        if len(self.alphas) != len(self.betas):
            raise ValueError("alphas and betas must have the same length m")


#: the authors' group's generator: c = 1, α_i = i, β_i = (i - 1)², i = 1..10.
AUTHORS = Constants(
    1.0, tuple(float(i) for i in range(1, 11)), tuple(float(i * i) for i in range(10))
)


def keras_constants(seed: int = 0, c: float = 0.3, m: int = 5) -> Constants:
    """The Keras variant: ``c = 0.3``, ``m = 5``, α, β ~ N(0, 1) drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randn(2, m, generator=g, dtype=torch.float64)
    return Constants(c, tuple(ab[0].tolist()), tuple(ab[1].tolist()))


def task_weights(p: float, seed: int = 0, dim: int = DIM, c: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(w1, w2)`` float64 of shape ``(dim,)`` with norms ``c`` and cosine exactly ``p``."""
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [-1, 1], got {p}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    return c * u1, c * (p * u1 + math.sqrt(1.0 - p * p) * u2)


def labels(x: Tensor, w: Tensor, constants: Constants, noise: Tensor) -> Tensor:
    """``wᵀx + Σ sin(α_i wᵀx + β_i) + noise * noise_std`` for ``x`` ``(n, d)`` (float64)."""
    z = x @ w
    y = z + noise * constants.noise_std
    for a, b in zip(constants.alphas, constants.betas):
        y = y + torch.sin(a * z + b)
    return y


def make_data(
    p: float, n: int, seed: int = 0, dim: int = DIM, constants: Constants = AUTHORS
) -> tuple[Tensor, Tensor]:
    """``x`` ``(n, dim)`` and ``y`` ``(n, 2)`` (float32); depends on ``(p, n, seed)`` only."""
    w1, w2 = task_weights(p, seed, dim, constants.c)
    g = torch.Generator().manual_seed(10_007 + seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.stack([labels(x, w, constants, noise[:, k]) for k, w in enumerate((w1, w2))], 1)
    return x.float(), y.float()


def _sin_sin(a: float, b: float, a2: float, b2: float, rho: float, c2: float) -> float:
    """``E[sin(a z + b) sin(a2 z' + b2)]`` for ``z, z' ~ N(0, c2)`` with correlation rho."""
    minus = c2 * (a * a + a2 * a2 - 2 * a * a2 * rho)
    plus = c2 * (a * a + a2 * a2 + 2 * a * a2 * rho)
    return 0.5 * (math.cos(b - b2) * math.exp(-minus / 2) - math.cos(b + b2) * math.exp(-plus / 2))


def _label_cov(rho: float, k: Constants) -> float:
    """Covariance of the noise-free labels of two tasks whose weights have cosine ``rho``."""
    c2 = k.c * k.c
    terms = list(zip(k.alphas, k.betas))
    mean = sum(math.sin(b) * math.exp(-a * a * c2 / 2) for a, b in terms)
    # E[z sin(a z' + b)] = cov(z, z') a cos(b) exp(-a² c² / 2)  (Stein's lemma)
    cross = sum(rho * c2 * a * math.cos(b) * math.exp(-a * a * c2 / 2) for a, b in terms)
    sines = sum(_sin_sin(a, b, a2, b2, rho, c2) for a, b in terms for a2, b2 in terms)
    return rho * c2 + 2 * cross + sines - mean * mean


def label_correlation(p: float, constants: Constants = AUTHORS) -> float:
    """The population correlation ``corr(y1, y2)`` at cosine ``p`` (exact, noise included)."""
    var = _label_cov(1.0, constants) + constants.noise_std**2
    return _label_cov(p, constants) / var


def label_variance(constants: Constants = AUTHORS) -> float:
    """The population variance of one task's label."""
    return _label_cov(1.0, constants) + constants.noise_std**2


# ---------------------------------------------------------------------------- training
MODELS = ("shared_bottom", "omoe", "mmoe")


def build_model(name: str, dim: int = DIM) -> nn.Module:
    """A model of §5.1 by name: ``"shared_bottom"``, ``"omoe"`` or ``"mmoe"``."""
    if name == "shared_bottom":
        return HardParameterSharing(dim, TASKS, shared_hidden=(113,), tower_hidden=(8,))
    if name == "omoe":
        return OMoE(dim, TASKS, num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
    if name == "mmoe":
        return MMoE(dim, TASKS, num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


@dataclass(frozen=True)
class Config:
    """Training setup of one run (see :func:`run_mmoe_synthetic`)."""

    steps: int = 4000
    batch_size: int = 1024
    lr: float = 3e-3
    n_train: int = 100_000
    n_test: int = 10_000
    dim: int = DIM
    constants: Constants = AUTHORS


#: the test suite's smaller run (module docstring): 3,000 Adam steps of 256 points.
SMALL = Config(steps=3000, batch_size=256)


@dataclass(frozen=True)
class RunResult:
    """Final test MSE of one (p, model, seed) run, per task and averaged over the tasks."""

    p: float
    model: str
    seed: int
    test_mse: dict[str, float]
    seconds: float

    @property
    def test_loss(self) -> float:
        return sum(self.test_mse.values()) / len(self.test_mse)


def train_one(
    p: float, model_name: str, seed: int, config: Config = Config(), threads: int | None = 1
) -> RunResult:
    """Train one model on one data set with equal weighting; return its final test MSE.

    The first ``n_train`` points of :func:`make_data` are the training set, the next
    ``n_test`` the test set; mini-batches are drawn by a reshuffled pass (seeded).
    ``threads`` sets torch's intra-op threads for the run (restored after; ``None`` leaves
    them alone): the result is bit-reproducible for a given thread count only.
    """
    return train_models(p, [model_name], seed, config, threads)[0]


def train_models(
    p: float,
    model_names: Sequence[str],
    seed: int,
    config: Config = Config(),
    threads: int | None = 1,
) -> list[RunResult]:
    """:func:`train_one` for each model in turn, on one data set generated once.

    Each result is the one :func:`train_one` gives; ``RunResult.seconds`` counts the
    training and the test of that model, not the data generation.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x, y = make_data(p, config.n_train + config.n_test, seed, config.dim, config.constants)
        return [_train(p, name, seed, config, x, y) for name in model_names]
    finally:
        torch.set_num_threads(previous)


def _train(p: float, model_name: str, seed: int, config: Config, x: Tensor, y: Tensor) -> RunResult:
    start = time.perf_counter()
    x_train, y_train = x[: config.n_train], y[: config.n_train]
    x_test, y_test = x[config.n_train :], y[config.n_train :]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, config.dim)
    balancer = make("equal", tasks=list(TASKS), record=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
    g = torch.Generator().manual_seed(20_011 + seed)
    order, pos = torch.randperm(config.n_train, generator=g), 0
    mse = nn.functional.mse_loss
    for _ in range(config.steps):
        if pos + config.batch_size > config.n_train:
            order, pos = torch.randperm(config.n_train, generator=g), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        out, target = model(x_train[idx]), y_train[idx]
        losses = {t: mse(out[t][:, 0], target[:, k]) for k, t in enumerate(TASKS)}
        optimizer.zero_grad(set_to_none=True)
        balancer(losses).backward()
        optimizer.step()
    with torch.no_grad():
        out = model(x_test)
        test = {t: float(mse(out[t][:, 0], y_test[:, k])) for k, t in enumerate(TASKS)}
    return RunResult(p, model_name, seed, test, time.perf_counter() - start)


def _train_spec(spec: tuple[float, str, int, Config]) -> RunResult:
    return train_one(*spec, threads=1)


@dataclass
class MMoESyntheticResults:
    """Every run's result, the setup and the wall time of the whole experiment."""

    runs: list[RunResult]
    config: Config
    seconds: float

    def losses(self, p: float, model: str) -> list[float]:
        """Final test losses (mean over tasks) of every seed at ``(p, model)``."""
        return [r.test_loss for r in self.runs if r.p == p and r.model == model]

    def summary(self) -> dict[tuple[float, str], tuple[float, float]]:
        """``{(p, model): (mean, std)}`` over seeds (std with Bessel's correction; 0 for one)."""
        out = {}
        for key in dict.fromkeys((r.p, r.model) for r in self.runs):
            v = torch.tensor(self.losses(*key), dtype=torch.float64)
            out[key] = (float(v.mean()), float(v.std()) if len(v) > 1 else 0.0)
        return out


def run_mmoe_synthetic(
    correlations: Sequence[float] = (1.0, 0.9, 0.5),
    seeds: int | Sequence[int] = 3,
    models: Sequence[str] = MODELS,
    config: Config = Config(),
    workers: int | None = None,
    progress: bool = True,
) -> MMoESyntheticResults:
    """Train every (p, model, seed) and return the final test losses.

    ``seeds`` is a count (seeds 0..n-1) or the seeds themselves. Each run uses one torch
    thread; ``workers`` runs go in parallel in spawned processes (default: the number of
    CPU cores, at most 2; ``1`` runs in this process). Results do not depend on ``workers``.
    Spawned workers re-import the main module, so a script calling this with
    ``workers > 1`` must do so under ``if __name__ == "__main__":``.

    Measured: the defaults (27 runs of 4,000 steps) took 230 s with 2 workers on a 2-core
    machine that others were also using (load average about 2).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    specs = [(float(p), m, s, config) for p in correlations for s in seed_list for m in models]
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, workers)
    start = time.perf_counter()
    runs: list[RunResult] = []
    with make_progress(progress, "mmoe synthetic") as bar:
        task = bar.add_task("mmoe synthetic", total=len(specs), info="")
        if workers == 1:  # the models of one (p, seed) share its data, generated once
            for p, seed in dict.fromkeys((spec[0], spec[2]) for spec in specs):
                runs.extend(train_models(p, models, seed, config))
                bar.update(task, advance=len(models), info=f"p={p} seed {seed}")
        else:
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    for run in pool.map(_train_spec, specs):
                        runs.append(run)
                        info = f"p={run.p} {run.model} seed {run.seed}"
                        bar.update(task, advance=1, info=info)
            except BrokenProcessPool as err:
                raise RuntimeError(
                    "a worker process died; when calling run_mmoe_synthetic from a script, "
                    "call it under `if __name__ == '__main__':` (spawned workers re-import "
                    "the main module), or pass workers=1"
                ) from err
    return MMoESyntheticResults(runs, config, time.perf_counter() - start)


# ---------------------------------------------------------------------------- reporting
def gap(results: MMoESyntheticResults, p: float, baseline: str = "shared_bottom") -> float:
    """Mean test loss of ``baseline`` minus that of MMoE at ``p`` (positive: MMoE better)."""
    summary = results.summary()
    return summary[(p, baseline)][0] - summary[(p, "mmoe")][0]


def seed_gaps(
    results: MMoESyntheticResults, p: float, baseline: str = "shared_bottom"
) -> list[float]:
    """Per seed (in the order run), test loss of ``baseline`` minus that of MMoE at ``p``."""
    seeds = list(dict.fromkeys(r.seed for r in results.runs if r.p == p))
    loss = {(r.model, r.seed): r.test_loss for r in results.runs if r.p == p}
    return [loss[(baseline, s)] - loss[("mmoe", s)] for s in seeds]


def results_table(results: MMoESyntheticResults) -> Table:
    """A rich table: per ``p``, the label correlation and mean ± std test loss per model."""
    summary = results.summary()
    ps = list(dict.fromkeys(p for p, _ in summary))
    models = list(dict.fromkeys(m for _, m in summary))
    n_seeds = len({r.seed for r in results.runs})
    table = Table(
        title=f"MMoE synthetic (Ma et al. 2018): final test MSE, mean ± std over {n_seeds} seeds"
    )
    table.add_column("p", justify="right")
    table.add_column("label corr", justify="right")
    for m in models:
        table.add_column(m, justify="right")
    both = "shared_bottom" in models and "mmoe" in models
    if both:
        table.add_column("shared_bottom − mmoe", justify="right")
    for p in ps:
        row = [f"{p:g}", f"{label_correlation(p, results.config.constants):.3f}"]
        row += [f"{summary[(p, m)][0]:.4g} ± {summary[(p, m)][1]:.2g}" for m in models]
        if both:
            row.append(f"{gap(results, p):+.3g}")
        table.add_row(*row)
    return table


def plot_results(results: MMoESyntheticResults, path: str | Path) -> Path:
    """Save a PNG of final test loss against ``p`` per model (mean, std error bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    summary = results.summary()
    for m in dict.fromkeys(m for _, m in summary):
        ps = sorted(p for p, name in summary if name == m)
        means = [summary[(p, m)][0] for p in ps]
        stds = [summary[(p, m)][1] for p in ps]
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=4, label=m)
    ax.set_xlabel("task correlation p = cos(w1, w2)")
    ax.set_ylabel("final test MSE (mean over the two tasks)")
    ax.set_title("MMoE synthetic (Ma et al., KDD 2018)")
    ax.invert_xaxis()
    ax.legend(loc="best")
    fig.savefig(path, dpi=100)
    return path
