"""Gradient Vaccine (Wang et al., ICLR 2021): EMA cosine targets, coefficient space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _gradcheck import check_engine, check_resume, losses_and_features
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.gradvac import GradVac, gradvac_coefficients
from taskbalance.aggregation.pcgrad import pcgrad_coefficients, visiting_orders

ONES = torch.ones(8, dtype=torch.float64)


def direct_gradvac(
    jac: np.ndarray,
    targets: np.ndarray,
    orders: np.ndarray,
    beta: float,
    ema: str = "always",
    condition: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 1 of the paper on the vectors themselves: the g_i^PC, their coefficients and
    the new targets. A zero vector has no cosine; a target is capped at 1 - 1e-12.

    ``condition`` (K×K), if given, receives for every visited pair the amplification of
    rounding in its cosine when it is computed from the Gramian, as the coefficient-space
    code does: the Gramian entries behind ``g_i^PC · g_j`` are of size
    ``Σ_k |C_ik| ||g_k||``, the dot is divided by ``||g_i^PC||``, and every earlier
    adjustment of row i divided the carried norm by ``sin φ``. A cosine of a g_i^PC that
    nearly cancelled (possible in 2 dimensions) is only known to ``eps · condition``."""
    out, coef, targets = jac.astype(np.float64).copy(), np.eye(len(jac)), targets.copy()
    row_norms = np.linalg.norm(jac, axis=1)
    for i in range(jac.shape[0]):
        amplification = 1.0
        for j in orders[i]:
            ni, nj = np.linalg.norm(out[i]), np.linalg.norm(jac[j])
            if ni == 0.0 or nj == 0.0:
                continue
            cos = min(max(out[i] @ jac[j] / (ni * nj), -1.0), 1.0)
            if condition is not None:
                condition[i, j] = amplification * (np.abs(coef[i]) @ row_norms) / ni
            tgt = targets[i, j]
            if cos < tgt:
                t = min(tgt, 1 - 1e-12)
                num = t * math.sqrt(1 - cos**2) - cos * math.sqrt(1 - t**2)
                step = ni * num / (nj * math.sqrt(1 - t**2))
                out[i], coef[i, j] = out[i] + step * jac[j], coef[i, j] + step
                amplification /= max(math.sqrt(1 - cos**2), 1e-300)
            if ema == "always" or cos < tgt:
                targets[i, j] = (1 - beta) * tgt + beta * cos
    return out, coef, targets


def integer_jacobian(rng: np.random.Generator, k: int) -> np.ndarray:
    """Integer rows (an exact Gramian), some of them zero, duplicated or opposite: copies of a
    row of norm 5, so that their cosines are exactly 1 or -1."""
    jac = rng.integers(-3, 4, size=(k, 12)).astype(np.float64)
    for a, b in rng.integers(k, size=(k // 2 + 1, 2)):
        jac[a] = rng.permutation([1.0, 2.0, 2.0, 4.0] + [0.0] * 8) * rng.choice([-1.0, 1.0], 12)
        jac[b] = rng.choice([0.0, 1.0, 2.0, -1.0, -2.0]) * jac[a]
    return jac


def random_orders(rng: np.random.Generator, k: int) -> np.ndarray:
    rows = [rng.permutation([j for j in range(k) if j != i]) for i in range(k)]
    return np.array(rows, dtype=np.int64).reshape(k, k - 1)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_hand_computed_two_tasks() -> None:
    # g1 = (1, 0), g2 = (0, 1): cos = 0 < target ½. Step: ||g1|| (½·1 - 0) / (1·sqrt(3)/2)
    # = 1/sqrt(3), so g1' = (1, 1/sqrt(3)) and cos(g1', g2) = (1/sqrt(3)) / sqrt(4/3) = ½.
    jac = np.eye(2)
    targets = np.full((2, 2), 0.5)
    coef, new = gradvac_coefficients(jac, targets, np.array([[1], [0]]), beta=0.25)
    r = 1 / math.sqrt(3)
    np.testing.assert_allclose(coef, [[1, r], [r, 1]], atol=1e-15)
    assert cos(coef[0] @ jac, jac[1]) == pytest.approx(0.5, abs=1e-15)
    # the EMA moves towards the cosine observed BEFORE the adjustment: 0.75·½ + 0.25·0
    np.testing.assert_allclose(new[[0, 1], [1, 0]], [0.375, 0.375], atol=1e-15)
    _, kept = gradvac_coefficients(jac, targets, np.array([[1], [0]]), 0.25, ema="adjusted")
    np.testing.assert_allclose(kept[[0, 1], [1, 0]], [0.375, 0.375], atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 8))
def test_zero_targets_and_beta_zero_is_pcgrad(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    orders = random_orders(rng, k)
    gram = jac @ jac.T
    coef, targets = gradvac_coefficients(gram, np.zeros((k, k)), orders, beta=0.0)
    np.testing.assert_allclose(coef, pcgrad_coefficients(gram, orders), rtol=1e-9, atol=1e-9)
    assert not targets.any()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(2, 6))
@example(606742744, 4, 2)  # P = 2: a g_i^PC cancelled to 2e-5 of its terms, cosine error 1.5e-8
def test_coefficient_space_equals_the_vector_algorithm(seed: int, k: int, p: int) -> None:
    # (p >= 2: in one dimension an adjustment can cancel g_i exactly, and the cosine of the
    # rounding residue is noise in both implementations; that case is in the finite test)
    # The targets' tolerance follows the conditioning of each cosine (see direct_gradvac):
    # a fixed 1e-9 failed about 1 example in 3,000 at P = 2, where a g_i^PC can cancel to
    # 1e-5 of its terms. Over 80,000 draws the error stayed below 1 · eps · condition.
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p))
    targets = rng.uniform(-0.9, 0.9, size=(k, k))
    orders = random_orders(rng, k)
    coef, new = gradvac_coefficients(jac @ jac.T, targets, orders, beta=0.3)
    condition = np.ones((k, k))
    expected, _, expected_targets = direct_gradvac(jac, targets, orders, 0.3, condition=condition)
    np.testing.assert_allclose(coef @ jac, expected, rtol=1e-8, atol=1e-8)
    error = np.abs(new - expected_targets)
    bound = 1e-12 + 8 * np.finfo(np.float64).eps * condition
    assert (error <= bound).all(), f"target errors {error[error > bound]} > {bound[error > bound]}"


@pytest.mark.parametrize("ema", ["always", "adjusted"])
@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_matches_the_vector_algorithm_with_degenerate_gradients(k: int, ema: str) -> None:
    for seed in range(30):
        rng = np.random.default_rng(seed)
        jac = integer_jacobian(rng, k)
        targets = rng.uniform(-0.9, 0.9, size=(k, k))
        targets[rng.random((k, k)) < 0.2] = -1.0  # never adjusted
        orders, beta = random_orders(rng, k), rng.uniform(0.0, 1.0)
        coef, new = gradvac_coefficients(jac @ jac.T, targets, orders, beta, ema)
        vectors, expected, expected_targets = direct_gradvac(jac, targets, orders, beta, ema)
        np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        np.testing.assert_allclose(coef @ jac, vectors, rtol=0, atol=1e-12 * np.abs(jac).sum())
        np.testing.assert_allclose(new, expected_targets, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.floats(-0.95, 0.95))
def test_an_adjusted_pair_reaches_its_target_exactly(seed: int, p: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(2, p))
    before = cos(jac[0], jac[1])
    coef, _ = gradvac_coefficients(jac @ jac.T, np.full((2, 2), target), np.array([[1], [0]]), 0.0)
    after = coef @ jac
    for i, j in ((0, 1), (1, 0)):
        expected = target if before < target else before
        assert cos(after[i], jac[j]) == pytest.approx(expected, abs=1e-9)


def test_ema_over_steps_through_the_balancer() -> None:
    bal = GradVac(2, beta=0.3, order="fixed")
    j1, j2 = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [-1.0, 1.0]])
    c1, c2 = cos(*j1), cos(*j2)
    bal.weights_from_gramian(torch.from_numpy(j1 @ j1.T), ONES[:2])
    np.testing.assert_allclose(bal.targets.numpy(), [[0, 0.3 * c1], [0.3 * c1, 0]], atol=1e-15)
    w = bal.weights_from_gramian(torch.from_numpy(j2 @ j2.T), ONES[:2]).numpy()
    t2 = 0.7 * 0.3 * c1 + 0.3 * c2
    np.testing.assert_allclose(bal.targets.numpy(), [[0, t2], [t2, 0]], atol=1e-15)
    # step 2 adjusted both (cos -1/sqrt(2) < 0.3 c1 > 0): both reach the old target
    d = w @ j2
    assert cos(d, j2[0]) > c2 and cos(d, j2[1]) > c2
    adjusted_only = GradVac(2, beta=0.3, ema="adjusted")
    adjusted_only.weights_from_gramian(torch.from_numpy(j1 @ j1.T), ONES[:2])
    assert not adjusted_only.targets.any()  # cos > 0 = target: no adjustment, no update


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_update_is_the_reduction_of_the_papers_corrected_vectors(
    k: int, reduction: str
) -> None:
    """Class level, over steps: the balancer's weights applied to J give Σ_i g_i^PC (or its
    mean) of the vector algorithm above, with the targets carried from step to step."""
    rng = np.random.default_rng(k)
    bal = GradVac(k, beta=0.5, order="fixed", reduction=reduction)
    fixed = np.array([[j for j in range(k) if j != i] for i in range(k)]).reshape(k, k - 1)
    targets, adjusted = np.zeros((k, k)), 0
    for _ in range(4):
        jac = rng.normal(size=(k, 7))
        vectors, coef, targets = direct_gradvac(jac, targets, fixed, 0.5)
        adjusted += int(np.count_nonzero(coef - np.eye(k)))
        w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES[:k]).numpy()
        expected = vectors.sum(axis=0) / (k if reduction == "mean" else 1)
        np.testing.assert_allclose(w @ jac, expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bal.targets.numpy(), targets, rtol=0, atol=1e-12)
    assert adjusted >= k  # the corrections were exercised, not only the plain sum


def test_the_engine_applies_the_sum_of_the_papers_corrected_gradients() -> None:
    """Through ``backward`` (exact mode, random orders): the body's gradient is Σ_i g_i^PC of
    the vector algorithm on the per-task gradients computed here by autograd."""
    k, seed = 3, 4
    model, _, losses = losses_and_features(k, 0)
    body = list(model.shared.parameters())
    jac = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, body, retain_graph=True)])
            for loss in losses
        ]
    ).double()
    orders = visiting_orders(k, "random", torch.Generator().manual_seed(seed))
    start = np.full((k, k), 0.3)
    vectors, coef, _ = direct_gradvac(jac.numpy(), start, orders, 0.5)
    assert np.count_nonzero(coef - np.eye(k)) > 0  # some pair was adjusted
    model2, _, losses2 = losses_and_features(k, 0)
    bal = GradVac(k, beta=0.5, seed=seed)
    bal.targets.fill_(0.3)
    bal.backward(losses2, shared=model2.shared)
    grad = torch.cat([p.grad.reshape(-1) for p in model2.shared.parameters()]).double()
    torch.testing.assert_close(grad, torch.from_numpy(vectors.sum(axis=0)), rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_permuting_tasks_permutes_the_weights(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, 4))
    targets = rng.uniform(-0.5, 0.5, size=(k, k))
    orders = random_orders(rng, k)
    perm = rng.permutation(k)
    inverse = np.argsort(perm)
    coef, new = gradvac_coefficients(jac @ jac.T, targets, orders, 0.2)
    jp = jac[perm]
    coef_p, new_p = gradvac_coefficients(
        jp @ jp.T, targets[np.ix_(perm, perm)], inverse[orders[perm]], 0.2
    )
    np.testing.assert_allclose(coef_p.sum(axis=0), coef.sum(axis=0)[perm], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(new_p, new[np.ix_(perm, perm)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "jac",
    [
        np.array([[2.0, -1.0]]),
        np.array([[1.0, 2.0], [1.0, 2.0]]),
        np.array([[1.0, 2.0], [-1.0, -2.0]]),
        np.array([[1.0, 2.0], [0.0, 0.0]]),
        np.zeros((3, 2)),
    ],
)
def test_degenerate_gradients_give_finite_weights(jac: np.ndarray) -> None:
    bal = GradVac(jac.shape[0], beta=0.5)
    bal.targets.fill_(0.99)
    for _ in range(3):
        w = bal.weights_from_gramian(torch.from_numpy(jac @ jac.T), ONES[: jac.shape[0]])
        assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(bal.targets).all())
        assert np.isfinite(w.numpy() @ jac).all()


def test_a_target_pushed_to_one_is_approached_with_a_finite_step() -> None:
    """With β = 1 the target is the last observed cosine: parallel gradients push it to
    exactly 1. A cosine of 1 cannot be reached from another direction by a finite step
    (the step divides by sqrt(1 - φ̂²)); the target used is 1 - 1e-12, a valid cosine below 1.
    Next step, g1 = (1, 0) and g2 = (0, 1): each is moved by tan(arccos φ̂) ≈ 7e5 times the
    other, the weights stay finite and each corrected gradient is parallel to the other task's
    to 1e-12; the targets stay the observed cosines, in [-1, 1]."""
    bal = GradVac(2, beta=1.0, order="fixed")
    parallel = np.array([[1.0, 0.0], [2.0, 0.0]])
    bal.weights_from_gramian(torch.from_numpy(parallel @ parallel.T), ONES[:2])
    assert bal.targets.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    jac = np.eye(2)
    coef, _ = gradvac_coefficients(jac, bal.targets.numpy(), np.array([[1], [0]]), 1.0)
    for i, j in ((0, 1), (1, 0)):
        assert cos(coef[i] @ jac, jac[j]) == pytest.approx(1.0, abs=1e-11)
    w = bal.weights_from_gramian(torch.from_numpy(jac), ONES[:2]).numpy()
    assert np.isfinite(w).all()
    t = 1 - 1e-12
    step = t / math.sqrt(1 - t * t)  # ||g1|| (t·1 - 0) / (||g2|| sqrt(1 - t²))
    np.testing.assert_allclose(w, [1 + step, 1 + step], rtol=1e-9)
    assert bal.targets.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # the cosines seen: 0


@pytest.mark.parametrize("features", [False, True])
def test_end_to_end_through_the_engine(features: bool) -> None:
    twin, bal = GradVac(3, beta=0.5, seed=4), GradVac(3, beta=0.5, seed=4)
    twin.targets.fill_(0.2)
    bal.targets.fill_(0.2)
    check_engine(bal, lambda g: twin.weights_from_gramian(g, ONES[:3]), features=features)
    assert torch.equal(bal.targets, twin.targets)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[GradVac, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(4, seed=5)
        return GradVac(4, beta=0.4, seed=2), model, torch.optim.SGD(model.parameters(), lr=0.05)

    saved = check_resume(fresh, split=5, total=8)
    assert saved["bal"]["state"]["targets"].abs().sum() > 0


def test_registered_and_validated() -> None:
    assert registry.get("gradvac") is GradVac
    assert registry.make("gradvac", 3).beta == 0.01
    for kw in ({"beta": 1.5}, {"order": "x"}, {"reduction": "x"}, {"ema": "x"}):
        with pytest.raises(ValueError):
            GradVac(2, **kw)
