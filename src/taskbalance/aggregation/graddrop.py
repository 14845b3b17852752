"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020. At every coordinate of the
task gradients ``g_i`` (rows of J) the positive sign purity

    P = ½ (1 + sum_i g_i / sum_i |g_i|)          (in [0, 1]; 1: all positive, 0: all negative)

decides which sign survives: with ``U ~ Uniform[0, 1)`` drawn per coordinate, the positive
components are kept where ``U < P`` and the negative ones elsewhere,
``M_i = [U < P][g_i > 0] + [U >= P][g_i < 0]``, and the update is

    d = sum_i (ℓ_i + (1 - ℓ_i) M_i) ∘ g_i

with leak ``ℓ_i`` in [0, 1] (default 0; ``ℓ_i = 1`` passes task i through untouched, the
paper's transfer-learning use). f(P) = P (the paper's default choice of f). Where all
tasks agree in sign, P is exactly 1 or 0 and the sum is kept exactly; a coordinate where
every g_i is 0 gets P = ½ (it contributes nothing). (The paper writes ``f(P) < U`` for the
negative mask; ``U >= P`` differs only on the null event U = P and never drops both signs.)

The paper applies GradDrop to the gradients at an activation layer, i.e. the features mode
(``backward(..., features=z)``); its Algorithm also multiplies by the sign of the
activations and sums over a separated batch dimension, which this per-coordinate version
does not do (the engine hands the method only J). The exact mode (``shared=``) applies the
same rule per parameter. ``needs = "jacobian"``.

There are no task weights: the recorded weight of task i is the fraction of its gradient
mass kept, ``||(ℓ_i + (1 - ℓ_i) M_i) ∘ g_i||_1 / ||g_i||_1`` (1 for a zero gradient), in
[0, 1]; keep the default ``task_specific="unweighted"`` (GradDrop acts on shared gradients
only; "weighted" would scale each head by that fraction). The uniforms come from the
balancer's own seeded CPU generator (state in ``state_dict()``), drawn in J's dtype and
moved to J's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance.aggregation.base import GradientBalancer
from taskbalance.balancer import Tasks
from taskbalance.registry import register


def sign_purity(jacobian: Tensor) -> Tensor:
    """``P = ½ (1 + sum_i g_i / sum_i |g_i|)`` per coordinate ``(P,)``; ½ where all are 0."""
    mass = jacobian.abs().sum(dim=0)
    ratio = jacobian.sum(dim=0) / torch.where(mass > 0, mass, torch.ones_like(mass))
    return 0.5 * (1.0 + ratio)


def graddrop(jacobian: Tensor, uniform: Tensor, leak: Tensor) -> tuple[Tensor, Tensor]:
    """``(direction (P,), kept fraction (K,))`` for uniforms ``(P,)`` and leaks ``(K,)``."""
    keep_positive = uniform < sign_purity(jacobian)
    mask = torch.where(keep_positive, jacobian > 0, jacobian < 0).to(jacobian.dtype)
    leak = leak.to(jacobian.dtype).unsqueeze(1)
    kept = (leak + (1.0 - leak) * mask) * jacobian
    total = jacobian.abs().sum(dim=1)
    fraction = kept.abs().sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    fraction = torch.where(total > 0, fraction, torch.ones_like(fraction))
    return kept.sum(dim=0), fraction


@register("graddrop")
class GradDrop(GradientBalancer):
    """Gradient sign dropout; see the module docstring.

    Args:
        tasks: number of tasks or their names.
        leak: leak ℓ in [0, 1], one value for all tasks or one per task (default 0).
        seed: seed of the balancer's own generator (the uniforms U).
        **kw: see :class:`~taskbalance.aggregation.base.GradientBalancer`.
    """

    needs = "jacobian"

    def __init__(
        self, tasks: Tasks, *, leak: float | Sequence[float] = 0.0, seed: int = 0, **kw: Any
    ) -> None:
        super().__init__(tasks, **kw)
        values = [float(leak)] * self.num_tasks if isinstance(leak, (int, float)) else leak
        self.leak = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.leak.shape != (self.num_tasks,):
            raise ValueError(f"leak needs one value or {self.num_tasks}, got {len(values)}")
        if not bool(((self.leak >= 0) & (self.leak <= 1)).all()):
            raise ValueError(f"leak must lie in [0, 1], got {self.leak.tolist()}")
        self.generator = torch.Generator().manual_seed(int(seed))

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        uniform = torch.rand(jacobian.shape[1], generator=self.generator, dtype=jacobian.dtype)
        return graddrop(jacobian, uniform.to(jacobian.device), self.leak.to(jacobian.device))

    def method_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
