"""DSelect-k: a mixture of experts whose per-task gates select at most ``k`` experts.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, "DSelect-k:
Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
Learning", NeurIPS 2021 (official code: google-research/google-research, ``dselect_k_moe``).

Experts ``f_1 .. f_n`` are MLPs on the input, as in :class:`~taskbalance.models.MMoE`; task
``t`` reads ``y_t = h_t(sum_i a_t,i f_i(x))`` through its own gate ``a_t``. A gate holds ``k``
*single-expert selectors*. With ``m = ceil(log2 n)`` bits, selector ``j`` has logits
``z_j in R^m`` and gives expert ``i`` (binary code ``b(i)``, most significant bit first)

    r_j(i) = prod_l  S(z_jl) if b(i)_l = 1  else  1 - S(z_jl),

where ``S`` is the smooth step (Hazimeh et al. 2020), ``C^1`` and flat outside ``[-γ/2, γ/2]``:

    S(t) = 0 (t <= -γ/2),   1 (t >= γ/2),   -2 t³/γ³ + 3 t/(2γ) + 1/2 otherwise.

``r_j`` is a distribution over the ``2^m`` codes; once every ``|z_jl| >= γ/2`` it is one-hot
(the selector has picked one expert). The gate mixes its selectors with learnable weights,
``a = sum_j softmax(w)_j r_j``, so it is non-negative, sums to 1 and has at most ``k``
non-zero entries once the selectors are saturated.

* **Static gates** (default; the paper's multi-task experiments): ``z`` ``(k, m)`` and ``w``
  ``(k,)`` are parameters of each task, the same for every example. **Per-example gates**
  (``per_example=True``): ``z = W_z x + c_z`` and ``w = W_w x + c_w``, per task.
* **Initialisation** as in the official code: ``z ~ U(-γ/100, γ/100)`` (every selector starts
  near ``S = 1/2``, all experts equally weighted), ``w`` (and the per-example layers'
  weights and biases) ``~ U(-0.05, 0.05)``.
* **Entropy regulariser** (the paper's device to speed up the selectors' convergence):
  ``λ sum_j H(r_j)`` with ``H(r) = -sum_i r_i log(r_i + 1e-6)`` pushes every selector to a
  single expert sooner.
  ``entropy_weight`` ``λ`` defaults to ``1e-6``, the official code's default (the paper tunes
  it). :meth:`DSelectK.gate_entropy` gives the unweighted ``sum_j H(r_j)`` per task.
* **``n`` not a power of 2**: ``2^m > n`` codes exist, and a selector may put mass on a code
  with no expert, so ``sum_i a_i < 1``. As in the official code, a penalty
  ``sum_j 1 / sum_{i < n} r_j(i)`` keeps the mass on real experts (it is ``k`` per task, its
  minimum, once every selector sits on one). The denominator is clamped at ``1e-6`` so that a
  selector saturated on a missing code gives a large finite penalty instead of ``inf``.

:meth:`DSelectK.regularization` returns ``λ sum_t sum_j H(r_tj)`` plus that penalty (summed
over tasks); add it to the training objective. It touches only the gates, which are
task-specific, so with a gradient balancer backpropagate it on its own: ``.grad`` adds up, so
``balancer.backward(losses, ...)`` then ``model.regularization().backward()`` (both before
``opt.step()``) is the same as adding it to the loss. Per-example gates: the entropy and the
penalty are averaged over the batch (the official code sums them, which ties ``λ`` to the
batch size).

Shapes: input ``(B, in_features)``; experts ``(B, n, D)``; static gate weights ``(n,)``,
per-example ``(B, n)``; output ``{task: (B, out_features[task])}``.

What is shared: the experts (``shared_parameters()``); each task's gate and tower are its
own (``task_parameters(t)``). ``features(x)`` is the expert output ``(B, n, D)``;
``heads(z, x)`` needs ``x`` only for per-example gates. ``heads(features(x), x) == forward(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taskbalance.balancer import Tasks
from taskbalance.models._layers import ExpertBank, OutFeatures, mlp, module_params, out_sizes

#: inside the entropy's logarithm, as in the official code.
ENTROPY_EPS = 1e-6
#: lower bound on a selector's mass on real experts in the reachability penalty.
REACH_EPS = 1e-6


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The smooth step ``S(t)``: 0 for ``t <= -γ/2``, 1 for ``t >= γ/2``, and the cubic
    ``-2 t³/γ³ + 3 t/(2γ) + 1/2`` in between (continuous with its first derivative)."""
    half = gamma / 2
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -half, torch.zeros_like(t), torch.where(t >= half, 1.0, cubic))


def binary_codes(num_experts: int) -> Tensor:
    """``(num_experts, m)`` bool: row ``i`` is ``i`` in binary, most significant bit first,
    with ``m = ceil(log2 num_experts)``."""
    m = math.ceil(math.log2(num_experts))
    bits = torch.arange(m - 1, -1, -1)
    return (torch.arange(num_experts).unsqueeze(1) >> bits) & 1 == 1


class DSelectKGate(nn.Module):
    """One DSelect-k gate: ``k`` single-expert selectors over ``num_experts`` experts.

    Args:
        num_experts: ``n >= 2``.
        k: number of selectors (the most experts the gate keeps), ``1 <= k <= n``.
        gamma: width ``γ > 0`` of the smooth step's cubic region.
        in_features: ``None`` for a static gate; the input width for a per-example gate.

    Attributes: ``z`` and ``w``: parameters ``(k, m)`` and ``(k,)`` (static) or
    :class:`torch.nn.Linear` layers to ``k m`` and ``k`` outputs (per example);
    ``codes``: buffer ``(n, m)``, the experts' binary codes.
    """

    codes: Tensor

    def __init__(
        self, num_experts: int, k: int, gamma: float = 1.0, in_features: int | None = None
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(
                f"DSelect-k needs at least 2 experts, got num_experts={num_experts}; with one "
                "expert there is nothing to select (use HardParameterSharing)"
            )
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"k must be between 1 and num_experts={num_experts}, got k={k}: k is the most "
                "experts each gate may select"
            )
        if not gamma > 0 or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a positive finite number, got {gamma}")
        self.num_experts = num_experts
        self.k = k
        self.gamma = float(gamma)
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)
        m = self.codes.shape[1]
        self.num_bits = m
        self.power_of_2 = num_experts == 2**m
        self.per_example = in_features is not None
        self.z: nn.Parameter | nn.Linear
        self.w: nn.Parameter | nn.Linear
        if in_features is None:
            self.z = nn.Parameter(torch.empty(k, m).uniform_(-gamma / 100, gamma / 100))
            self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        else:
            self.z = nn.Linear(in_features, k * m)
            self.w = nn.Linear(in_features, k)
            nn.init.uniform_(self.z.weight, -gamma / 100, gamma / 100)
            nn.init.uniform_(self.z.bias, -gamma / 100, gamma / 100)
            for p in self.w.parameters():
                nn.init.uniform_(p, -0.05, 0.05)

    def _logits(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(z, w)``: ``(k, m)`` and ``(k,)``, or ``(B, k, m)`` and ``(B, k)``."""
        if isinstance(self.z, nn.Linear) and isinstance(self.w, nn.Linear):
            if x is None:
                raise ValueError("a per-example DSelect-k gate needs the input x")
            return self.z(x).view(-1, self.k, self.num_bits), self.w(x)
        assert isinstance(self.z, Tensor) and isinstance(self.w, Tensor)
        return self.z, self.w

    def selector_outputs(self, x: Tensor | None = None) -> Tensor:
        """``r``: ``(k, n)`` (static) or ``(B, k, n)``; row ``j`` is selector ``j``'s mass on
        each expert (it sums to 1 over the ``2^m`` codes, so to at most 1 over the experts)."""
        z, _ = self._logits(x)
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # (..., k, 1, m)
        return torch.where(self.codes, s, 1 - s).prod(-1)

    def forward(self, x: Tensor | None = None) -> Tensor:
        """The gate weights ``a = sum_j softmax(w)_j r_j``: ``(n,)`` or ``(B, n)``."""
        _, w = self._logits(x)
        return (w.softmax(-1).unsqueeze(-1) * self.selector_outputs(x)).sum(-2)

    def entropy(self, x: Tensor | None = None) -> Tensor:
        """``sum_j H(r_j)`` with ``H(r) = -sum_i r_i log(r_i + 1e-6)`` (batch mean if per
        example)."""
        r = self.selector_outputs(x)
        h = -(r * torch.log(r + ENTROPY_EPS)).sum((-2, -1))
        return h.mean() if h.dim() else h

    def reachability_penalty(self, x: Tensor | None = None) -> Tensor:
        """``sum_j 1 / max(sum_{i<n} r_j(i), 1e-6)`` when ``n`` is not a power of 2, else 0
        (batch mean if per example)."""
        if self.power_of_2:
            return self.codes.new_zeros((), dtype=torch.get_default_dtype())
        r = self.selector_outputs(x)
        p = (1 / r.sum(-1).clamp_min(REACH_EPS)).sum(-1)
        return p.mean() if p.dim() else p


class DSelectK(nn.Module):
    """Mixture of ``num_experts`` MLP experts with one DSelect-k gate and one tower per task.

    Args:
        in_features: input width.
        tasks: number of tasks or their names.
        num_experts: number of experts ``n`` (at least 2).
        k: experts each gate may select (``1 <= k <= n``).
        gamma: smooth-step width ``γ`` (paper and official code: 1).
        expert_hidden: layer widths of each expert.
        tower_hidden: hidden widths of each tower.
        out_features: output width, for all tasks or per task name.
        per_example: gates that depend on the input (the paper's MTL experiments use
            static, per-task gates: the default).
        entropy_weight: ``λ`` of the entropy regulariser in :meth:`regularization`
            (official code's default ``1e-6``; 0 turns it off).

    Attributes: ``experts`` (:class:`~taskbalance.models._layers.ExpertBank`), ``gates``
    (``{task: DSelectKGate}``), ``towers``.
    """

    def __init__(
        self,
        in_features: int,
        tasks: Tasks,
        num_experts: int = 8,
        k: int = 2,
        gamma: float = 1.0,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (8,),
        out_features: OutFeatures = 1,
        per_example: bool = False,
        entropy_weight: float = 1e-6,
    ) -> None:
        super().__init__()
        if not entropy_weight >= 0 or not math.isfinite(entropy_weight):
            raise ValueError(
                f"entropy_weight must be a finite number >= 0, got {entropy_weight} "
                "(0 turns the entropy regulariser off)"
            )
        sizes = out_sizes(tasks, out_features)
        self.tasks: tuple[str, ...] = tuple(sizes)
        self.per_example = per_example
        self.entropy_weight = float(entropy_weight)
        self.experts = ExpertBank(num_experts, in_features, expert_hidden)
        routing = in_features if per_example else None
        self.gates = nn.ModuleDict(
            {t: DSelectKGate(num_experts, k, gamma, routing) for t in self.tasks}
        )
        width = self.experts.out_features
        self.towers = nn.ModuleDict({t: mlp(width, tower_hidden, n) for t, n in sizes.items()})

    def _input(self, x: Tensor | None, what: str) -> Tensor | None:
        if self.per_example and x is None:
            raise ValueError(f"DSelectK(per_example=True).{what} needs the input x for the gates")
        return x

    def gate_weights(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """``{task: (n,)}`` (static) or ``{task: (B, n)}`` (per example) gate weights."""
        x = self._input(x, "gate_weights(x)")
        return {t: gate(x) for t, gate in self.gates.items()}

    def gate_entropy(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """``{task: sum_j H(r_j)}``, the unweighted entropy of each gate's selectors."""
        x = self._input(x, "gate_entropy(x)")
        return {t: gate.entropy(x) for t, gate in self.gates.items()}

    def regularization(self, x: Tensor | None = None) -> Tensor:
        """``entropy_weight * sum_t gate_entropy_t`` plus, when ``n`` is not a power of 2,
        the reachability penalty of every gate: add it to the loss (module docstring)."""
        x = self._input(x, "regularization(x)")
        total = sum(
            (self.entropy_weight * g.entropy(x) + g.reachability_penalty(x))
            for g in self.gates.values()
        )
        assert isinstance(total, Tensor)
        return total

    def features(self, x: Tensor) -> Tensor:
        """The expert outputs ``(B, n, D)``."""
        return self.experts(x)

    def heads(self, z: Tensor, x: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs from :meth:`features`; per-example gates need the input ``x``."""
        x = self._input(x, "heads(z, x)")
        out = {}
        for t, tower in self.towers.items():
            a = self.gates[t](x)
            mixed = (
                (a.unsqueeze(-1) * z).sum(1) if a.dim() == 2 else torch.einsum("e,bed->bd", a, z)
            )
            out[t] = tower(mixed)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(x), x)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts."""
        return list(self.experts.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s gate and tower."""
        return module_params(self.gates[task], self.towers[task])
