"""M-ConFIG: ConFIG on per-task momenta, back-propagating one (or a few) losses per step.

Liu, Chen, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025, the momentum variant (official code tum-pbs/ConFIG,
``conflictfree.momentum_operator.PseudoMomentumOperator``). Each step back-propagates only
``per_step`` of the K losses, cycling through the tasks (step t: tasks ``t·n, ..., t·n+n-1``
mod K; see :meth:`~taskbalance.aggregation.base.GradientBalancer.task_subset`), and keeps
one Adam-like first moment per task:

    m_i ← β1 m_i + (1 − β1) g_i,   t_i ← t_i + 1       (sampled tasks i only)
    m̂_i = m_i / (1 − β1^{t_i}),    g_c = ConFIG(m̂_1, ..., m̂_K),

ConFIG's direction (:func:`taskbalance.aggregation.config.config_weights`) of the
bias-corrected momenta. Until every task has been back-propagated once the update is zero
(as in the official code). With ``adaptive=True`` (default, the paper's and the code's
M-ConFIG) the direction is then scaled per coordinate by a second moment of the pseudo
gradient that g_c implies (t = steps since every task was seen):

    f_t = g_c (1 − β1^t),   p = (f_t − β1 f_{t−1}) / (1 − β1),   s ← β2 s + (1 − β2) p²,
    d = g_c / (sqrt(s / (1 − β2^t)) + eps),

so, as the authors advise, the optimizer should be plain SGD. ``adaptive=False`` gives
``d = g_c``. Defaults: β1 = 0.9, β2 = 0.999, eps = 1e-8, one task per step. β1 = 0 with
every task each step and ``adaptive=False`` is ConFIG.

The recorded weights are ConFIG's weights w on the bias-corrected momenta (``g_c = wᵀM̂``):
non-zero for tasks not back-propagated in the step, whose momenta still enter g_c.
``task_specific="weighted"`` scales a sampled head's gradient by its w_i. The degenerate
cases of ConFIG are logged and counted in :attr:`MConFIG.degenerate_steps`.

``needs = "jacobian"``, exact mode only: the K×P momenta (state, in J's dtype) average
gradients over steps, which in the features mode (rows of one batch's examples) has no
meaning, as for DB-MTL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.aggregation.config import config_weights
from taskbalance.balancer import Tasks
from taskbalance.errors import BalancerUsageError, NonFiniteGradientError
from taskbalance.gradients import gramian as compute_gramian
from taskbalance.registry import register

logger = logging.getLogger("taskbalance")


def _copy(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.clone()


@register("m_config", "mconfig")
class MConFIG(GradientBalancer):
    """M-ConFIG (see the module docstring).

    Args:
        tasks: number of tasks or their names.
        per_step: losses back-propagated per step, cycling through the tasks (default 1).
        beta1: first-moment coefficient in [0, 1) (default 0.9).
        beta2: second-moment coefficient in [0, 1) (default 0.999), with ``adaptive``.
        eps: added to the root of the second moment (default 1e-8).
        adaptive: scale by the pseudo gradient's second moment (default True).
        pref_vector, rank_tol: as for :class:`~taskbalance.aggregation.config.ConFIG`.
    """

    needs = "jacobian"
    modes = ("exact",)
    guards_state = False  # the K×P momenta are committed only once the result is finite

    def __init__(
        self,
        tasks: Tasks,
        *,
        per_step: int = 1,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        adaptive: bool = True,
        pref_vector: Sequence[float] | Tensor | None = None,
        rank_tol: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(tasks, **kw)
        if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
            raise ValueError(f"per_step must be a positive int, got {per_step!r}")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.pref = self.preference_vector(pref_vector)
        if self.pref is not None and not bool((self.pref > 0).all()):
            raise ValueError(f"M-ConFIG's pref_vector must be positive, got {self.pref.tolist()}")
        self.per_step, self.beta1, self.beta2 = per_step, beta1, beta2
        self.eps, self.adaptive, self.rank_tol = float(eps), bool(adaptive), rank_tol
        self.m: Tensor | None = None  # (K, P) first moments
        self.counts = [0] * self.num_tasks  # t_i: times each task was back-propagated
        self.t = 0  # steps since every task was seen
        self.s: Tensor | None = None  # (P,) second moment of the pseudo gradient
        self.f: Tensor | None = None  # (P,) last g_c (1 - β1^t)
        self.degenerate_steps = 0

    def task_subset(self) -> list[int] | None:
        k = self.num_tasks
        n = min(self.per_step, k)  # per_step >= K: every task, every step
        return [(self.steps * n + j) % k for j in range(n)]

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        k, b1 = self.num_tasks, self.beta1
        subset = self.current_subset if self.current_subset is not None else list(range(k))
        m = self.m
        if m is not None and m.shape != jacobian.shape:
            raise BalancerUsageError(
                f"M-ConFIG keeps momenta of shape {tuple(m.shape)}, but this step's gradients "
                f"are {tuple(jacobian.shape)}: the shared parameters changed"
            )
        index = torch.tensor(subset, device=jacobian.device)
        rows = jacobian.index_select(0, index)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = self.tasks[subset[int((~finite).nonzero()[0])]]
            raise NonFiniteGradientError(
                f"the gradient of task {bad!r} is not finite; M-ConFIG's momenta are unchanged",
                task=bad,
            )
        rows = rows * (1.0 - b1)
        if m is not None:
            rows.add_(m.index_select(0, index).to(rows), alpha=b1)
        m = torch.zeros_like(jacobian) if m is None else m.to(jacobian)
        m = m.index_copy(0, index, rows)
        counts = [c + (i in subset) for i, c in enumerate(self.counts)]
        weights = torch.zeros(k, dtype=jacobian.dtype, device=jacobian.device)
        if 0 in counts:  # not every task seen yet: no update (the official code)
            direction, state = torch.zeros_like(jacobian[0]), (self.t, self.s, self.f, None)
        else:
            t = self.t + 1
            debias = torch.tensor([1.0 - b1**c for c in counts], dtype=jacobian.dtype)
            hats = m / debias.to(jacobian.device).unsqueeze(1)
            w, issues = config_weights(
                compute_gramian(hats).double(), self.pref, self.rank_tol, self.tasks
            )
            weights = w.to(jacobian.dtype)
            direction = weights @ hats
            s, f = self.s, self.f
            if self.adaptive:
                f_new = direction * (1.0 - b1**t)
                pseudo = (f_new - b1 * (f if f is not None else 0.0)) / (1.0 - b1)
                s = (1.0 - self.beta2) * pseudo.square() + (self.beta2 * s if s is not None else 0)
                s_hat = s / (1.0 - self.beta2**t)
                direction = direction / (s_hat.sqrt() + self.eps)
                f = f_new
            state = (t, s, f, "; ".join(issues) if issues else None)
        if bool(torch.isfinite(direction).all()) and bool(torch.isfinite(weights).all()):
            self.m, self.counts = m, counts  # committed only now: a raising step leaves no trace
            self.t, self.s, self.f, issue = state
            if issue is not None:
                self.degenerate_steps += 1
                logger.warning(
                    "M-ConFIG: step %d: %s (degenerate step %d)",
                    self.steps,
                    issue,
                    self.degenerate_steps,
                )
        return direction, weights

    def method_state(self) -> dict[str, Any]:
        return {
            "m": _copy(self.m),
            "counts": torch.tensor(self.counts, dtype=torch.int64),
            "t": self.t,
            "s": _copy(self.s),
            "f": _copy(self.f),
            "degenerate_steps": self.degenerate_steps,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.m, self.s, self.f = _copy(state["m"]), _copy(state["s"]), _copy(state["f"])
        self.counts = [int(c) for c in state["counts"]]
        self.t = int(state["t"])
        self.degenerate_steps = int(state["degenerate_steps"])
