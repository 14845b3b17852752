"""Learning to branch: Gumbel-softmax parent choices, temperature, argmax tree, derive(),
shared/task partition before and after, gradient flow, gradient engine, a real balancer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from model_checks import check_engine, check_gradient_flow, check_partition, ids, task_losses

import taskbalance as tb
from taskbalance.models import LearningToBranch
from taskbalance.models.learning_to_branch import BranchingTree

TASKS = ["a", "b", "c", "d"]


def make(**kw: object) -> LearningToBranch:
    torch.manual_seed(0)
    args: dict = {"widths": (6, 5, 4), "tower_hidden": (4,), "noise_seed": 0}
    args.update(kw)
    return LearningToBranch(10, TASKS, **args)


def set_hand_tree(model: LearningToBranch, margin: float = 50.0) -> None:
    """Layers of 1, 2, 4 nodes: layer-2 nodes 0, 1 under node 0 and 2, 3 under node 1;
    tasks a -> node 0, b -> node 1, c -> node 2, d -> node 2 (node 3 is left unused)."""
    with torch.no_grad():
        logits = torch.zeros(4, 2)
        logits[[0, 1], 0] = margin
        logits[[2, 3], 1] = margin
        model.branch_logits["2"].copy_(logits)
        for t, node in zip(TASKS, [0, 1, 2, 2]):
            model.task_logits[t].zero_()
            model.task_logits[t][node] = margin


# ------------------------------------------------------------------ design space
def test_design_space_shapes() -> None:
    model = make()
    assert model.counts == [1, 2, 4]
    assert [n.weight.shape for n in model.layers[2]] == [(4, 5)] * 4
    # layer 1 reads a single node: no choice, no logits
    assert {k: tuple(v.shape) for k, v in model.branch_logits.items()} == {"2": (4, 2)}
    assert all(v.shape == (4,) for v in model.task_logits.values())
    assert LearningToBranch(3, 2, widths=(4, 4), branching=(2, 3)).counts == [2, 6]
    z = model.features(torch.randn(5, 10))
    assert z.shape == (5, 4, 4)
    assert {t: o.shape for t, o in model(torch.randn(5, 10)).items()} == {t: (5, 1) for t in TASKS}


def test_branching_probabilities_start_uniform_and_argmax_ties_take_the_first() -> None:
    model = make()
    for p in model.branching_parameters():
        assert bool((p == 0).all())
    tree = model.architecture()
    assert tree.parents == ((0,), (0, 0), (0, 0, 0, 0))
    assert dict(tree.task_parents) == dict.fromkeys(TASKS, 0)


# ------------------------------------------------------------------ Gumbel-softmax
def test_gumbel_softmax_parent_weights_are_distributions() -> None:
    model = make(noise_seed=None, temperature=0.7)
    with torch.no_grad():
        for p in model.branching_parameters():
            p.normal_()
    layers, tasks = model.branch_weights()
    assert [tuple(d.shape) for d in layers] == [(1, 1), (2, 1), (4, 2)]
    for d in [*layers, *tasks.values()]:
        assert bool((d >= 0).all())
        torch.testing.assert_close(d.sum(-1), torch.ones(d.shape[:-1]))
    # fresh noise each pass without a seed, the same noise with one
    assert not torch.equal(layers[2], model.branch_weights()[0][2])
    model.noise_seed = 3
    torch.testing.assert_close(model.branch_weights()[0][2], model.branch_weights()[0][2])


def test_gumbel_max_samples_follow_the_branching_probabilities() -> None:
    model = LearningToBranch(3, 1, widths=(2, 2), branching=(2, 1))
    with torch.no_grad():
        model.task_logits["0"].copy_(torch.log(torch.tensor([0.7, 0.3])))
    torch.manual_seed(0)
    picks = [int(model.branch_weights()[1]["0"].argmax()) for _ in range(4000)]
    assert sum(p == 0 for p in picks) / len(picks) == pytest.approx(0.7, abs=0.03)


def test_temperature_sets_how_sharp_the_choice_is() -> None:
    model = make()
    with torch.no_grad():
        model.branch_logits["2"].copy_(torch.tensor([[1.0, 0.0]] * 4))
    model.set_temperature(1e3)
    torch.testing.assert_close(
        model.branch_weights()[0][2], torch.full((4, 2), 0.5), atol=5e-3, rtol=0
    )
    model.set_temperature(1e-3)
    sharp = model.branch_weights()[0][2]
    assert bool(((sharp < 1e-6) | (sharp > 1 - 1e-6)).all())


def test_anneal_multiplies_the_temperature() -> None:
    model = make(temperature=2.0)
    assert model.anneal(0.5) == 1.0
    assert model.anneal(0.5) == 0.5 and model.temperature == 0.5


def test_soft_forward_mixes_the_parents_with_the_sampled_weights() -> None:
    model = LearningToBranch(
        3, ["a"], widths=(2, 2), branching=(2, 1), tower_hidden=(), noise_seed=4
    )
    with torch.no_grad():
        model.branch_logits["1"].copy_(torch.tensor([[0.3, -0.2], [1.0, 0.5]]))
        model.task_logits["a"].copy_(torch.tensor([0.1, -0.4]))
    layers, tasks = model.branch_weights()
    x = torch.randn(5, 3)
    h0 = [torch.relu(n(x)) for n in model.layers[0]]
    d = layers[1]
    h1 = [torch.relu(n(d[j, 0] * h0[0] + d[j, 1] * h0[1])) for j, n in enumerate(model.layers[1])]
    expected = model.towers["a"](tasks["a"][0] * h1[0] + tasks["a"][1] * h1[1])
    torch.testing.assert_close(model(x)["a"], expected)


def test_low_temperature_with_fixed_noise_equals_the_hard_tree() -> None:
    model = make(temperature=1e-3)
    set_hand_tree(model)
    hard = copy.deepcopy(model).derive()
    x = torch.randn(6, 10)
    soft, derived = model(x), hard(x)
    for t in TASKS:
        torch.testing.assert_close(soft[t], derived[t])
    # the hard tree by hand: a and b under layer-1 node 0, c and d under node 1 -> node 2
    relu = torch.relu
    h0 = relu(model.layers[0][0](x))
    h1 = [relu(n(h0)) for n in model.layers[1]]
    h2 = [relu(model.layers[2][j](h1[p])) for j, p in enumerate([0, 0, 1, 1])]
    for t, node in zip(TASKS, [0, 1, 2, 2]):
        torch.testing.assert_close(soft[t], model.towers[t](h2[node]))


def test_eval_mode_routes_along_the_argmax_tree_without_noise() -> None:
    model = make(noise_seed=None)
    set_hand_tree(model, margin=0.5)  # soft choices in training, argmax in eval
    x = torch.randn(6, 10)
    derived = copy.deepcopy(model).derive()(x)
    model.eval()
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], derived[t])
    model.train()
    assert not torch.allclose(model(x)["a"], derived["a"])


# ------------------------------------------------------------------ derive
def test_derive_hand_case_tree_and_partition() -> None:
    model = make()
    set_hand_tree(model)
    expected = BranchingTree(((0,), (0, 0), (0, 0, 1, 1)), {"a": 0, "b": 1, "c": 2, "d": 2})
    assert model.architecture() == expected
    assert expected.path("c") == (0, 1, 2)
    assert expected.tasks_through(1, 0) == ("a", "b")
    n = {
        (layer, j): node for layer, nodes in enumerate(model.layers) for j, node in enumerate(nodes)
    }
    towers = dict(model.towers)
    assert model.derive() is model
    # node 3 of the last layer is on no path: dropped; the others are re-indexed
    assert model.counts == [1, 2, 3]
    assert model.architecture().parents == ((0,), (0, 0), (0, 0, 1))
    assert dict(model.architecture().task_parents) == {"a": 0, "b": 1, "c": 2, "d": 2}
    assert model.branching_parameters() == []
    assert not any(m is n[(2, 3)] for m in model.modules())
    params = lambda *modules: {i for m in modules for i in ids(m.parameters())}  # noqa: E731
    shared = params(n[(0, 0)], n[(1, 0)], n[(1, 1)], n[(2, 2)])
    assert set(ids(model.shared_parameters())) == shared
    assert set(ids(model.task_parameters("a"))) == params(n[(2, 0)], towers["a"])
    assert set(ids(model.task_parameters("b"))) == params(n[(2, 1)], towers["b"])
    assert set(ids(model.task_parameters("c"))) == params(towers["c"])
    assert set(ids(model.task_parameters("d"))) == params(towers["d"])
    check_partition(model, TASKS)
    # each loss reaches exactly the nodes on its task's path and its tower (so c and d,
    # not a, reach the shared nodes (1, 1) and (2, 2): shared means two tasks or more)
    losses = task_losses(model(torch.randn(32, 10)))
    everything = list(model.parameters())
    paths = {"a": [(0, 0), (1, 0), (2, 0)], "b": [(0, 0), (1, 0), (2, 1)]}
    paths["c"] = paths["d"] = [(0, 0), (1, 1), (2, 2)]
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], everything, retain_graph=True, allow_unused=True)
        reached = {id(p) for p, g in zip(everything, grads) if g is not None and bool(g.any())}
        assert reached == params(*(n[k] for k in paths[t]), towers[t])


def test_derived_features_are_the_frontier_nodes() -> None:
    model = make()
    set_hand_tree(model)
    model.derive()
    x = torch.randn(4, 10)
    z = model.features(x)
    h0 = torch.relu(model.layers[0][0](x))
    h1 = torch.relu(model.layers[1][0](h0))
    h2 = torch.relu(model.layers[2][2](torch.relu(model.layers[1][1](h0))))
    assert len(z) == 2
    torch.testing.assert_close(z[0], h1)
    torch.testing.assert_close(z[1], h2)
    out = model(x)
    for t, o in model.heads(z).items():
        torch.testing.assert_close(o, out[t])
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)


def test_derive_is_idempotent() -> None:
    model = make()
    set_hand_tree(model)
    tree = model.derive().architecture()
    assert model.derive().architecture() == tree and model.counts == [1, 2, 3]


def test_derived_tree_without_a_shared_node() -> None:
    model = LearningToBranch(3, ["a", "b"], widths=(4,), branching=(2,), tower_hidden=(2,))
    with torch.no_grad():
        model.task_logits["a"].copy_(torch.tensor([5.0, 0.0]))
        model.task_logits["b"].copy_(torch.tensor([0.0, 5.0]))
    model.derive()
    assert model.shared_parameters() == []
    x = torch.randn(2, 3)
    assert set(model(x)) == {"a", "b"}
    with pytest.raises(ValueError, match="shares no node between tasks"):
        model.features(x)
    with pytest.raises(ValueError, match="needs the input x"):
        model.heads([])
    torch.testing.assert_close(model.heads([], x)["b"], model(x)["b"])


# ------------------------------------------------------------------ gradients, groups
def test_gradients_reach_the_branching_logits() -> None:
    model = make(noise_seed=None)
    sum(task_losses(model(torch.randn(16, 10))).values()).backward()
    for p in model.branching_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_branching_and_weight_groups() -> None:
    model = make()
    logits = ids(model.branching_parameters())
    assert logits == ids([model.branch_logits["2"], *model.task_logits.values()])
    weights = ids(model.weight_parameters())
    assert not set(logits) & set(weights)
    assert set(logits) | set(weights) == set(ids(model.parameters()))


def test_soft_phase_partition_shares_every_node() -> None:
    model = make()
    check_partition(model, TASKS)
    nodes = {i for nodes in model.layers for i in ids(nodes.parameters())}
    assert set(ids(model.shared_parameters())) == nodes | {id(model.branch_logits["2"])}
    for t in TASKS:
        assert set(ids(model.task_parameters(t))) == set(
            ids([*model.towers[t].parameters(), model.task_logits[t]])
        )
    check_gradient_flow(model, torch.randn(32, 10))


def test_gradient_engine_accepts_the_soft_tree() -> None:
    model = make()
    check_engine(model, torch.randn(32, 10), features=model.features, heads=model.heads)


@pytest.mark.parametrize("derived", [False, True])
@pytest.mark.parametrize("mode", ["exact", "features"])
def test_trains_with_mgda_and_two_optimizers(derived: bool, mode: str) -> None:
    model = make(noise_seed=None)
    set_hand_tree(model, margin=2.0)
    if derived:
        model.derive()
    weights_opt = torch.optim.SGD(model.weight_parameters(), lr=0.05)
    logits = model.branching_parameters()
    branch_opt = torch.optim.Adam(logits, lr=0.01) if logits else None
    balancer = tb.make("mgda", model.tasks)
    x = torch.randn(32, 10)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        weights_opt.zero_grad()
        if branch_opt is not None:
            branch_opt.zero_grad()
        if mode == "exact":
            w = balancer.backward(task_losses(model(x)), shared=model.shared_parameters())
        else:
            z = model.features(x)
            w = balancer.backward(task_losses(model.heads(z, x)), features=z)
        weights_opt.step()
        if branch_opt is not None:
            branch_opt.step()
        model.anneal(0.9)
    assert balancer.mode == mode
    assert w is not None and math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ------------------------------------------------------------------ misuse
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"widths": ()}, ValueError, "at least one layer of positive width"),
        ({"widths": (4, 0)}, ValueError, "at least one layer of positive width"),
        ({"branching": (1, 2)}, ValueError, r"one factor >= 1 per layer of widths \(3\)"),
        ({"branching": (1, 0, 2)}, ValueError, "one factor >= 1 per layer"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a positive finite"),
        ({"temperature": True}, TypeError, "temperature must be a number"),
        ({"noise_seed": -1}, ValueError, "noise_seed must be None or an int >= 0"),
        ({"noise_seed": 1.5}, ValueError, "noise_seed must be None or an int >= 0"),
    ],
)
def test_bad_arguments_raise_with_the_fix(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make(**kw)


def test_bad_anneal_and_temperature_raise() -> None:
    model = make()
    with pytest.raises(ValueError, match="rate must be a positive finite"):
        model.anneal(0.0)
    with pytest.raises(ValueError, match="temperature must be a positive finite"):
        model.set_temperature(-1.0)
    assert model.temperature == 1.0


def test_heads_refuse_the_other_phase_features() -> None:
    model = make()
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="before derive"):
        model.heads([model.features(x)])
    set_hand_tree(model)
    z = model.features(x)
    model.derive()
    with pytest.raises(ValueError, match="list of 2 frontier outputs"):
        model.heads(z)
    with pytest.raises(ValueError, match="after derive"):
        model.branch_weights()


def test_derive_a_given_tree_and_rebuild_a_derived_model() -> None:
    model = make()
    set_hand_tree(model)
    searched = model.architecture()
    model.derive()
    assert model.searched == searched
    x = torch.randn(3, 10)
    rebuilt = make(widths=(6, 5, 4)).derive(model.searched)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.architecture() == model.architecture()
    for t, o in rebuilt(x).items():
        torch.testing.assert_close(o, model(x)[t])
    assert model.derive(searched) is model  # the same tree again: a no-op


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        (BranchingTree(((0,), (0, 0)), dict.fromkeys(TASKS, 0)), "2 layers, the model has 3"),
        (
            BranchingTree(((0,), (0, 0), (0, 0, 0)), dict.fromkeys(TASKS, 0)),
            r"\[1, 2, 3\] nodes per layer, the model has \[1, 2, 4\]",
        ),
        (
            BranchingTree(((1,), (0, 0), (0, 0, 0, 0)), dict.fromkeys(TASKS, 0)),
            "first layer's nodes read the input",
        ),
        (
            BranchingTree(((0,), (0, 0), (0, 2, 0, 0)), dict.fromkeys(TASKS, 0)),
            "a parent index is out of range",
        ),
        (BranchingTree(((0,), (0, 0), (0, 0, 0, 0)), {"a": 0}), "tasks \\['a'\\], the model"),
        (
            BranchingTree(((0,), (0, 0), (0, 0, 0, 0)), dict.fromkeys(TASKS, 4)),
            "a task's parent index is out of range",
        ),
    ],
)
def test_derive_refuses_a_tree_that_does_not_fit(tree: BranchingTree, match: str) -> None:
    model = make()
    with pytest.raises(ValueError, match=match):
        model.derive(tree)
    assert model.tree is None and len(model.branching_parameters()) == 5


def test_derive_again_with_another_tree_raises() -> None:
    model = make().derive()
    other = BranchingTree(((0,), (0, 0), (0, 0, 1, 1)), dict.fromkeys(TASKS, 2))
    with pytest.raises(ValueError, match="already derived with another tree"):
        model.derive(other)
