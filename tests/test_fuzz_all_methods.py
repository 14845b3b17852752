"""Property / fuzz tests run on EVERY registered method (``taskbalance.list_methods()``).

Each (method, case[, mode]) is one test; hypothesis draws the number of tasks K (1..16),
loss scales over 12 orders of magnitude, the data and the dtype details. The contract
checked on every draw: either a finite result (weights finite and of shape ``(K,)``,
every filled model ``.grad`` finite, the combined loss finite) or one of the documented
outcomes :class:`~taskbalance.errors.NonPositiveLossError` (only for the methods documented
to need positive losses, and only when a loss is <= 0) or
:class:`~taskbalance.errors.SolverError` (only for the (method, case, mode) listed in
:data:`DOCUMENTED_SOLVER_ERRORS`, where the method documents it; anywhere else it fails the
test, since a method that always raised would otherwise pass every case). Never NaN weights,
never another TaskBalanceError for this valid usage, never an exception from deep inside
torch / numpy (``RuntimeError``, ``LinAlgError``, plain ``ValueError``,
``ZeroDivisionError``, ...).

Cases:

* ``random``: ordinary regression losses, each multiplied by 10^u, u in [-6, 6].
* ``float64``: the same with a float64 model and data.
* ``bfloat16``: the same with a bfloat16 model and data (scales 10^-2..10^2: bf16 holds
  3 significant digits, and a squared error times 1e6 overflows nothing but rounds away).
* ``zero_loss``: some tasks have a loss of exactly 0 (``0 * head(z).sum()``).
* ``zero_grad``: some tasks have a positive loss with an exactly zero gradient.
* ``identical``: every task has the very same loss and gradient.
* ``opposite``: task gradients are +g or -g (positive losses).
* ``collinear``: task gradients are scaled copies of g plus a perturbation of 1e-9..1e-3.
* ``nonfinite_raise``: one task loss is NaN / +inf / -inf; default policy must raise
  :class:`~taskbalance.errors.NonFiniteLossError`.
* ``nonfinite_skip``: same with ``nonfinite="skip_step"``: a zero loss / ``None`` and
  ``.grad`` left untouched.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import taskbalance as tb
from taskbalance.errors import NonFiniteLossError, NonPositiveLossError, SolverError

METHODS = tb.list_methods()
#: Gramian methods also run with ``tasks_per_step=ceil(K/2)`` (half the tasks per step)
SAMPLED = ["upgrad/half", "pcgrad/half", "config/half", "aligned_mtl/half", "nash_mtl/half"]

#: methods documented to need strictly positive losses (NonPositiveLossError otherwise).
POSITIVE_ONLY = {"famo", "gls", "dwa", "db_mtl", "gradnorm", "si", "relobralo", "stch"}

FINITE_CASES = (
    "random",
    "float64",
    "bfloat16",
    "zero_loss",
    "zero_grad",
    "identical",
    "opposite",
    "collinear",
)
NONFINITE_CASES = ("nonfinite_raise", "nonfinite_skip")
CASES = FINITE_CASES + NONFINITE_CASES

HIDDEN = 4
IN = 5
BATCH = 6

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: (method, case, mode) -> reason, for known failures (strict xfail).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}

#: (method, case, mode) -> where the method documents a SolverError (a solver that fails
#: with no fallback) on that case. docs/robustness.md: none occurs on these cases, so the
#: table is empty and any SolverError here is a failure.
DOCUMENTED_SOLVER_ERRORS: dict[tuple[str, str, str], str] = {}


def modes_of(method: str) -> tuple[str, ...]:
    cls = tb.get(method.split("/")[0])
    if cls.kind == "loss":
        return ("loss",)
    modes = getattr(cls, "modes", None)
    if modes is None:  # GradNorm: shared= (exact) or features=
        return ("exact", "features")
    return tuple(modes)


def _params() -> list[Any]:
    params = []
    for method in METHODS + SAMPLED:
        for case in CASES:
            for mode in modes_of(method):
                marks = []
                reason = KNOWN_FAILURES.get((method, case, mode))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                params.append(
                    pytest.param(method, case, mode, marks=marks, id=f"{method}-{case}-{mode}")
                )
    return params


class Net(nn.Module):
    """A shared Linear body and K linear heads."""

    def __init__(self, k: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Linear(IN, HIDDEN).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1).to(dtype) for _ in range(k))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))


def make_balancer(method: str, k: int, nonfinite: str, seed: int) -> tb.Balancer:
    kw: dict[str, Any] = {"nonfinite": nonfinite}
    if method.endswith("/half"):
        method, kw["tasks_per_step"] = method.split("/")[0], (k + 1) // 2
    cls = tb.get(method)
    if method == "static":
        gen = torch.Generator().manual_seed(seed)
        kw["weights"] = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.1).tolist()
    return cls(k, **kw)


def build_losses(
    net: Net, case: str, data: st.DataObject, step: int, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This step's task losses (each with a graph) and the shared representation z."""
    k = len(net.heads)
    dtype = net.body.weight.dtype
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    x = torch.randn(BATCH, IN, generator=gen, dtype=dtype)
    y = torch.randn(BATCH, k, generator=gen, dtype=dtype)
    z = torch.tanh(net.body(x))
    outs = [head(z).squeeze(-1) for head in net.heads]
    exps = data.draw(
        st.lists(st.floats(-6, 6), min_size=k, max_size=k), label=f"log10 scales, step {step}"
    )
    scales = [10.0**e for e in exps]
    mse = [((out - y[:, i]) ** 2).mean() for i, out in enumerate(outs)]

    if case == "bfloat16":
        scales = [10.0 ** (e / 3) for e in exps]
    if case in ("random", "float64", "bfloat16") or case.startswith("nonfinite"):
        losses = [s * m for s, m in zip(scales, mse)]
    elif case in ("zero_loss", "zero_grad"):
        chosen = data.draw(
            st.lists(st.booleans(), min_size=k, max_size=k).filter(any), label="which tasks"
        )
        losses = []
        for i, (s, m) in enumerate(zip(scales, mse)):
            if chosen[i]:
                zero = 0 * outs[i].sum()
                losses.append(zero if case == "zero_loss" else zero + s)
            else:
                losses.append(s * m)
    elif case == "identical":
        # every head is a copy of head 0 (see run_case) and every task has target 0
        losses = [((out - y[:, 0]) ** 2).mean() * scales[0] for out in outs]
    elif case == "opposite":
        # heads are copies of head 0: the shared gradients are exactly +g or -g
        signs = data.draw(
            st.lists(st.sampled_from([-1.0, 1.0]), min_size=k, max_size=k), label="signs"
        )
        if k >= 2:
            signs[0], signs[1] = 1.0, -1.0
        offset = float(outs[0].detach().mean().abs()) * 2 + 1.0
        losses = [scales[0] * (offset + s * out.mean()) for s, out in zip(signs, outs)]
    elif case == "collinear":
        # heads are head 0 plus a perturbation of 1e-9..1e-3 (see run_case)
        losses = [s * (((out - y[:, 0]) ** 2).mean() + 1.0) for s, out in zip(scales, outs)]
    else:  # pragma: no cover
        raise AssertionError(case)

    if case.startswith("nonfinite"):
        bad = data.draw(st.integers(0, k - 1), label="non-finite task")
        value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
        losses[bad] = losses[bad] * 0 + value  # keeps the graph
    return losses, z


def one_step(
    bal: tb.Balancer, method: str, mode: str, net: Net, losses: list[torch.Tensor], z: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run one training step; return (weights or None, combined loss or None)."""
    k = len(net.heads)
    ctx: dict[str, Any] = {}
    if method == "dtp":
        ctx["kpi"] = [0.3 + 0.6 * i / max(k - 1, 1) for i in range(k)]
    if mode == "loss":
        total = bal(losses, **ctx)
        if bal.last_step_skipped:
            return None, total
        total.backward()
        return bal.last_weights, total
    kw: dict[str, Any] = {"shared": net.body}
    if mode == "features":
        kw["features"] = z
    return bal.backward(losses, **kw, **ctx), None


def assert_finite_step(
    weights: torch.Tensor | None, total: torch.Tensor | None, net: Net, k: int
) -> None:
    assert weights is not None
    assert weights.shape == (k,), weights.shape
    assert bool(torch.isfinite(weights).all()), f"non-finite weights {weights}"
    if total is not None:
        assert bool(torch.isfinite(total.detach()).all()), f"non-finite loss {total}"
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), f"non-finite .grad of {name}: {p.grad}"


def run_case(method: str, case: str, mode: str, data: st.DataObject) -> str:
    """Draw one example and run it; return the outcome ("finite" or the exception name)."""
    k = data.draw(st.integers(1, 16), label="K")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    steps = data.draw(st.integers(1, 3), label="steps")
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    nonfinite = "skip_step" if case == "nonfinite_skip" else "raise"
    net = Net(k, seed, dtype)
    if case in ("identical", "opposite", "collinear"):
        eps = 10.0 ** data.draw(st.floats(-9, -3), label="log10 perturbation")
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for head in net.heads[1:]:
                for p, p0 in zip(head.parameters(), net.heads[0].parameters()):
                    p.copy_(p0)
                    if case == "collinear":
                        p.add_(eps * torch.randn(p.shape, generator=gen, dtype=dtype))
    bal = make_balancer(method, k, nonfinite, seed)

    for step in range(steps):
        net.zero_grad(set_to_none=True)
        losses, z = build_losses(net, case, data, step, seed)
        if case == "nonfinite_raise":
            with pytest.raises(NonFiniteLossError):
                one_step(bal, method, mode, net, losses, z)
            return "NonFiniteLossError"
        if case == "nonfinite_skip":
            # .grad must be left untouched: fill a sentinel first
            for p in net.parameters():
                p.grad = torch.full_like(p, 7.0)
            steps_before = bal.steps
            weights, total = one_step(bal, method, mode, net, losses, z)
            assert weights is None
            assert bal.last_step_skipped
            assert bal.steps == steps_before
            if total is not None:
                assert float(total.detach()) == 0.0
                total.backward()  # a zero loss connected to nothing
            for name, p in net.named_parameters():
                assert torch.equal(p.grad, torch.full_like(p, 7.0)), f".grad of {name} changed"
            return "skipped"
        try:
            weights, total = one_step(bal, method, mode, net, losses, z)
        except NonPositiveLossError:
            assert method in POSITIVE_ONLY, f"{method} is not documented to need positive losses"
            stacked = torch.stack([loss.detach() for loss in losses])
            assert bool((stacked <= 0).any()), f"NonPositiveLossError with losses {stacked}"
            return "NonPositiveLossError"
        except SolverError as err:
            if (method, case, mode) not in DOCUMENTED_SOLVER_ERRORS:
                raise AssertionError(
                    f"{method} ({mode} mode) raised {type(err).__name__} on the valid "
                    f"{case!r} case, where no SolverError is documented: {err}"
                ) from err
            return f"SolverError: {err}"
        assert_finite_step(weights, total, net, k)
    return "finite"


@pytest.mark.parametrize(("method", "case", "mode"), _params())
@SETTINGS
@given(data=st.data())
def test_method_on_case(method: str, case: str, mode: str, data: st.DataObject) -> None:
    run_case(method, case, mode, data)


def test_every_method_is_covered() -> None:
    assert {p.values[0] for p in _params()} == set(tb.list_methods() + SAMPLED)


def test_an_undocumented_solver_error_fails_the_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract is not vacuous: MGDA broken to raise SolverError on every call fails."""

    def always_fails(self: tb.Balancer, gramian: torch.Tensor, losses: torch.Tensor) -> None:
        raise SolverError("the solver gave up")

    monkeypatch.setattr(tb.get("mgda"), "weights_from_gramian", always_fails)

    @settings(max_examples=1, deadline=None, derandomize=True, database=None)
    @given(data=st.data())
    def mgda_random_exact(data: st.DataObject) -> None:
        run_case("mgda", "random", "exact", data)

    with pytest.raises(AssertionError, match=r"mgda \(exact mode\) raised SolverError on the"):
        mgda_random_exact()


def test_documented_solver_errors_name_real_cases() -> None:
    real = {(p.values[0], p.values[1], p.values[2]) for p in _params()}
    assert set(DOCUMENTED_SOLVER_ERRORS) <= real
