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
    return 0.5 * (1.0 + jacobian.sum(dim=0) / torch.where(mass > 0, mass, torch.ones_like(mass)))


def graddrop(jacobian: Tensor, uniform: Tensor, leak: Tensor) -> tuple[Tensor, Tensor]:
    """``(direction (P,), kept fraction (K,))`` for uniforms ``(P,)`` and leaks ``(K,)``.

    No K×P mask is formed. With ``A = |J|``, the kept positive parts of the tasks sum to
    ``Σ_i c_i max(g_i, 0) = ½ (cᵀJ + cᵀA)`` and the negative ones to ``½ (cᵀJ − cᵀA)``
    (``c = 1 − ℓ``), so ``d = ℓᵀJ + ½ (cᵀJ + s ∘ cᵀA)`` with ``s = +1`` where the positive
    sign is kept (``U < P``) and ``−1`` elsewhere; and ``||M_i ∘ g_i||_1 = ½ (Σ_p A_ip +
    Σ_p J_ip s_p)``. J is read three times and ``A`` written once (instead of a dozen K×P
    temporaries); where every task agrees in sign, ``½(S ± M)`` is exactly the sum S.
    """
    dtype = jacobian.dtype
    leak = leak.to(dtype)
    absolute = jacobian.abs()
    column_sum, mass = jacobian.sum(dim=0), absolute.sum(dim=0)
    # U < P  <=>  (2U - 1) M < S  where the mass M > 0 (a coordinate with M = 0 has nothing
    # to keep); this also keeps every sign where all tasks agree (S = ±M, 0 <= U < 1)
    keep_positive = torch.addcmul(-mass, uniform.to(dtype), mass, value=2.0) < column_sum
    sign = keep_positive.to(dtype).mul_(2.0).sub_(1.0)  # +1: positive parts kept
    if bool((leak != 0).any()):
        passed, dropped = torch.stack([leak, 1.0 - leak]) @ jacobian  # ℓᵀJ, cᵀJ
        part = (1.0 - leak) @ absolute  # cᵀA
        direction = passed + 0.5 * torch.addcmul(dropped, sign, part)
    else:  # ½ (S ± M): exactly S where all tasks agree in sign
        direction = torch.addcmul(column_sum, sign, mass).mul_(0.5)
    # the same kernel for both: where every sign is kept, J_ip s_p = A_ip term by term and
    # the two sums are equal bit for bit (a kept fraction of exactly 1)
    total = torch.mv(absolute, torch.ones_like(sign))
    masked = 0.5 * (total + torch.mv(jacobian, sign))  # ||M_i ∘ g_i||_1
    kept = leak * total + (1.0 - leak) * masked
    safe = torch.where(total > 0, total, torch.ones_like(total))
    fraction = torch.where(total > 0, kept / safe, torch.ones_like(total))
    return direction, fraction


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
