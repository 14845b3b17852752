"""The two-objective toy of CAGrad, with the set-ups of the CAGrad and Nash-MTL papers.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (§5.1, Fig. 1; appendix): with θ = (θ1, θ2),

    f1 = log(max(|0.5(−θ1 − 7) − tanh(−θ2)|, 5e−6)) + 6,
    f2 = log(max(|0.5(−θ1 + 3) + tanh(−θ2) + 2|, 5e−6)) + 6,
    g1 = ((−θ1 + 7)² + 0.1(−θ2 − 8)²)/10 − 20,   g2 = ((−θ1 − 7)² + 0.1(−θ2 − 8)²)/10 − 20,
    c1 = max(tanh(θ2/2), 0),   c2 = max(tanh(−θ2/2), 0),   L_i = c1 f_i + c2 g_i.

This is the authors' code (``toy.py``), reused unchanged by Nash-MTL and FAMO: f2 has
``+ tanh(−θ2)`` (the papers print ``−``) and g1 is centred at θ1 = +7, g2 at θ1 = −7.

Pareto set. Where c1 = 0 the stationarity of ``λ L1 + (1 − λ) L2`` in θ1 gives
θ1 = 7(2λ − 1), so the set is the curve θ1 ∈ [−7, 7], θ2 = y*(θ1), y* minimising
``tanh(−y/2)((49 − θ1²)/10 − 20 + 0.01(y + 8)²)``: y*(0) = −8.3551 (the papers' −8.3552,
the balanced optimum, L1 = L2 = −15.0916) down to y*(±7) = −8.4345, where
min L_i = −19.9894. :func:`pareto_theta2` solves for y* by bisection.

Set-ups (both: Adam lr 1e-3 on θ alone, float32, one fresh balancer per start):

* ``toy_cagrad`` (CAGrad paper): starts (−8.5, 7.5), (−8.5, −5), (9, 9); 100 000 steps;
  CAGrad c = 0.5 with the code's rescaling by 1/(1 + c).
* ``toy_nashmtl`` (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
  Fig. 2): starts (−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5), (9, −1); 35 000 steps; L1
  multiplied by 0.1; the code's CAGrad c = 0.4 (rescaled by 1/(1 + c²)). FAMO (Liu et al.,
  NeurIPS 2023, Fig. 3) as its toy script: γ = 0, logit lr 0.025, ``min_losses`` (−2.1, −21).

Each step is a full-batch "epoch" (``end_period`` is called after it, for DWA). Methods
defined only in features mode (MGDA-UB) get ``z = θ·1`` as the shared representation.
Losses are negative, so methods that take logs or ratios of losses (GLS, DWA, GradNorm)
stop with :class:`~taskbalance.errors.NonPositiveLossError`; DTP has no KPI here.

Per-step cost. A run is 10⁵ steps per start on a 2-parameter model, so the per-step Python
overhead is the cost: the loss is one autograd node with a hand-derived Jacobian, Adam is a
two-line copy of ``torch.optim.Adam``, and methods whose step is the library's generic one
(:func:`takes_lean_path`) skip the gradient engine: their weights come from their own code
on ``J Jᵀ`` (:func:`_lean_step`), with results bit-identical to ``balancer.backward``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Balancer
from taskbalance.compare.problem import (
    BalancerFactory,
    ComparisonProblem,
    Metric,
    RunResult,
    Size,
    after_step,
    balanced_backward,
    register_problem,
)
from taskbalance.distributed import active_sync
from taskbalance.errors import NonFiniteGradientError
from taskbalance.history import History

TASKS = ("L1", "L2")
LOWER = 5e-6  #: the clamp inside the logarithms
PARETO_THETA2 = -8.3552  #: the papers' height of the Pareto set (exact at θ1 = 0: −8.35511)
FRONT_TOL = 0.1  #: :func:`front_distance` at most this means "on the front"
HISTORY_ROWS = 1000  #: rows kept of each start's balancer history
TRAJECTORY_POINTS = 500  #: points kept of each start's trajectory (extras)
CURVE_POINTS = 100  #: points of the loss curves (``epoch_losses``)


def toy_losses(theta: Tensor, scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """``(L1, L2)`` of the toy at ``theta`` ``(..., 2)``, shape ``(..., 2)``; L_i times scale_i.

    The formula of the module docstring, written with ``tanh(−θ2) = −tanh(θ2)`` shared.
    """
    x1, x2 = theta[..., 0], theta[..., 1]
    t = torch.tanh(-x2)
    a = -0.5 * x1
    u = torch.stack([a - 3.5 - t, a + 3.5 + t], dim=-1)  # 0.5(−θ1−7)−t, 0.5(−θ1+3)+t+2
    f = u.abs().clamp(min=LOWER).log() + 6.0
    g = torch.stack([x1 - 7.0, x1 + 7.0], dim=-1).square() / 10.0
    g = g + (0.01 * (x2 + 8.0).square() - 20.0).unsqueeze(-1)
    h = torch.tanh(0.5 * x2)
    losses = h.clamp(min=0.0).unsqueeze(-1) * f + (-h).clamp(min=0.0).unsqueeze(-1) * g
    if scale != (1.0, 1.0):
        losses = losses * losses.new_tensor(scale)
    return losses


def _losses_and_jacobian(theta: Tensor, scale: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """``(L (2,), dL/dθ (2, 2))`` at one CPU point ``theta`` ``(2,)``, derived by hand.

    With t = tanh(−θ2), u = (−θ1/2 − 3.5 − t, −θ1/2 + 3.5 + t), h = tanh(θ2/2):
    ∂f_i/∂u_i = 1/u_i where |u_i| >= 5e−6 (else 0), ∂u/∂θ1 = −1/2, ∂u/∂θ2 = ±(1 − t²);
    ∂g_i/∂θ1 = (θ1 ∓ 7)/5, ∂g_i/∂θ2 = 0.02(θ2 + 8); ∂c1/∂θ2 = (1 − h²)/2 where h >= 0,
    ∂c2/∂θ2 = −(1 − h²)/2 where h <= 0 (both at h = 0, as autograd's clamp). Computed in
    Python floats (double precision; a 2-vector is far below the cost of a tensor op) and
    returned in ``theta``'s dtype.
    """
    losses, jac = _toy_floats(*theta.tolist(), scale)
    return torch.tensor(losses, dtype=theta.dtype), torch.tensor(jac, dtype=theta.dtype)


def _toy_floats(
    x1: float, x2: float, scale: tuple[float, float]
) -> tuple[list[float], list[list[float]]]:
    """:func:`_losses_and_jacobian` in Python floats: ``([L1, L2], [[dL1/dθ], [dL2/dθ]])``."""
    t, h = math.tanh(-x2), math.tanh(0.5 * x2)
    c1, c2 = max(h, 0.0), max(-h, 0.0)
    dh = 0.5 * (1.0 - h * h)
    dc1, dc2 = (dh if h >= 0 else 0.0), (-dh if h <= 0 else 0.0)
    quad = 0.01 * (x2 + 8.0) ** 2 - 20.0
    losses, jac = [], []
    for sign, s in ((-1.0, scale[0]), (1.0, scale[1])):  # task 1: u = a − 3.5 − t, g at +7
        u = -0.5 * x1 + sign * (3.5 + t)
        f = math.log(max(abs(u), LOWER)) + 6.0
        df = 1.0 / u if abs(u) >= LOWER else 0.0
        d = x1 + sign * 7.0
        g = d * d / 10.0 + quad
        losses.append(s * (c1 * f + c2 * g))
        grad1 = c1 * df * -0.5 + c2 * d / 5.0
        grad2 = dc1 * f - c1 * df * sign * (1.0 - t * t) + dc2 * g + c2 * 0.02 * (x2 + 8.0)
        jac.append([s * grad1, s * grad2])
    return losses, jac


class _ToyLosses(torch.autograd.Function):
    """:func:`toy_losses` of one point as a single autograd node (hand-derived Jacobian):
    every per-task backward of a gradient method is then one small matrix product."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, scale: tuple[float, float]) -> Tensor:
        losses, jac = _losses_and_jacobian(theta.detach(), scale)
        ctx.save_for_backward(jac)
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (jac,) = ctx.saved_tensors
        return grad @ jac, None


def takes_lean_path(balancer: Any) -> bool:
    """Whether the toy may compute ``balancer``'s step without the gradient engine.

    True, without KPIs, gradient accumulation or DDP, for:

    * a gradient method whose step is the base class's unchanged (weights from the Gramian,
      ``d = wᵀJ``: MGDA, PCGrad, CAGrad, Nash-MTL, UPGrad, Aligned-MTL, GradVac, ...),
      defined in exact mode;
    * a loss-weighting method whose combined loss is the base class's ``Σ w_i L_i`` with no
      learnable parameter and no update after the step (equal weighting, RLW, DWA, ...).

    The others (IMTL and GradNorm, which override the step; GradDrop and DB-MTL, which need
    J itself; uncertainty weighting, FAMO, DTP, ...) take the engine's path.
    """
    cls = type(balancer)
    if (
        not isinstance(balancer, Balancer)
        or balancer.uses_kpi
        or balancer.accumulation_steps != 1
        or active_sync(balancer.distributed) is not None
    ):
        return False
    if isinstance(balancer, GradientBalancer):
        return (
            cls.needs == "gramian"
            and "exact" in cls.modes
            and _inherited(cls, GradientBalancer, ("backward", "_backward", "aggregate"))
            and _inherited(cls, GradientBalancer, ("scaled_weights", "gramian_weights"))
        )
    return (
        cls.kind == "loss"
        and not balancer.parameters()
        and not callable(getattr(balancer, "update", None))
        and _inherited(cls, Balancer, ("__call__", "backward", "combine"))
    )


def _inherited(cls: type, base: type, names: tuple[str, ...]) -> bool:
    """Whether ``cls`` uses ``base``'s own version of every method in ``names``."""
    return all(getattr(cls, name) is getattr(base, name) for name in names)


def _lean_step(balancer: Balancer, theta: Tensor, scale: tuple[float, float]) -> bool:
    """One step of a :func:`takes_lean_path` balancer at ``theta``: set ``theta.grad``.

    What ``balancer.backward(losses, shared=[theta])`` (or ``balancer(losses).backward()``)
    does on the toy, minus the per-step overhead of autograd and of the engine's checks of
    its arguments. The Jacobian J is the hand-derived one, which is also what autograd
    returns through :class:`_ToyLosses` (rows ``e_iᵀJ``). A gradient method gets the
    Gramian ``J Jᵀ`` in J's dtype, then float64, as from
    :func:`taskbalance.gradients.gramian`, and its weights from its own
    :meth:`~taskbalance.aggregation.base.GradientBalancer.scaled_weights`; a loss-weighting
    method its weights from its own ``compute_weights``. The step is recorded with
    :meth:`~taskbalance.balancer.Balancer.record_step` and the gradient is ``wᵀJ`` in J's
    dtype. Returns False (and does nothing) when a loss or J is not finite: the engine's
    path then handles the step (raising or skipping it as the balancer is configured).
    Non-finite weights of a gradient method raise
    :class:`~taskbalance.errors.NonFiniteGradientError`, as the engine does.
    """
    values, rows = _toy_floats(*theta.tolist(), scale)
    if not math.isfinite(sum(values) + sum(rows[0]) + sum(rows[1])):
        return False
    losses = torch.tensor(values, dtype=theta.dtype)
    jac = torch.tensor(rows, dtype=theta.dtype)
    balancer.last_step_skipped = False
    if isinstance(balancer, GradientBalancer):
        weights = balancer.scaled_weights((jac @ jac.T).double(), losses).to(jac.dtype)
        if not math.isfinite(float(weights.sum())):  # the engine's final check
            raise NonFiniteGradientError(
                f"{type(balancer).__name__} produced a non-finite update (weights "
                f"{weights.tolist()}) on the toy at theta={theta.tolist()}"
            )
        balancer.mode = "exact"
    else:
        weights = balancer.compute_weights(losses)
    balancer.record_step(losses, weights)
    theta.grad = weights.to(jac.dtype) @ jac
    return True


def pareto_theta2(theta1: Tensor) -> Tensor:
    """θ2 of the Pareto set above ``theta1`` (clamped to [−7, 7]), float64, by bisection.

    The root in [−9.5, −7.5] of the derivative of ``tanh(−y/2)(A + 0.01(y + 8)²)`` with
    ``A = (49 − θ1²)/10 − 20``; 60 halvings leave an error below 1e-17.
    """
    s = torch.as_tensor(theta1, dtype=torch.float64).clamp(-7.0, 7.0)
    a = (49.0 - s.square()) / 10.0 - 20.0
    lo, hi = torch.full_like(s, -9.5), torch.full_like(s, -7.5)
    for _ in range(60):
        y = 0.5 * (lo + hi)
        slope = -0.5 / torch.cosh(0.5 * y).square() * (a + 0.01 * (y + 8.0).square())
        slope = slope + torch.tanh(-0.5 * y) * 0.02 * (y + 8.0)
        lo, hi = torch.where(slope < 0, y, lo), torch.where(slope < 0, hi, y)
    return 0.5 * (lo + hi)


def front_distance(theta: Tensor) -> Tensor:
    """Distance of ``theta`` ``(..., 2)`` to the Pareto-set point ``(s, y*(s))``, s = clamp(θ1).

    An upper bound of the Euclidean distance to the set, and close to it: the set is nearly
    flat (|dy*/dθ1| < 0.03).
    """
    theta = torch.as_tensor(theta, dtype=torch.float64)
    s = theta[..., 0].clamp(-7.0, 7.0)
    return torch.hypot(theta[..., 0] - s, theta[..., 1] - pareto_theta2(s))


def first_on_front(path: Tensor, tol: float = FRONT_TOL) -> int | None:
    """Index of the first point of ``path`` ``(n, 2)`` within ``tol`` of the Pareto set
    (:func:`front_distance`), or None.

    The same as ``(front_distance(path) <= tol).nonzero()[0]``, without the bisection at
    every point of a 10⁵-step path: y* lies in the bisection's bracket [−9.5, −7.5], so a
    point whose θ2 is farther than ``tol`` from it is not on the front; the others are
    checked in order, a block at a time, up to the first hit.
    """
    theta2 = path[:, 1]
    maybe = ((theta2 >= -9.5 - tol) & (theta2 <= -7.5 + tol)).nonzero().flatten()
    for block in maybe.split(4096):
        hits = (front_distance(path[block]) <= tol).nonzero()
        if len(hits):
            return int(block[hits[0, 0]])
    return None


def on_front(theta: Tensor, tol: float = FRONT_TOL) -> Tensor:
    """Whether ``theta`` ``(..., 2)`` lies within ``tol`` of the Pareto set (front_distance)."""
    return front_distance(theta) <= tol


@functools.cache
def min_loss() -> float:
    """``min_θ L_i`` (unscaled, the same for both tasks): L1 at ``(7, y*(7))``, −19.9894."""
    corner = torch.stack([torch.tensor(7.0, dtype=torch.float64), pareto_theta2(7.0)])
    return float(toy_losses(corner)[0])


def balanced_distance(theta: Tensor) -> Tensor:
    """Euclidean distance of ``theta`` ``(..., 2)`` to the balanced optimum ``(0, y*(0))``."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    best = float(pareto_theta2(torch.tensor(0.0)))
    return torch.hypot(theta[..., 0], theta[..., 1] - best)


class _Adam:
    """``torch.optim.Adam`` (default betas and eps, no weight decay) for one tensor, minus
    the per-step Python overhead of the general optimizer (Kingma & Ba, ICLR 2015, Alg. 1)."""

    def __init__(self, param: Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(param), torch.zeros_like(param), 0

    @torch.no_grad()
    def step(self) -> None:
        grad, (b1, b2) = self.param.grad, self.betas
        if grad is None:  # a skipped step (nonfinite="skip_step"): torch's Adam skips too
            return
        self.t += 1
        self.m.lerp_(grad, 1.0 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (self.v.sqrt() / math.sqrt(1.0 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1.0 - b1**self.t))


@dataclass(frozen=True)
class ToySetup:
    """One published set-up: start points, steps, loss scale and method settings."""

    paper: str
    starts: tuple[tuple[float, float], ...]
    steps: int
    scale: tuple[float, float] = (1.0, 1.0)
    lr: float = 1e-3
    small_steps: int = 200
    #: constructor arguments by method (the paper's settings).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


class ParetoToy(ComparisonProblem):
    """The CAGrad two-objective toy under one published set-up (see the module docstring)."""

    setup: ClassVar[ToySetup]

    def __init__(self, size: Size = "full", *, lean: bool = True) -> None:
        """``lean=False``: every step through the engine (``balancer.backward``), for
        checking the lean path (:func:`takes_lean_path`), which gives the same results."""
        super().__init__(size)
        self.lean = bool(lean)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (
            Metric("L1_gap", "L1", higher_is_better=False),
            Metric("L2_gap", "L2", higher_is_better=False),
            Metric("L1_final", "L1", higher_is_better=False, in_delta_m=False),
            Metric("L2_final", "L2", higher_is_better=False, in_delta_m=False),
            Metric("front_reached", "L1", higher_is_better=True, in_delta_m=False),
            Metric("dist_balanced", "L1", higher_is_better=False, in_delta_m=False),
        )

    @property
    def default_epochs(self) -> int:
        return self.setup.steps if self.size == "full" else self.setup.small_steps

    def method_options(self, method: str) -> dict[str, Any]:
        return dict(self.setup.options.get(method, {}))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "starts": [list(s) for s in self.setup.starts]}

    def labels(self) -> list[str]:
        """Label of each start point (keys of ``histories`` and ``extras['starts']``)."""
        return [f"start{i + 1}" for i in range(len(self.setup.starts))]

    def trajectory(
        self, balancer: Any, start: tuple[float, float], steps: int, *, lean: bool | None = None
    ) -> Tensor:
        """Optimise θ from ``start`` for ``steps`` steps with ``balancer`` (Adam at the set-up's
        lr, loss scale of the set-up); return θ before every step and at the end,
        ``(steps + 1, 2)`` float32. :meth:`run` calls it once per start with a fresh
        balancer; a test can run one start, or any number of steps, the same way.

        ``lean`` (default: the problem's ``lean``): balancers that :func:`takes_lean_path`
        skip the gradient engine (see :func:`_lean_step`); ``lean=False`` sends every step
        through ``balancer.backward``. Both give the same trajectory bit for bit (tested).
        """
        lean = self.lean if lean is None else lean
        theta = nn.Parameter(torch.tensor(start, dtype=torch.float32))
        adam = _Adam(theta, self.setup.lr)
        features_only = "exact" not in getattr(balancer, "modes", ("exact",))
        fast = lean and takes_lean_path(balancer)
        path = torch.empty(steps + 1, 2)
        scale = self.setup.scale
        for step in range(steps):
            path[step] = theta.detach()
            theta.grad = None
            if fast and _lean_step(balancer, theta, scale):
                adam.step()
                balancer.end_period()
                continue
            z = theta * 1.0 if features_only else theta
            losses = _ToyLosses.apply(z, scale).unbind()
            feats = z if features_only else None
            balanced_backward(balancer, losses, [theta], feats, kpi=lambda ls=losses: self._kpi(ls))
            adam.step()
            after_step(balancer, lambda: list(_ToyLosses.apply(theta, scale).unbind()))
            balancer.end_period()
        path[steps] = theta.detach()
        return path

    def _kpi(self, losses: tuple[Tensor, ...]) -> dict[str, float]:
        """DTP's KPIs: ``exp(−(L_i − min L_i))`` (1 at the task's optimum), clamped at 1e-3."""
        floor = min_loss()
        return {
            task: min(max(math.exp(-(float(loss.detach()) - s * floor)), 1e-3), 1.0)
            for task, loss, s in zip(TASKS, losses, self.setup.scale)
        }

    def run(
        self, make_balancer: BalancerFactory, *, seed: int, epochs: int, progress: bool = False
    ) -> RunResult:
        """Optimise from every start with a fresh balancer; ``epochs`` = steps per start."""
        steps = int(epochs)
        if steps < 1:
            raise ValueError(f"epochs (steps) must be positive, got {epochs}")
        trajectories, histories, seconds = [], {}, 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for label, start in zip(self.labels(), self.setup.starts):
                if progress:
                    print(f"{self.name}: {label} {start}, {steps} steps", flush=True)
                balancer = make_balancer()
                begin = time.perf_counter()
                trajectories.append(self.trajectory(balancer, start, steps))
                seconds += time.perf_counter() - begin
                if balancer.history is not None:
                    histories[label] = _thin_history(balancer.history, HISTORY_ROWS)
        return self._result(
            torch.stack(trajectories), histories, seconds / steps / len(trajectories)
        )

    def _result(self, paths: Tensor, histories: dict[str, History], step_time: float) -> RunResult:
        """Metrics, curves and extras from the trajectories ``(starts, steps+1, 2)``."""
        steps = paths.shape[1] - 1
        finals = paths[:, -1].double()
        final_losses = toy_losses(finals, self.setup.scale)
        floor = torch.tensor(self.setup.scale, dtype=torch.float64) * min_loss()
        front = front_distance(finals)
        balance = balanced_distance(finals)
        at = torch.linspace(0, steps - 1, min(CURVE_POINTS, steps)).round().long()
        curve = toy_losses(paths[:, at].double(), self.setup.scale).mean(dim=0)
        keep = torch.linspace(0, steps, min(TRAJECTORY_POINTS, steps + 1)).round().long()
        starts = {}
        for i, label in enumerate(self.labels()):
            starts[label] = {
                "start": list(self.setup.starts[i]),
                "theta": finals[i].tolist(),
                "losses": final_losses[i].tolist(),
                "losses_unscaled": toy_losses(finals[i]).tolist(),
                "front_distance": float(front[i]),
                "front_reached": bool(front[i] <= FRONT_TOL),
                "first_front_step": first_on_front(paths[i]),
                "dist_balanced": float(balance[i]),
                "trajectory": paths[i, keep].tolist(),
            }
        gap = (final_losses - floor).mean(dim=0)
        metrics = {
            "L1_gap": float(gap[0]),
            "L2_gap": float(gap[1]),
            "L1_final": float(final_losses[:, 0].mean()),
            "L2_final": float(final_losses[:, 1].mean()),
            "front_reached": float((front <= FRONT_TOL).sum()),
            "dist_balanced": float(balance.mean()),
        }
        extras = {
            "setup": self.name,
            "scale": list(self.setup.scale),
            "front_tol": FRONT_TOL,
            "trajectory_steps": keep.tolist(),
            "curve_steps": at.tolist(),
            "starts": starts,
        }
        return RunResult(
            metrics=metrics,
            epoch_losses={t: curve[:, j].tolist() for j, t in enumerate(TASKS)},
            step_time=step_time,
            steps=steps,
            histories=histories,
            extras=extras,
        )

    def plot_comparison(self, results: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
        """Trajectories over the loss contours, one panel per method; and in loss space."""
        from taskbalance.problems.pareto_toy_plot import plot_toy_comparison

        return plot_toy_comparison(self, results, Path(out_dir))


def _thin_history(history: History, rows: int) -> History:
    """A copy of ``history`` keeping about ``rows`` evenly spaced steps (first and last kept)."""
    n = len(history)
    if n <= rows:
        return history
    keep = torch.linspace(0, n - 1, rows).round().long()
    steps = history.steps
    thin = History(history.tasks)
    thin.load_state_dict(
        {
            "steps": [steps[i] for i in keep.tolist()],
            "losses": history.losses[keep],
            "weights": history.weights[keep],
            "extras": {name: history.extra(name)[keep] for name in history.extra_names},
        }
    )
    return thin


@register_problem
class CAGradToy(ParetoToy):
    name = "toy_cagrad"
    description = (
        "CAGrad (NeurIPS 2021) two-objective toy: 3 starts, Adam 1e-3, 100k steps; "
        "CAGrad (c=0.5) should reach the balanced optimum, equal weighting stall"
    )
    setup = ToySetup(
        paper="CAGrad (Liu et al., NeurIPS 2021)",
        starts=((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)),
        steps=100_000,
        options={
            "cagrad": {"c": 0.5, "rescale": "1+c"},
            "famo": {"gamma": 0.0, "lr": 0.025, "min_losses": (-21.0, -21.0)},
        },
    )


@register_problem
class NashMTLToy(ParetoToy):
    name = "toy_nashmtl"
    description = (
        "Nash-MTL (ICML 2022) version of the CAGrad toy: 5 starts, L1 x 0.1, Adam 1e-3, "
        "35k steps; Nash-MTL should reach the front balanced from every start"
    )
    setup = ToySetup(
        paper="Nash-MTL (Navon et al., ICML 2022)",
        starts=((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
        steps=35_000,
        scale=(0.1, 1.0),
        options={
            "cagrad": {"c": 0.4, "rescale": "1+c^2"},
            "famo": {"gamma": 0.0, "lr": 0.025, "min_losses": (-2.1, -21.0)},
            "uncertainty": {"lr": 0.025},
        },
    )
