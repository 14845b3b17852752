"""``tasks_per_step=m``: m of K tasks back-propagated per step (the Gramian methods).

The draws (size, uniformity, same on two balancers with one seed, after a checkpoint),
the step (zero weights and no head gradient for the unsampled tasks, the update equal to
the gradient of the weighted sum), the weights (the method on the m-task problem, hand-
checked for MGDA, UPGrad and PCGrad on two tasks), unbiasedness where the weights do not
depend on the gradients, every method that takes the option and every one that refuses it,
the misuses, and ``m = K`` as the ordinary step bit for bit.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections import Counter

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.aggregation.base import GradientBalancer
from taskbalance.registry import get, list_methods

#: the methods that take tasks_per_step < K, and the modes they are defined in
SUPPORTED = {
    "mgda": ("exact", "features"),
    "mgda_ub": ("features",),
    "upgrad": ("exact", "features"),
    "dualproj": ("exact", "features"),
    "cagrad": ("exact", "features"),
    "imtl": ("exact", "features"),
    "pcgrad": ("exact", "features"),
    "aligned_mtl": ("exact", "features"),
    "config": ("exact", "features"),
    "fairgrad": ("exact", "features"),
    "nash_mtl": ("exact", "features"),
}
#: the methods that refuse it, with the reason their message gives
REFUSED = {
    "sdmgrad_os": "samples the tasks itself",
    "m_config": "samples the tasks itself",
    "gradvac": "cosine targets are EMAs per pair",
    "pcd": "EMAs of the task gradients",
    "sdmgrad": "iterate carried across steps.*sdmgrad_os",
    "modo": "iterate over all K tasks",
    "cr_mogm": "averages the K weights across steps",
    "db_mtl": "needs the task Jacobian itself",
    "excess_mtl": "needs the task Jacobian itself",
    "graddrop": "needs the task Jacobian itself",
    "lr_annealing": "needs the task Jacobian itself",
    "metabalance": "needs the task Jacobian itself",
    "moco": "needs the task Jacobian itself",
}


class Net(nn.Module):
    """A shared body and one linear head per task."""

    def __init__(self, k: int, width: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.body(x)
        return z, [
            (head(z).squeeze(1) - y[:, i]).pow(2).mean() for i, head in enumerate(self.heads)
        ]


def data(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, generator=g), torch.randn(16, k, generator=g)


def step(bal: tb.Balancer, net: Net, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    z, losses = net.losses(x, y)
    if mode == "exact":
        weights = bal.backward(losses, shared=net.body)
    elif mode == "features":
        weights = bal.backward(losses, features=z)
    else:  # forked: each head reads its own view of z
        views = tb.fork(z, len(losses))
        losses = [
            (h(v).squeeze(1) - y[:, i]).pow(2).mean()
            for i, (h, v) in enumerate(zip(net.heads, views))
        ]
        weights = bal.backward(losses, features=views)
    assert weights is not None
    return weights


def sampled(weights: torch.Tensor) -> list[int]:
    return [i for i, w in enumerate(weights.tolist()) if w != 0.0]


# ---------------------------------------------------------------------- the draws
def test_each_step_samples_m_tasks_uniformly() -> None:
    """K = 6, m = 2, N = 600 steps. Each task is in S with probability 1/3: its count is
    Binomial(600, 1/3), sd 11.5; each of the 15 sets has probability 1/15, count sd 6.2.
    5 sd bounds (a false failure has probability about 1e-5 over the 21 counts; the draws
    are seeded, so the test is deterministic anyway)."""
    k, m, n = 6, 2, 600
    torch.manual_seed(0)
    net, (x, y) = Net(k), data(k)
    bal = tb.make("upgrad", tasks=k, tasks_per_step=m)
    per_task: Counter[int] = Counter()
    per_set: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        chosen = sampled(step(bal, net, x, y, "exact"))
        assert len(chosen) == m
        per_task.update(chosen)
        per_set[tuple(chosen)] += 1
    p = m / k
    for i in range(k):
        assert abs(per_task[i] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), per_task
    sets = math.comb(k, m)
    assert set(per_set) == set(itertools.combinations(range(k), m))
    for count in per_set.values():
        assert abs(count - n / sets) <= 5 * math.sqrt(n / sets * (1 - 1 / sets)), per_set


def test_unsampled_tasks_get_weight_zero_and_no_head_gradient() -> None:
    k, m = 5, 2
    torch.manual_seed(1)
    net, (x, y) = Net(k), data(k)
    bal = tb.make("mgda", tasks=k, tasks_per_step=m)
    returned = []
    for _ in range(4):
        weights = step(bal, net, x, y, "exact")
        chosen = sampled(weights)
        assert len(chosen) == m and weights.shape == (k,)
        for i, head in enumerate(net.heads):
            assert (head.weight.grad is not None) == (i in chosen)
        # the body's gradient is that of the weighted sum of the sampled losses
        _, losses = net.losses(x, y)
        total = sum(weights[i].item() * losses[i] for i in chosen)
        expected = torch.autograd.grad(total, list(net.body.parameters()))
        for p, e in zip(net.body.parameters(), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
        returned.append(weights)
    assert bal.history is not None
    recorded = bal.history.weights  # K columns, zeros for the unsampled tasks
    assert recorded.shape == (4, k)
    for row, weights in zip(recorded, returned):
        assert int((row != 0).sum()) == m
        torch.testing.assert_close(row, weights.to(row.dtype))


def test_two_balancers_with_one_seed_draw_the_same_sets_and_another_seed_does_not() -> None:
    k = 8
    torch.manual_seed(2)
    net, (x, y) = Net(k), data(k)
    a = tb.make("upgrad", tasks=k, tasks_per_step=3, tasks_seed=5)
    b = tb.make("upgrad", tasks=k, tasks_per_step=3, tasks_seed=5)
    c = tb.make("upgrad", tasks=k, tasks_per_step=3, tasks_seed=6)
    draws = [[sampled(step(bal, net, x, y, "exact")) for _ in range(10)] for bal in (a, b, c)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_a_resumed_run_draws_the_same_sets() -> None:
    k = 7
    torch.manual_seed(3)
    net, (x, y) = Net(k), data(k)
    whole = tb.make("pcgrad", tasks=k, tasks_per_step=3)
    expected = [step(whole, net, x, y, "exact") for _ in range(8)]
    first = tb.make("pcgrad", tasks=k, tasks_per_step=3)
    for _ in range(4):
        step(first, net, x, y, "exact")
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = tb.make("pcgrad", tasks=k, tasks_per_step=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [step(resumed, net, x, y, "exact") for _ in range(4)]
    for e, g in zip(expected[4:], got):
        assert torch.equal(e, g)


def test_micro_batches_of_an_accumulated_step_share_the_set() -> None:
    k = 6
    torch.manual_seed(4)
    net = Net(k)
    bal = tb.make("upgrad", tasks=k, tasks_per_step=2, accumulation_steps=3)
    for s in range(4):
        sets = []
        net.zero_grad(set_to_none=True)
        for micro in range(3):
            x, y = data(k, seed=10 * s + micro)
            _, losses = net.losses(x, y)
            sets.append(sampled(bal.backward(losses, shared=net.body)))
        assert sets[0] == sets[1] == sets[2] and len(sets[0]) == 2
        assert bal.steps == s + 1
        for i, head in enumerate(net.heads):
            assert (head.weight.grad is not None) == (i in sets[0])


# ---------------------------------------------------------------------- the weights
def conflicting_pair_problem(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses ``L_i = a_i·θ`` on a shared θ (gradients ``a_i``); every pair conflicts."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, generator=g, dtype=torch.float64)
    rows = [
        base * (1 if i % 2 == 0 else -0.6) + 0.5 * torch.randn(3, generator=g, dtype=torch.float64)
        for i in range(k)
    ]
    return torch.stack(rows), torch.zeros(3, dtype=torch.float64, requires_grad=True)


def two_task_weights(method: str, g1: torch.Tensor, g2: torch.Tensor) -> list[float]:
    """Hand-derived weights of two tasks (``c = g1·g2 < 0``)."""
    c, n1, n2 = float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)
    assert c < 0
    if method == "mgda":  # min-norm point of the segment: w1 = (n2 - c) / |g1 - g2|²
        w1 = min(max((n2 - c) / (n1 + n2 - 2 * c), 0.0), 1.0)
        return [w1, 1 - w1]
    # g1 projected onto g2·d >= 0 is g1 - (c/n2) g2, and g2's projection g2 - (c/n1) g1
    projections = [1 - c / n1, 1 - c / n2]
    if method == "upgrad":  # the mean of the two projections (p = 1/2 each)
        return [0.5 * p for p in projections]
    return projections  # pcgrad, reduction="sum": the sum of the projected gradients


@pytest.mark.parametrize(
    ("method", "per_task"), [("mgda", False), ("upgrad", False), ("pcgrad", True)]
)
def test_two_of_k_tasks_weights_match_the_hand_derived_two_task_weights(
    method: str, per_task: bool
) -> None:
    k, m = 4, 2
    a, theta = conflicting_pair_problem(k)
    bal = tb.make(method, tasks=k, tasks_per_step=m)
    for _ in range(5):
        losses = [a[i] @ theta for i in range(k)]
        theta.grad = None
        weights = bal.backward(losses, shared=[theta]).double()
        i, j = sampled(weights)
        if float(a[i] @ a[j]) >= 0:
            continue
        expected = torch.tensor(two_task_weights(method, a[i], a[j]), dtype=torch.float64)
        expected = expected * (k / m if per_task else 1.0)
        torch.testing.assert_close(weights[[i, j]], expected, rtol=1e-9, atol=1e-12)
        assert float(weights.sum() - weights[[i, j]].sum()) == 0.0


@pytest.mark.parametrize(
    "method", ["mgda", "upgrad", "nash_mtl", "cagrad", "aligned_mtl", "config"]
)
def test_weights_are_those_of_the_method_on_the_m_task_problem(method: str) -> None:
    """The m sampled tasks' weights are the method's own on the m-task Gramian (times K/m
    for the methods with per-task weights)."""
    k, m = 6, 3
    g = torch.Generator().manual_seed(8)
    a = torch.randn(k, 5, generator=g, dtype=torch.float64)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    # Nash-MTL's clip ||d|| <= max_norm acts on the update applied, after the K/m: off here
    options = {"max_norm": 0.0} if method == "nash_mtl" else {}
    bal = tb.make(method, tasks=k, tasks_per_step=m, **options)
    per_task = method in ("nash_mtl", "aligned_mtl", "config")
    for _ in range(3):
        theta.grad = None
        weights = bal.backward([a[i] @ theta for i in range(k)], shared=[theta]).double()
        chosen = sampled(weights)
        rows = a[chosen]
        reference = tb.make(method, tasks=m, **options).scaled_weights(
            rows @ rows.T, torch.zeros(m)
        )
        expected = reference.double() * (k / m if per_task else 1.0)
        torch.testing.assert_close(weights[chosen], expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    ("method", "scale"), [("upgrad", "mean"), ("dualproj", "mean"), ("pcgrad", "sum")]
)
def test_without_conflict_the_average_update_is_the_full_update(method: str, scale: str) -> None:
    """Non-conflicting gradients (positive entries): UPGrad and DualProj are the mean of
    the sampled gradients, PCGrad their sum times K/m; over N steps the average update is
    the full-K update (the mean, or the sum). The sample mean of m of K rows drawn without
    replacement has variance ``σ_j²/m · (K−m)/(K−1)`` per coordinate (σ_j² the population
    variance of column j); the average of N independent draws, that over N. Each of the 4
    coordinates must lie within 5 of its standard deviations."""
    k, m, n = 8, 3, 1500
    g = torch.Generator().manual_seed(9)
    a = torch.rand(k, 4, generator=g, dtype=torch.float64) + 0.1
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    bal = tb.make(method, tasks=k, tasks_per_step=m)
    total = torch.zeros(4, dtype=torch.float64)
    for _ in range(n):
        theta.grad = None
        weights = bal.backward([a[i] @ theta for i in range(k)], shared=[theta])
        share = 1.0 / m if scale == "mean" else k / m
        assert torch.allclose(
            weights[sampled(weights)].double(), torch.full((m,), share, dtype=torch.float64)
        )
        total += theta.grad
    average = total / n
    factor = 1.0 if scale == "mean" else float(k)  # the sum is K times the mean
    full = a.mean(dim=0) * factor
    var = a.var(dim=0, unbiased=False) / m * (k - m) / (k - 1) * factor**2
    bound = 5 * torch.sqrt(var / n)
    assert bool(((average - full).abs() <= bound).all()), (average, full, bound)


def test_a_preference_vector_is_restricted_to_the_set_on_the_m_task_scale() -> None:
    """UPGrad without conflict gives w = p: on S, p_S · K/m (so the update is unbiased for
    Σ p_i g_i)."""
    k, m = 5, 2
    pref = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    a = torch.rand(k, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64) + 0.1
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    bal = tb.make("upgrad", tasks=k, tasks_per_step=m, pref_vector=pref)
    for _ in range(4):
        theta.grad = None
        weights = bal.backward([a[i] @ theta for i in range(k)], shared=[theta]).double()
        chosen = sampled(weights)
        torch.testing.assert_close(weights[chosen], pref[chosen] * k / m)
    assert torch.equal(bal.pref, pref)


# ---------------------------------------------------------------------- the methods
def test_every_gradient_method_is_classified() -> None:
    gradient = [n for n in list_methods() if issubclass(get(n), GradientBalancer) or n == "cr_mogm"]
    assert sorted(gradient) == sorted([*SUPPORTED, *REFUSED])
    for name in SUPPORTED:
        assert get(name).sampling_refusal() is None


@pytest.mark.parametrize(
    ("method", "mode"),
    [(m, mode) for m, modes in SUPPORTED.items() for mode in modes] + [("upgrad", "forked")],
)
def test_every_supporting_method_trains_on_a_subset(method: str, mode: str) -> None:
    k, m = 5, 2
    torch.manual_seed(11)
    net, (x, y) = Net(k), data(k)
    bal = tb.make(method, tasks=k, tasks_per_step=m)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        weights = step(bal, net, x, y, mode)
        opt.step()
        chosen = sampled(weights)
        assert len(chosen) <= m and bool(torch.isfinite(weights).all())
        assert set(chosen) <= set(bal.current_subset or [])
        for i, head in enumerate(net.heads):
            if i not in (bal.current_subset or []):
                assert head.weight.grad is None
    assert bal.steps == 3


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_a_method_that_cannot_take_a_subset_refuses_it(method: str) -> None:
    with pytest.raises(
        tb.BalancerUsageError, match=rf"does not take tasks_per_step=2 < K=4: .*{REFUSED[method]}"
    ):
        tb.make(method, tasks=4, tasks_per_step=2)


@pytest.mark.parametrize("variant", ["l", "hybrid"])
def test_imtl_with_learnable_scales_refuses_a_subset(variant: str) -> None:
    with pytest.raises(
        tb.BalancerUsageError, match=r"IMTL\(variant=.*learnable loss scales.*variant='g'"
    ):
        tb.make("imtl", tasks=4, tasks_per_step=2, variant=variant)


def test_tasks_per_step_k_is_accepted_by_a_method_that_refuses_sampling() -> None:
    bal = tb.make("moco", tasks=4, tasks_per_step=4)
    assert bal.task_subset() is None


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "2"])
def test_a_bad_tasks_per_step_raises_with_the_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"tasks_per_step must be an int in 1\.\.4"):
        tb.make("upgrad", tasks=4, tasks_per_step=bad)


def test_a_bad_tasks_seed_raises() -> None:
    with pytest.raises(ValueError, match="tasks_seed must be an int"):
        tb.make("upgrad", tasks=4, tasks_per_step=2, tasks_seed="0")


def test_diagnostics_with_a_subset_is_refused() -> None:
    with pytest.raises(
        tb.BalancerUsageError, match=r"diagnostics= with tasks_per_step=2 < K=4 is refused"
    ):
        tb.make("upgrad", tasks=4, tasks_per_step=2, diagnostics=True)
    tb.make("upgrad", tasks=4, tasks_per_step=4, diagnostics=True)  # K: the ordinary step


@pytest.mark.parametrize("method", ["upgrad", "pcgrad", "nash_mtl"])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_m_equal_to_k_is_the_ordinary_step_bit_for_bit(method: str, mode: str) -> None:
    k = 4
    torch.manual_seed(12)
    net, (x, y) = Net(k), data(k)
    other = copy.deepcopy(net)
    plain = tb.make(method, tasks=k)
    full = tb.make(method, tasks=k, tasks_per_step=k)
    for _ in range(3):
        w1 = step(plain, net, x, y, mode)
        w2 = step(full, other, x, y, mode)
        assert torch.equal(w1, w2)
        for p, q in zip(net.parameters(), other.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert "tasks_per_step" not in repr(plain) and "tasks_per_step=4" in repr(full)


def test_nash_mtl_clips_the_update_applied_after_the_rescaling() -> None:
    """``max_norm`` bounds the norm of the update written to ``.grad`` (after the K/m)."""
    k, m = 6, 2
    a = 10 * torch.rand(k, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    bal = tb.make("nash_mtl", tasks=k, tasks_per_step=m, max_norm=0.5)
    for _ in range(4):
        theta.grad = None
        bal.backward([a[i] @ theta for i in range(k)], shared=[theta])
        assert float(theta.grad.norm()) <= 0.5 + 1e-9
        assert float(theta.grad.norm()) > 0.4  # these gradients are large: it does clip


def test_a_rank_that_takes_rank_0s_generators_draws_rank_0s_sets() -> None:
    """Under DDP the balancer's generators take rank 0's state at the first synchronised
    call (``Balancer.current_sync``); done here by hand, a balancer built with another
    ``tasks_seed`` then draws rank 0's sets (tests/distributed runs it on two ranks)."""
    k = 8
    torch.manual_seed(14)
    net, (x, y) = Net(k), data(k)
    rank0 = tb.make("upgrad", tasks=k, tasks_per_step=3, tasks_seed=0)
    rank1 = tb.make("upgrad", tasks=k, tasks_per_step=3, tasks_seed=1)
    for mine, theirs in zip(rank1._generators(), rank0._generators(), strict=True):
        mine.set_state(theirs.get_state())
    draws = [[sampled(step(bal, net, x, y, "exact")) for _ in range(6)] for bal in (rank0, rank1)]
    assert draws[0] == draws[1]
