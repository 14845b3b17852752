"""DSelect-k: smooth step, binary-encoded selectors, k-sparsity, n not a power of 2,
regulariser, gradient flow, gradient engine and a real balancer."""

from __future__ import annotations

import math

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition, task_losses

import taskbalance as tb
from taskbalance.models import DSelectK
from taskbalance.models.dselect_k import DSelectKGate, binary_codes, smooth_step


def make(**kw: object) -> DSelectK:
    torch.manual_seed(0)
    args: dict = {"num_experts": 4, "k": 2, "expert_hidden": (6, 5), "tower_hidden": (4,)}
    args.update(kw)
    return DSelectK(10, ["a", "b", "c"], **args)


def set_static(gate: DSelectKGate, z: list[list[float]], w: list[float]) -> None:
    with torch.no_grad():
        gate.z.copy_(torch.tensor(z))  # type: ignore[arg-type]
        gate.w.copy_(torch.tensor(w))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- smooth step
def test_smooth_step_hand_values() -> None:
    t = torch.tensor([-3.0, -0.5, -0.25, 0.0, 0.25, 0.5, 3.0])
    # cubic part: -2 t^3 + 1.5 t + 0.5 at t = ±1/4 is 0.5 ± (0.375 - 0.03125)
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t), expected)
    # gamma = 2 stretches the cubic region to [-1, 1]: S(0.5) = -2/8 * 1/8 + 3/4 * 1/2 + 1/2
    torch.testing.assert_close(
        smooth_step(torch.tensor([-1.0, 0.5, 1.0]), gamma=2.0),
        torch.tensor([0.0, 0.84375, 1.0]),
    )


def test_smooth_step_is_flat_outside_and_smooth_inside() -> None:
    t = torch.tensor([-2.0, -0.6, -0.4, 0.0, 0.3, 0.6, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(t).sum(), t)
    # S'(t) = 1.5 - 6 t^2 inside, 0 outside; it vanishes at the boundary ±1/2 (C^1)
    expected = torch.tensor([0.0, 0.0, 1.5 - 6 * 0.16, 1.5, 1.5 - 6 * 0.09, 0.0, 0.0])
    torch.testing.assert_close(grad, expected)
    near = torch.tensor([-0.5 + 1e-4, 0.5 - 1e-4], requires_grad=True)
    (g_near,) = torch.autograd.grad(smooth_step(near).sum(), near)
    assert bool((g_near.abs() < 1e-3).all())
    s = smooth_step(torch.linspace(-0.5, 0.5, 101))
    assert bool((s.diff() > 0).all())


def test_binary_codes_most_significant_bit_first() -> None:
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert binary_codes(2).int().tolist() == [[0], [1]]


# ------------------------------------------------------------------------------- gates
@pytest.mark.parametrize("per_example", [False, True])
def test_gates_are_distributions(per_example: bool) -> None:
    model = make(num_experts=8, k=3, per_example=per_example)
    x = torch.randn(7, 10) * 5
    for a in model.gate_weights(x).values():
        assert a.shape == ((7, 8) if per_example else (8,))
        assert bool((a >= 0).all())
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_saturated_selectors_pick_at_most_k_experts_hand_case() -> None:
    gate = DSelectKGate(8, k=2)
    # selector 0 -> code 101 = expert 5, selector 1 -> code 001 = expert 1; softmax(0, ln 3)
    set_static(gate, [[5.0, -5.0, 5.0], [-5.0, -5.0, 5.0]], [0.0, math.log(3.0)])
    expected = torch.zeros(8)
    expected[5], expected[1] = 0.25, 0.75
    torch.testing.assert_close(gate(), expected)
    assert int((gate() != 0).sum()) == 2
    # both selectors on expert 6 (110): a single expert with all the weight
    set_static(gate, [[1.0, 0.7, -0.5], [0.5, 2.0, -9.0]], [0.3, -1.0])
    assert (gate() != 0).nonzero().flatten().tolist() == [6]
    torch.testing.assert_close(gate()[6], torch.tensor(1.0))


def test_unsaturated_selector_spreads_over_codes() -> None:
    gate = DSelectKGate(4, k=1)
    # S(0.25) = 0.84375, S(-0.5) = 0: code 10 gets 0.84375, code 00 gets 0.15625
    set_static(gate, [[0.25, -0.5]], [0.0])
    torch.testing.assert_close(gate(), torch.tensor([0.15625, 0.0, 0.84375, 0.0]))


def test_per_example_gate_saturates_per_example() -> None:
    gate = DSelectKGate(4, k=1, in_features=2)
    with torch.no_grad():
        gate.z.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
        gate.z.bias.zero_()
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # codes 10 and 01
    torch.testing.assert_close(gate(x), torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0, 0]]))


def test_initialisation_as_in_the_official_code() -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(16, k=4, gamma=2.0)
    assert gate.z.shape == (4, 4) and gate.w.shape == (4,)
    assert float(gate.z.detach().abs().max()) <= 2.0 / 100
    assert float(gate.w.detach().abs().max()) <= 0.05
    # every selector starts near S = 1/2: all 16 experts weighted about equally
    torch.testing.assert_close(gate(), torch.full((16,), 1 / 16), atol=2e-3, rtol=0)


# --------------------------------------------------------------- n not a power of two
def test_non_power_of_two_mass_and_penalty() -> None:
    gate = DSelectKGate(5, k=2)  # m = 3 bits, codes 5, 6, 7 have no expert
    assert gate.num_bits == 3 and not gate.power_of_2
    set_static(gate, [[0.0] * 3, [0.0] * 3], [0.0, 0.0])
    # S(0) = 1/2: each of the 8 codes gets 1/8, the 5 experts 5/8; penalty 8/5 per selector
    torch.testing.assert_close(gate(), torch.full((5,), 1 / 8))
    torch.testing.assert_close(gate.reachability_penalty(), torch.tensor(2 * 8 / 5))
    # selectors on experts 4 (100) and 2 (010): full mass, penalty at its minimum k
    set_static(gate, [[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]], [0.0, 0.0])
    torch.testing.assert_close(gate(), torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5]))
    torch.testing.assert_close(gate.reachability_penalty(), torch.tensor(2.0))
    # selector 0 on code 110 (no expert): half the mass is lost, its penalty is 1/1e-6
    set_static(gate, [[1.0, 1.0, -1.0], [-1.0, 1.0, -1.0]], [0.0, 0.0])
    torch.testing.assert_close(gate(), torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(gate.reachability_penalty(), torch.tensor(1e6 + 1.0))


def test_penalty_gradient_moves_mass_to_real_experts() -> None:
    gate = DSelectKGate(5, k=1)
    set_static(gate, [[0.1, 0.2, -0.1]], [0.0])
    before = float(gate().detach().sum())
    gate.reachability_penalty().backward()
    with torch.no_grad():
        gate.z -= 0.1 * gate.z.grad  # type: ignore[operator]
    assert float(gate().detach().sum()) > before


def test_power_of_two_has_no_penalty() -> None:
    gate = DSelectKGate(8, k=3)
    assert float(gate.reachability_penalty()) == 0.0
    torch.testing.assert_close(gate().sum(), torch.tensor(1.0))


# -------------------------------------------------------------------------- regulariser
def test_entropy_and_regularization_hand_values() -> None:
    model = make(num_experts=4, k=1, entropy_weight=0.5)
    for gate in model.gates.values():
        set_static(gate, [[0.25, -0.5]], [0.0])  # r = (0.15625, 0, 0.84375, 0)
    r = torch.tensor([0.15625, 0.0, 0.84375, 0.0])
    h = -(r * torch.log(r + 1e-6)).sum()
    for e in model.gate_entropy().values():
        torch.testing.assert_close(e, h)
    torch.testing.assert_close(model.regularization(), 3 * 0.5 * h)  # 3 tasks, no penalty
    saturated = DSelectKGate(4, k=1)
    set_static(saturated, [[1.0, -1.0]], [0.0])
    assert float(saturated.entropy().detach()) == pytest.approx(-math.log(1 + 1e-6), abs=1e-7)


def test_regularization_includes_the_reachability_penalty() -> None:
    model = make(num_experts=5, k=2, entropy_weight=0.0)
    for gate in model.gates.values():
        set_static(gate, [[0.0] * 3, [0.0] * 3], [0.0, 0.0])
    torch.testing.assert_close(model.regularization(), torch.tensor(3 * 2 * 8 / 5))


def test_gradients_reach_the_selector_parameters() -> None:
    model = make(num_experts=8, k=2)
    x = torch.randn(16, 10)
    losses = task_losses(model(x))
    (sum(losses.values()) + model.regularization()).backward()
    for gate in model.gates.values():
        assert gate.z.grad is not None and float(gate.z.grad.abs().sum()) > 0
        assert gate.w.grad is not None and float(gate.w.grad.abs().sum()) > 0
    reg_only = make(num_experts=8, k=2, entropy_weight=1.0)
    reg_only.regularization().backward()
    assert all(float(g.z.grad.abs().sum()) > 0 for g in reg_only.gates.values())


# ------------------------------------------------------------------------------ shapes
def test_shapes_and_forward_is_heads_of_features() -> None:
    model = make()
    assert [w.shape for w in model.experts.weights] == [(4, 10, 6), (4, 6, 5)]
    x = torch.randn(3, 10)
    z = model.features(x)
    assert z.shape == (3, 4, 5)
    out = model(x)
    assert {t: o.shape for t, o in out.items()} == {t: (3, 1) for t in "abc"}
    torch.testing.assert_close(model.heads(z)["b"], out["b"])
    per_example = make(per_example=True)
    torch.testing.assert_close(
        per_example.heads(per_example.features(x), x)["c"], per_example(x)["c"]
    )


def test_output_is_the_gated_mixture() -> None:
    model = make(num_experts=4, k=1)
    set_static(model.gates["a"], [[1.0, -1.0]], [0.0])  # expert 2 only
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x)["a"], model.towers["a"](model.features(x)[:, 2]))


# ------------------------------------------------------------------------------ misuse
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_experts": 1, "k": 1}, "at least 2 experts"),
        ({"num_experts": 4, "k": 5}, "k must be between 1 and num_experts=4"),
        ({"num_experts": 4, "k": 0}, "k must be between 1"),
        ({"gamma": 0.0}, "gamma must be a positive finite"),
        ({"gamma": float("nan")}, "gamma must be a positive finite"),
        ({"entropy_weight": -1.0}, "entropy_weight must be a finite number >= 0"),
    ],
)
def test_bad_arguments_raise_with_the_fix(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_per_example_gates_need_the_input() -> None:
    model = make(per_example=True)
    z = model.features(torch.randn(2, 10))
    for call in (lambda: model.heads(z), model.gate_weights, model.regularization):
        with pytest.raises(ValueError, match="needs the input x"):
            call()


# ---------------------------------------------------------- partition, flow, engines
@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("num_experts", [4, 5])
def test_parameter_groups_and_gradient_flow(per_example: bool, num_experts: int) -> None:
    model = make(num_experts=num_experts, per_example=per_example)
    check_partition(model, model.tasks)
    check_gradient_flow(model, torch.randn(32, 10))
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.experts.parameters()}


@pytest.mark.parametrize("per_example", [False, True])
def test_gradient_engine_accepts_dselect_k(per_example: bool) -> None:
    model = make(num_experts=5, per_example=per_example)
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)


@pytest.mark.parametrize("mode", ["exact", "features"])
def test_trains_with_mgda_and_the_regulariser(mode: str) -> None:
    model = make(num_experts=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    balancer = tb.make("mgda", model.tasks)
    x = torch.randn(32, 10)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        if mode == "exact":
            weights = balancer.backward(task_losses(model(x)), shared=model.shared_parameters())
        else:
            z = model.features(x)
            weights = balancer.backward(task_losses(model.heads(z, x)), features=z)
        model.regularization().backward()
        opt.step()
    assert balancer.mode == mode
    assert weights is not None and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
