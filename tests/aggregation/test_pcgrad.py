"""PCGrad (Yu et al., NeurIPS 2020): gradient surgery in coefficient space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gradcheck import check_engine, check_resume
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet
from taskbalance import registry
from taskbalance.aggregation.pcgrad import PCGrad, pcgrad_coefficients, visiting_orders

ONES = torch.ones(8, dtype=torch.float64)


def direct_pcgrad(jac: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 of the paper on the vectors themselves: the g_i^PC and their coefficients."""
    out, coef = jac.astype(np.float64).copy(), np.eye(len(jac))
    for i in range(jac.shape[0]):
        for j in orders[i]:
            dot = out[i] @ jac[j]
            if dot < 0:
                step = -dot / (jac[j] @ jac[j])
                out[i], coef[i, j] = out[i] + step * jac[j], coef[i, j] + step
    return out, coef


def integer_jacobian(rng: np.random.Generator, k: int) -> np.ndarray:
    """Integer rows (an exact Gramian), some of them zero, duplicated or opposite."""
    jac = rng.integers(-3, 4, size=(k, 12)).astype(np.float64)
    for a, b in rng.integers(k, size=(k // 2 + 1, 2)):
        jac[b] = rng.choice([0.0, 1.0, 2.0, -1.0, -0.5]) * jac[a]
    return jac


def random_orders(rng: np.random.Generator, k: int) -> np.ndarray:
    return np.array([rng.permutation([j for j in range(k) if j != i]) for i in range(k)]).reshape(
        k, k - 1
    )


def weights(jac: np.ndarray, bal: PCGrad) -> np.ndarray:
    g = torch.from_numpy(jac @ jac.T)
    return bal.weights_from_gramian(g, ONES[: jac.shape[0]]).numpy()


def test_hand_computed_two_tasks() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1·g2 = -1 < 0, ||g1||² = 1, ||g2||² = 2.
    # g1^PC = g1 + ½ g2 = (½, ½);  g2^PC = g2 + g1 = (0, 1);  d = (½, 3/2) = 2 g1 + 3/2 g2.
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    coef = pcgrad_coefficients(jac @ jac.T, np.array([[1], [0]]))
    np.testing.assert_allclose(coef, [[1.0, 0.5], [1.0, 1.0]], atol=1e-15)
    np.testing.assert_allclose(weights(jac, PCGrad(2)), [2.0, 1.5], atol=1e-15)
    np.testing.assert_allclose(weights(jac, PCGrad(2, reduction="mean")), [1.0, 0.75], atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 8))
def test_coefficient_space_equals_the_vector_algorithm(seed: int, k: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    orders = random_orders(rng, k)
    projected, _ = direct_pcgrad(jac, orders)
    coef = pcgrad_coefficients(jac @ jac.T, orders)
    scale = np.linalg.norm(jac, axis=1).max()
    np.testing.assert_allclose(coef @ jac, projected, atol=1e-9 * scale)
    # the guarantees that hold for any K: no conflict with the last task visited, and
    # a projection never lengthens a gradient
    norms = np.linalg.norm(jac, axis=1)
    for i in range(k):
        if k > 1:
            last = orders[i, -1]
            assert projected[i] @ jac[last] >= -1e-9 * norms[i] * norms[last]
        assert np.linalg.norm(projected[i]) <= norms[i] * (1 + 1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_matches_the_vector_algorithm_with_degenerate_gradients(k: int) -> None:
    for seed in range(30):
        rng = np.random.default_rng(seed)
        jac = integer_jacobian(rng, k)
        orders = random_orders(rng, k)
        coef = pcgrad_coefficients(jac @ jac.T, orders)
        vectors, expected = direct_pcgrad(jac, orders)
        np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        np.testing.assert_allclose(coef @ jac, vectors, rtol=0, atol=1e-12 * np.abs(jac).sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_two_tasks_never_conflict_after_surgery(seed: int, p: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(2, p))
    coef = pcgrad_coefficients(jac @ jac.T, np.array([[1], [0]]))
    pc = coef @ jac
    tol = 1e-12 * np.linalg.norm(jac[0]) * np.linalg.norm(jac[1])
    assert pc[0] @ jac[1] >= -tol and pc[1] @ jac[0] >= -tol


def test_no_conflict_is_the_plain_sum() -> None:
    rng = np.random.default_rng(1)
    jac = np.abs(rng.normal(size=(5, 7)))  # all inner products positive
    for order in ("random", "shared", "fixed"):
        np.testing.assert_array_equal(weights(jac, PCGrad(5, order=order)), np.ones(5))
    np.testing.assert_array_equal(weights(jac, PCGrad(5, reduction="mean")), np.full(5, 0.2))


def test_visiting_orders() -> None:
    gen = torch.Generator().manual_seed(0)
    for order in ("random", "shared", "fixed"):
        orders = visiting_orders(5, order, gen)
        assert orders.shape == (5, 4)
        for i in range(5):
            assert sorted(orders[i].tolist()) == [j for j in range(5) if j != i]
    assert visiting_orders(4, "fixed", gen).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    # "shared": one permutation for every task, so any two tasks keep their relative order
    shared = visiting_orders(6, "shared", gen).tolist()
    before = {(a, b) for row in shared for x, a in enumerate(row) for b in row[x + 1 :]}
    assert not any((b, a) in before for a, b in before)
    assert visiting_orders(1, "random", gen).shape == (1, 0)


def test_same_seed_same_result_other_seed_other_orders() -> None:
    rng = np.random.default_rng(2)
    jac = rng.normal(size=(6, 3))  # many conflicts
    a, b, c = PCGrad(6, seed=5), PCGrad(6, seed=5), PCGrad(6, seed=6)
    runs = [[weights(jac, bal) for _ in range(5)] for bal in (a, b, c)]
    for x, y in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(runs[0], runs[2]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_permuting_tasks_permutes_the_weights(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, 4))
    orders = random_orders(rng, k)
    perm = rng.permutation(k)
    inverse = np.argsort(perm)
    # task i of the permuted problem is task perm[i]; it visits the same tasks, renamed
    permuted_orders = inverse[orders[perm]]
    w = pcgrad_coefficients(jac @ jac.T, orders).sum(axis=0)
    jp = jac[perm]
    wp = pcgrad_coefficients(jp @ jp.T, permuted_orders).sum(axis=0)
    np.testing.assert_allclose(wp, w[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("jac", "expected"),
    [
        (np.array([[2.0, -1.0]]), [1.0]),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), [1.0, 1.0]),  # identical
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), [2.0, 2.0]),  # opposite: both projected to 0
        (np.array([[1.0, 2.0], [0.0, 0.0]]), [1.0, 1.0]),  # zero gradient
        (np.zeros((3, 2)), [1.0, 1.0, 1.0]),
    ],
)
def test_degenerate_gradients_give_finite_weights(jac: np.ndarray, expected: list) -> None:
    w = weights(jac, PCGrad(jac.shape[0]))
    np.testing.assert_allclose(w, expected, atol=1e-15)
    assert np.isfinite(w @ jac).all()


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("order", ["random", "shared", "fixed"])
def test_end_to_end_through_the_engine(features: bool, order: str) -> None:
    twin = PCGrad(3, seed=11, order=order)
    bal = PCGrad(3, seed=11, order=order)
    w = check_engine(bal, lambda g: twin.weights_from_gramian(g, ONES[:3]), features=features)
    assert bal.steps == 1 and torch.equal(bal.last_weights, w)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def fresh() -> tuple[PCGrad, TinyNet, torch.optim.Optimizer]:
        model = TinyNet(4, seed=3)
        return PCGrad(4, seed=9), model, torch.optim.SGD(model.parameters(), lr=0.05)

    check_resume(fresh, split=4, total=7)


def test_registered_and_validated() -> None:
    assert registry.get("pcgrad") is PCGrad
    assert isinstance(registry.make("pcgrad", 2, seed=1), PCGrad)
    with pytest.raises(ValueError, match="order"):
        PCGrad(2, order="sorted")
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(2, reduction="max")
