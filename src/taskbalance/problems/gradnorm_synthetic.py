"""The synthetic problem of GradNorm (Chen et al., ICML 2018, §4 and Fig. 2).

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018: T squared-loss regressions onto
``f_i(x) = σ_i tanh((B + ε_i) x)``, x in R^250, f_i in R^100, B and ε_i fixed, entries
~ N(0, 10²) and N(0, 3.5²); trunk of 4 ReLU layers of 100 units, one 100→100 linear head
per task; GradNorm α = 0.12 on the last trunk layer's weight, Σ w_i = T. T = 2: σ = (1, 100);
T = 10 ("a wide normal distribution"): σ = (48, 3, 54, 16, 9, 30, 52, 26, 47, 81) of a public
PyTorch reimplementation. Metric: Σ_i L_i(t)/L_i(0) on 1000 held-out points.

Open choices, made before comparing methods (none tuned on the gap): x ~ U(−1, 1)^250 not
rescaled, so (B + ε_i) x has std ≈ 97 and the targets are essentially σ_i sign(·);
``unit_norm=True`` rescales x to unit norm like the public Chainer code (std ≈ 10.6, still
~93 % saturated; a 1-seed pilot learned slower: 9.55 for both methods after 8k steps). Seed s
fixes B, ε_i, the initialisation, 10 000 training points (batches of 100, reshuffled each
pass) and the held-out set. Adam lr 1e-4 for the network; GradNorm's own Adam lr 5e-4 for
the weights (top of the public 1e-4..5e-4 range, as we run 10k steps, not 25k). Optional
uncertainty weighting: library default (``exp(-s) L + s``, own Adam lr 1e-3).

Default run (T = 10, seeds 0-2, 10k steps, ~3 min on 2 free cores): equal 8.787 ± 0.077,
GradNorm 8.714 ± 0.061, lower on every seed (by 0.055-0.097). Equal weighting lets the σ = 3
task lag (ratio up to 0.907 vs ≤ 0.888); GradNorm equalises the ratios. The gap is small
(≈ 0.8 %, opens after ~5k steps) but consistent. Final weights ∝ 1/σ_i: Spearman(w, σ) = −1,
w_i σ_i in 12.2..16.1 (w = 4.81 at σ = 3, 0.15 at σ = 81).
Uncertainty weighting (same seeds, optional): 9.056 ± 0.078, above both on every seed.

This run cannot see α: every task has the same functional form and only the scales σ_i
differ, so gradient-norm equalisation does all the work (the paper chooses a low α = 0.12
for exactly that reason, §4). Seed 0, 10k steps: the final metric is 8.7726 with α = 0.12,
with α = 0 and with α = 0.12 and the ratio inverted (L(0)/L(t)), every task's ratio equal to
3 decimals (equal weighting: 8.8693).

Rate-balancing variant (:func:`run_rate_balance`). The paper (§3) makes α the strength of a
restoring force towards a common training rate, to be set higher when tasks differ in
complexity; α = 0 only pins the gradient norms at W to be equal. The variant keeps the
problem's data generator, network and loss, but its T = 2 tasks differ in complexity, not in
scale: ``f_i = σ_i tanh(κ_i (B + ε_i) x)`` with κ = (0.001, 1) — task 0 is nearly linear in
x, task 1 saturated (≈ σ sign) — and σ = (1 / (0.001 s), 1), s ≈ 96.7 the standard deviation
of (B + ε_i) x, so both outputs have an RMS of ≈ 1 and gradient normalisation has little to
correct. Choices: Adam lr 1e-3 for the network (1e-4 trains too little in 1000 steps), the
library's GradNorm defaults α = 1.5 (the paper's value for tasks that differ) and weight lr
0.025, 1000 steps. Spread = log(max_i r_i / min_i r_i) of the final held-out loss ratios
r_i = L_i(t)/L_i(0) (0 when the tasks train at the same rate).

Measured, seeds 0-4, 1000 steps (the three runs of one seed: ~11 s on one shared core):
task 0 trains faster (equal weighting: r = 0.380-0.410 vs 0.622-0.636). Spread: equal
0.438-0.495; GradNorm α = 0 0.428-0.473 (weights within 0.09 of 1); GradNorm α = 1.5
0.353-0.383, 0.80-0.82 × α = 0's and 0.77-0.80 × equal weighting's on every seed, the slow
task's weight 1.33-1.40. With the ratio inverted (L(0)/L(t)) the spread grows to
0.527-0.617 and the slow task's weight falls to 0.48-0.59. Seed 0 at 4000 steps: spread
0.824 equal, 0.813 α = 0, 0.574 α = 1.5. The balance comes mostly from holding back the fast
task (seed 0: r_0 = 0.424 vs 0.387 at equal weighting); the slow task gains little (0.617 vs
0.623), and the sum of the ratios, the paper's metric, is higher (1.041 vs 1.010): rate
balancing is what α buys here, not a lower total.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn

from taskbalance.aggregation.gradnorm import GradNorm
from taskbalance.registry import make
from taskbalance.training.joint import make_progress

SIGMAS_2 = (1.0, 100.0)
SIGMAS_10 = (48.0, 3.0, 54.0, 16.0, 9.0, 30.0, 52.0, 26.0, 47.0, 81.0)
IN_DIM, OUT_DIM, HIDDEN = 250, 100, 100
METHODS = ("equal", "gradnorm", "uncertainty")
#: standard deviation of an entry of (B + ε_i) x for x ~ U(−1, 1)^250: sqrt(250 (10² + 3.5²) / 3)
ARGUMENT_STD = math.sqrt(IN_DIM * (10.0**2 + 3.5**2) / 3)
#: the rate-balancing variant: a nearly linear task and a saturated one, both of RMS ≈ 1
RATES_KAPPAS = (0.001, 1.0)
RATES_SIGMAS = (1.0 / (RATES_KAPPAS[0] * ARGUMENT_STD), 1.0)
#: its variants, in the order of the table: GradNorm without and with the rate term
RATE_VARIANTS = ("equal", "gradnorm α=0", "gradnorm")


def make_data(
    n: int, sigmas: Sequence[float] = SIGMAS_10, seed: int = 0, offset: int = 0,
    unit_norm: bool = False, kappas: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``x`` ``(n, 250)`` ~ U(−1, 1) and ``y`` ``(n, T, 100)``,
    ``y[:, i] = σ_i tanh(κ_i (B+ε_i) x)`` (κ_i = 1, the paper's problem, unless ``kappas``).

    B ~ N(0, 10²) and ε_i ~ N(0, 3.5²) depend on ``seed`` only; x on ``(seed, offset)``.
    """
    g = torch.Generator().manual_seed(seed)
    maps = 10.0 * torch.randn(OUT_DIM, IN_DIM, generator=g)
    maps = maps + 3.5 * torch.randn(len(sigmas), OUT_DIM, IN_DIM, generator=g)
    x = torch.rand(n, IN_DIM, generator=torch.Generator().manual_seed(seed + offset)) * 2 - 1
    if unit_norm:
        x = x / x.norm(dim=1, keepdim=True)
    scale = torch.tensor(sigmas, dtype=torch.float32)[:, None]
    argument = torch.einsum("toi,ni->nto", maps, x)
    if kappas is not None:
        if len(kappas) != len(sigmas):
            raise ValueError(f"{len(kappas)} kappas for {len(sigmas)} sigmas: give one per task")
        argument = argument * torch.tensor(kappas, dtype=torch.float32)[:, None]
    return x, scale * torch.tanh(argument)


class ToyNet(nn.Module):
    """4 ReLU layers of 100 units (the trunk) and one 100→100 linear head per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        dims = (IN_DIM, HIDDEN, HIDDEN, HIDDEN, HIDDEN)
        layers = [m for a, b in itertools.pairwise(dims) for m in (nn.Linear(a, b), nn.ReLU())]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, OUT_DIM) for _ in range(num_tasks))

    @property
    def last_shared(self) -> Tensor:
        """GradNorm's W: the weight of the last trunk layer."""
        return self.trunk[-2].weight

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def task_losses(net: ToyNet, x: Tensor, y: Tensor) -> list[Tensor]:
    """Mean squared error of every task."""
    return [nn.functional.mse_loss(out, y[:, i]) for i, out in enumerate(net(x))]


@dataclass(frozen=True)
class Config:
    """Training setup of one run (defaults: see the module docstring)."""

    steps: int = 10_000
    eval_every: int = 200
    batch_size: int = 100
    lr: float = 1e-4
    weight_lr: float = 5e-4
    alpha: float = 0.12
    n_train: int = 10_000
    n_eval: int = 1000
    unit_norm: bool = False
    kappas: tuple[float, ...] | None = None


#: the rate-balancing variant's training setup (see the module docstring)
RATES_CONFIG = Config(
    steps=1000, eval_every=250, lr=1e-3, weight_lr=0.025, alpha=1.5, kappas=RATES_KAPPAS
)


def train_one(
    method: str, sigmas: Sequence[float], seed: int, config: Config = Config()
) -> tuple[Tensor, Tensor]:
    """Train one method on one seed. Returns the held-out ``L_i(t)/L_i(0)`` and the weights in
    use, both ``(E, T)`` at steps ``0, eval_every, ..., steps``."""
    c, tasks = config, len(sigmas)
    x_train, y_train = make_data(c.n_train, sigmas, seed, 1, c.unit_norm, c.kappas)
    x_eval, y_eval = make_data(c.n_eval, sigmas, seed, 2, c.unit_norm, c.kappas)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyNet(tasks)
    gradnorm = GradNorm(tasks, alpha=c.alpha, lr=c.weight_lr, record=False)
    bal = gradnorm if method == "gradnorm" else make(method, tasks=tasks, record=False)
    opt = torch.optim.Adam(net.parameters(), lr=c.lr, fused=True)
    g = torch.Generator().manual_seed(seed + 3)
    order, pos = torch.randperm(c.n_train, generator=g), 0
    ratios, weights, initial = [], [], None
    for step in range(c.steps + 1):
        if step % c.eval_every == 0 or step == c.steps:
            with torch.no_grad():
                held_out = torch.stack(task_losses(net, x_eval, y_eval)).double()
            initial = held_out if initial is None else initial
            ratios.append(held_out / initial)
            w = bal.weights if bal is gradnorm else bal.last_weights
            weights.append(torch.ones(tasks) if w is None else w.double().clone())
        if step == c.steps:
            break
        if pos + c.batch_size > c.n_train:
            order, pos = torch.randperm(c.n_train, generator=g), 0
        idx, pos = order[pos : pos + c.batch_size], pos + c.batch_size
        losses = task_losses(net, x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        bal.backward(losses, last_shared=net.last_shared)
        opt.step()
    return torch.stack(ratios), torch.stack(weights).double()


def _train_spec(spec: tuple[str, tuple[float, ...], int, Config]) -> tuple[Tensor, Tensor]:
    torch.set_num_threads(1)
    return train_one(*spec)


@dataclass
class GradNormSyntheticResult:
    """Per method, ``ratios[m]`` and ``weights[m]`` of shape ``(seeds, E, T)`` at ``steps``."""

    sigmas: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: Tensor
    config: Config
    ratios: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, method: str) -> Tensor:
        """Σ_i L_i(t)/L_i(0) per seed and evaluation step, ``(seeds, E)``."""
        return self.ratios[method].sum(-1)

    def final_metric(self, method: str) -> tuple[float, float]:
        """``(mean, std)`` over seeds of the final metric (std with Bessel's correction)."""
        v = self.metric(method)[:, -1]
        return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0

    def final_weights(self, method: str = "gradnorm") -> Tensor:
        """The final weights per task, averaged over seeds, ``(T,)``."""
        return self.weights[method][:, -1].mean(0)

    def final_spread(self, method: str) -> Tensor:
        """``log(max_i r_i / min_i r_i)`` of the final loss ratios, per seed ``(seeds,)``:
        0 when every task trained at the same rate."""
        final = self.ratios[method][:, -1]
        return (final.amax(-1) / final.amin(-1)).log()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_gradnorm_synthetic(
    sigmas: Sequence[float] = SIGMAS_10,
    seeds: int | Sequence[int] = 3,
    methods: Sequence[str] = ("equal", "gradnorm"),
    config: Config = Config(),
    workers: int | None = None,
    progress: bool = False,
) -> GradNormSyntheticResult:
    """Train every (method, seed); ``seeds`` is a count or the seeds. ``workers`` spawned
    processes of one torch thread each (default: CPU count, at most 2; ``1``: in this
    process); results do not depend on it."""
    if unknown := [m for m in methods if m not in METHODS]:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    variants = {m: (m, config) for m in methods}
    return _run_variants(variants, sigmas, seeds, config, workers, progress)


def run_rate_balance(
    seeds: int | Sequence[int] = 1,
    config: Config = RATES_CONFIG,
    workers: int | None = None,
    progress: bool = False,
) -> GradNormSyntheticResult:
    """The rate-balancing variant (module docstring): equal weighting, GradNorm with α = 0
    and GradNorm with ``config.alpha``, labelled as in :data:`RATE_VARIANTS`.

    Raises:
        ValueError: ``config`` has no ``kappas`` (it would train the paper's saturated tasks,
            one of them scaled by 10): start from ``RATES_CONFIG``.
    """
    if config.kappas is None:
        raise ValueError(
            "run_rate_balance needs config.kappas (one per task, e.g. RATES_KAPPAS); start "
            "from RATES_CONFIG: dataclasses.replace(RATES_CONFIG, steps=...)"
        )
    variants = {
        "equal": ("equal", config),
        "gradnorm α=0": ("gradnorm", replace(config, alpha=0.0)),
        "gradnorm": ("gradnorm", config),
    }
    return _run_variants(variants, RATES_SIGMAS, seeds, config, workers, progress)


def _run_variants(
    variants: dict[str, tuple[str, Config]],
    sigmas: Sequence[float],
    seeds: int | Sequence[int],
    config: Config,
    workers: int | None,
    progress: bool,
) -> GradNormSyntheticResult:
    """Train every (variant, seed): a variant is a label and its (method, config); the
    evaluation steps of ``config`` must be those of every variant."""
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    sigma_tuple = tuple(map(float, sigmas))
    specs = [(m, sigma_tuple, s, c) for m, c in variants.values() for s in seed_list]
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, workers)
    start, threads, runs = time.perf_counter(), torch.get_num_threads(), []
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else None
    try:
        with make_progress(progress, "gradnorm synthetic") as bar:
            task = bar.add_task("gradnorm synthetic", total=len(specs), info="")
            for run in pool.map(_train_spec, specs) if pool else map(_train_spec, specs):
                runs.append(run)
                bar.update(task, advance=1)
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.shutdown()
    steps = torch.tensor(sorted({*range(0, config.steps, config.eval_every), config.steps}))
    result = GradNormSyntheticResult(sigma_tuple, seed_list, steps, config)
    for i, label in enumerate(variants):
        chunk = runs[i * len(seed_list) : (i + 1) * len(seed_list)]
        result.ratios[label] = torch.stack([r for r, _ in chunk])
        result.weights[label] = torch.stack([w for _, w in chunk])
    result.seconds = time.perf_counter() - start
    return result


def format_table(result: GradNormSyntheticResult) -> Table:
    """Final metric (mean ± std over seeds) per method, then GradNorm's final weights vs σ_i."""
    table = Table("method / task", "Σ L_i/L_i(0) final", "σ_i", "GradNorm w_i")
    table.title = f"GradNorm synthetic, T={len(result.sigmas)}, {len(result.seeds)} seeds"
    for m in result.ratios:
        table.add_row(m, "{:.3f} ± {:.3f}".format(*result.final_metric(m)), "", "")
    if "gradnorm" in result.weights:
        for i, (s, w) in enumerate(zip(result.sigmas, result.final_weights().tolist())):
            table.add_row(f"task {i}", "", f"{s:g}", f"{w:.3f}")
    return table


def format_rate_table(result: GradNormSyntheticResult) -> Table:
    """Per variant: the final loss ratio of each task and GradNorm's weights (means over
    seeds), and the spread log(max r / min r) (mean ± std over seeds)."""
    kappas = result.config.kappas or (1.0,) * len(result.sigmas)
    tasks = [f"κ={k:g}" for k in kappas]
    table = Table("variant", *(f"r ({t})" for t in tasks), "spread", *(f"w ({t})" for t in tasks))
    table.title = (
        f"GradNorm rate balancing, T={len(result.sigmas)}, {len(result.seeds)} seed(s), "
        f"{result.config.steps} steps"
    )
    for label in result.ratios:
        spread = result.final_spread(label)
        std = float(spread.std()) if len(spread) > 1 else 0.0
        table.add_row(
            label,
            *(f"{r:.3f}" for r in result.ratios[label][:, -1].mean(0).tolist()),
            f"{float(spread.mean()):.3f} ± {std:.3f}",
            *(f"{w:.3f}" for w in result.final_weights(label).tolist()),
        )
    return table


def plot(result: GradNormSyntheticResult, path: str | Path) -> Path:
    """Save a PNG: the metric per method (mean over seeds), and GradNorm's weights per task.
    For the rate-balancing variant (``config.kappas`` set) the left panel is the spread
    log(max r / min r) of the loss ratios instead, and the tasks are named by κ_i."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig := Figure(figsize=(11, 4), layout="constrained"))
    left, right = fig.subplots(1, 2)
    kappas = result.config.kappas
    for m in result.ratios:
        if kappas is None:
            left.plot(result.steps, result.metric(m).mean(0), label=m)
        else:
            ratios = result.ratios[m]
            left.plot(result.steps, (ratios.amax(-1) / ratios.amin(-1)).log().mean(0), label=m)
    if kappas is None:
        left.set(xlabel="step", ylabel="Σ_i L_i(t) / L_i(0) (held out)", title="normalised loss")
    else:
        left.set(xlabel="step", ylabel="log(max r_i / min r_i)", title="spread of loss ratios")
    left.legend()
    if "gradnorm" in result.weights:
        weights = result.weights["gradnorm"].mean(0)
        for i in sorted(range(len(result.sigmas)), key=lambda i: result.sigmas[i]):
            name = f"σ = {result.sigmas[i]:g}" if kappas is None else f"κ = {kappas[i]:g}"
            right.plot(result.steps, weights[:, i], label=name)
        right.set_yscale("log")
        right.legend(fontsize="small", ncol=2)
    right.set(xlabel="step", ylabel="w_i (mean over seeds)", title="GradNorm weights")
    fig.suptitle("GradNorm (Chen et al., ICML 2018) synthetic problem")
    fig.savefig(path, dpi=100)
    return path
