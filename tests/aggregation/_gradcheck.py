"""Helpers shared by the gradient-method tests: an end-to-end check through the engine,
brute-force references, and the numerical scale used by the "no conflict" assertions."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from conftest import TinyNet, assert_same, batch, save_load, task_losses

#: small Jacobians with K = 1, identical, opposite, zero and all-zero task gradients.
DEGENERATE_JACOBIANS = [
    torch.tensor([[2.0, -1.0]]),
    torch.tensor([[1.0, 2.0], [1.0, 2.0]]),
    torch.tensor([[1.0, 2.0], [-1.0, -2.0]]),
    torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
    torch.zeros(3, 2),
]


def losses_and_features(num_tasks: int, seed: int) -> tuple[TinyNet, Tensor, list[Tensor]]:
    """A fresh TinyNet (shared body + linear heads), its features z and the K task losses."""
    model = TinyNet(num_tasks, seed)
    x, ys = batch(seed, num_tasks)
    z = torch.tanh(model.shared(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    return model, z, losses


def check_engine(
    balancer,
    weight_fn: Callable[[Tensor], Tensor],
    *,
    features: bool,
    num_tasks: int = 3,
    seed: int = 0,
) -> Tensor:
    """``balancer.backward`` on a TinyNet must fill the body's ``.grad`` with ``wᵀJ`` where
    ``w = weight_fn(G)``, computed here by hand with ``torch.autograd.grad``; each head gets
    its own loss's plain gradient. Returns the weights."""
    model, z, losses = losses_and_features(num_tasks, seed)
    body = list(model.shared.parameters())
    if features:
        rows = [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    else:
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, body, retain_graph=True)])
            for loss in losses
        ]
    jac = torch.stack(rows)
    expected_w = weight_fn((jac @ jac.T).double())
    direction = expected_w.to(jac.dtype) @ jac
    if features:
        expected = torch.autograd.grad(z, body, direction.view_as(z), retain_graph=True)
    else:
        sizes = [p.numel() for p in body]
        expected = [g.view_as(p) for g, p in zip(direction.split(sizes), body)]
    heads = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, model.heads)
    ]

    model2, z2, losses2 = losses_and_features(num_tasks, seed)
    if features:
        weights = balancer.backward(losses2, shared=model2.shared, features=z2)
    else:
        weights = balancer.backward(losses2, shared=model2.shared)
    assert weights is not None
    torch.testing.assert_close(weights.double(), expected_w, rtol=1e-4, atol=1e-6)
    for p, e in zip(model2.shared.parameters(), expected):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    for h, grads in zip(model2.heads, heads):
        for p, e in zip(h.parameters(), grads):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    return weights


def conflict_scale(jac: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``||g_j|| (Σ_k |w_k| ||g_k|| + K eps max ||g||)``: the rounding floor of ``g_j · d``."""
    n = np.linalg.norm(jac, axis=1)
    k = jac.shape[0]
    return n * (n @ np.abs(w) + k * np.finfo(float).eps * n.max())


def brute_min_norm(gram: np.ndarray) -> tuple[float, np.ndarray]:
    """min over the simplex of wᵀGw by enumerating every support and solving its KKT system."""
    k = gram.shape[0]
    best: tuple[float, np.ndarray] | None = None
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            m = np.zeros((r + 1, r + 1))
            m[:r, :r] = gram[np.ix_(s, s)]
            m[:r, r] = m[r, :r] = 1.0
            rhs = np.zeros(r + 1)
            rhs[r] = 1.0
            sol = np.linalg.lstsq(m, rhs, rcond=None)[0][:r]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            w = np.zeros(k)
            w[s] = np.clip(sol, 0, None)
            w /= w.sum()
            value = float(w @ gram @ w)
            if best is None or value < best[0]:
                best = (value, w)
    assert best is not None
    return best


def brute_box(gram: np.ndarray, u: np.ndarray) -> tuple[float, np.ndarray]:
    """min over v >= u of vᵀGv by enumerating the free set F: G_FF x_F = -(Gu)_F, x >= 0."""
    k = gram.shape[0]
    best: tuple[float, np.ndarray] | None = None
    for r in range(k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            v = u.astype(float).copy()
            if s:
                x = np.linalg.lstsq(gram[np.ix_(s, s)], -(gram @ u)[s], rcond=None)[0]
                if (x < -1e-12).any():
                    continue
                v[s] += np.clip(x, 0, None)
            value = float(v @ gram @ v)
            if best is None or value < best[0]:
                best = (value, v)
    assert best is not None
    return best


def adversarial_jacobians(seed: int = 0) -> list[np.ndarray]:
    """Random and adversarial Jacobians (K, P): nearly collinear, opposite, zero rows,
    duplicated rows, rank-deficient and wildly different norms (1e-6..1e6)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(6):
        k, p = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        base = rng.normal(size=(k, p))
        out.append(base)
        out.append(base[:1] + 1e-7 * rng.normal(size=(k, p)))  # nearly collinear
        opposite = base.copy()
        opposite[1] = -3.0 * opposite[0]
        out.append(opposite)
        zero = base.copy()
        zero[-1] = 0.0
        out.append(zero)
        dup = base.copy()
        dup[-1] = dup[0]
        out.append(dup)
        out.append(rng.normal(size=(k, 1)) @ rng.normal(size=(1, p)))  # rank one
        out.append(base * 10.0 ** rng.uniform(-6, 6, size=(k, 1)))  # norms 1e-6..1e6
    return out


def check_resume(fresh: Callable[[], tuple], split: int, total: int) -> dict:
    """Train ``total`` steps straight, and ``split`` steps + save/load + the rest; compare.

    ``fresh()`` returns a new ``(balancer, TinyNet, optimizer)``. The weights of every
    step, the model and the balancer's state must agree bit for bit. Returns the saved
    state (after ``torch.load(weights_only=True)``) for further checks.
    """

    def run(bal, model, opt, start: int, stop: int) -> list[Tensor]:
        out = []
        for step in range(start, stop):
            opt.zero_grad(set_to_none=True)
            out.append(bal.backward(task_losses(model, step), shared=model.shared).clone())
            opt.step()
        return out

    straight_bal, straight_model, opt = fresh()
    straight = run(straight_bal, straight_model, opt, 0, total)
    bal, model, opt = fresh()
    first = run(bal, model, opt, 0, split)
    saved = save_load({"bal": bal.state_dict(), "model": model.state_dict()})
    bal2, model2, opt2 = fresh()
    model2.load_state_dict(saved["model"])
    bal2.load_state_dict(saved["bal"])
    resumed = first + run(bal2, model2, opt2, split, total)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    assert_same(straight_model.state_dict(), model2.state_dict())
    assert_same(straight_bal.state_dict()["state"], bal2.state_dict()["state"])
    return saved


def cone_projection_brute_force(
    jac: np.ndarray, target: np.ndarray, rows: list[int] | None = None
) -> np.ndarray:
    """The projection of ``target`` onto ``{x : g_j · x >= 0 for j in rows}`` (all rows by
    default), found in the primal: for every set A of active constraints project onto
    ``{x : J_A x = 0}`` and keep the closest feasible point (the projection is the
    projection onto the span of its face)."""
    rows = list(range(jac.shape[0])) if rows is None else list(rows)
    scale = np.linalg.norm(jac, axis=1) * np.linalg.norm(target) + 1e-300
    best, best_dist = None, np.inf
    for r in range(len(rows) + 1):
        for active in itertools.combinations(rows, r):
            ja = jac[list(active)]
            x = target - ja.T @ (np.linalg.pinv(ja @ ja.T) @ (ja @ target)) if r else target
            feasible = (jac[rows] @ x >= -1e-9 * scale[rows]).all()
            if feasible and np.linalg.norm(x - target) < best_dist:
                best, best_dist = x, np.linalg.norm(x - target)
    assert best is not None
    return best


def cross_check_jacobians(
    seed: int, conflicts: dict[int, tuple[float, float]] | None = None
) -> list[np.ndarray]:
    """The Jacobians (K = 4, P = 7) a method is compared with a peer library on: random;
    conflicting (row i replaced by ``a · g_0 + s · noise`` for each ``i: (a, s)`` of
    ``conflicts``, default ``{1: (-2, 0.1)}``); collinear; a zero row; norms 1e-3..1e3."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(4, 7))
    conflicting = base.copy()
    for row, (along, noise) in (conflicts or {1: (-2.0, 0.1)}).items():
        conflicting[row] = along * base[0] + noise * rng.normal(size=7)
    collinear = rng.normal(size=(4, 1)) @ rng.normal(size=(1, 7))
    zero_row = base.copy()
    zero_row[2] = 0.0
    spread = base * np.array([[1e-3], [1e-1], [1e1], [1e3]])
    return [base, conflicting, collinear, zero_row, spread]
