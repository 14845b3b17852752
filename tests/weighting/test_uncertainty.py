"""Uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018): three variants."""

from __future__ import annotations

import math

import pytest
import torch

import taskbalance as tb
from conftest import const, save_load


def external(tasks, **kw) -> tuple[tb.UncertaintyWeighting, torch.optim.SGD]:
    """A balancer attached to a plain SGD, so that .grad can be read after backward."""
    bal = tb.UncertaintyWeighting(tasks, optimizer="external", **kw)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    bal.attach(opt)
    return bal, opt


# ---------------------------------------------------------------------- kendall (default)
def test_kendall_at_zero_is_the_plain_sum() -> None:
    bal, _ = external(["a", "b"])
    assert bal.variant == "kendall"
    total = bal(const(1.5, 4.0))
    assert total.item() == 5.5  # exp(0) L + 0
    assert bal.last_weights.tolist() == [1.0, 1.0]
    total.backward()
    # d/ds_i (exp(-s_i) L_i + s_i) = -L_i + 1 at s = 0
    assert bal.log_vars.grad.tolist() == [1.0 - 1.5, 1.0 - 4.0]


def test_kendall_at_a_non_zero_init() -> None:
    s = math.log(4.0)
    bal, _ = external(3, init=s)
    losses = const(2.0, 8.0, 0.5, requires_grad=True)
    total = bal(losses)
    assert total.item() == pytest.approx((2.0 + 8.0 + 0.5) / 4 + 3 * s, rel=1e-6)
    assert bal.last_weights.tolist() == pytest.approx([0.25] * 3, rel=1e-6)
    assert bal.sigma.tolist() == pytest.approx([2.0] * 3, rel=1e-6)
    total.backward()
    assert [loss.grad.item() for loss in losses] == pytest.approx([0.25] * 3, rel=1e-6)
    assert bal.log_vars.grad.tolist() == pytest.approx([1 - 0.5, 1 - 2.0, 1 - 0.125], rel=1e-6)


# ---------------------------------------------------------------------- paper
def test_paper_variant_factors_and_regulariser() -> None:
    bal, _ = external(
        ["depth", "seg"], variant="paper", task_types=["regression", "classification"]
    )
    total = bal(const(3.0, 5.0))
    assert total.item() == pytest.approx(0.5 * 3.0 + 1.0 * 5.0, rel=1e-7)
    assert bal.last_weights.tolist() == [0.5, 1.0]
    total.backward()
    # d/ds (c exp(-s) L + 0.5 s) = -c L + 0.5
    assert bal.log_vars.grad.tolist() == pytest.approx([-0.5 * 3.0 + 0.5, -5.0 + 0.5], rel=1e-6)


def test_paper_variant_with_init_and_mapping() -> None:
    s = math.log(4.0)
    bal, _ = external(
        ["depth", "seg", "normal"], variant="paper", task_types={"seg": "classification"}, init=s
    )
    total = bal(const(1.0, 2.0, 4.0))
    expected = 0.5 / 4 * 1.0 + 1.0 / 4 * 2.0 + 0.5 / 4 * 4.0 + 3 * 0.5 * s
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert bal.last_weights.tolist() == pytest.approx([0.125, 0.25, 0.125], rel=1e-6)


def test_paper_variant_defaults_to_regression() -> None:
    bal, _ = external(2, variant="paper")
    assert bal(const(2.0, 6.0)).item() == pytest.approx(0.5 * 8.0, rel=1e-7)


# ---------------------------------------------------------------------- positive
def test_positive_variant_at_p_one() -> None:
    bal, _ = external(2, variant="positive")
    assert bal.log_vars.tolist() == [1.0, 1.0]
    total = bal(const(3.0, 0.5))
    assert total.item() == pytest.approx(0.5 * 3.0 + 0.5 * 0.5 + 2 * math.log(2.0), rel=1e-6)
    assert bal.last_weights.tolist() == [0.5, 0.5]
    total.backward()
    # d/dp (0.5 L / p^2 + log(1 + p^2)) = -L / p^3 + 2 p / (1 + p^2) = -L + 1 at p = 1
    assert bal.log_vars.grad.tolist() == pytest.approx([-3.0 + 1.0, -0.5 + 1.0], rel=1e-6)


def test_positive_variant_at_p_two() -> None:
    bal, _ = external(1, variant="positive", init=-2.0)
    total = bal(const(8.0))
    assert total.item() == pytest.approx(0.5 / 4 * 8.0 + math.log(5.0), rel=1e-6)
    assert bal.sigma.tolist() == [2.0]  # sigma = |p|


# ---------------------------------------------------------------------- the learned sigma
@pytest.mark.parametrize(
    ("variant", "types", "expected"),
    [
        # optimum of exp(-s) L + s (and of 0.5 exp(-s) L + 0.5 s): exp(s) = L
        ("kendall", None, [2.0, 0.5]),
        ("paper", None, [2.0, 0.5]),
        # classification in the paper form: exp(-s) L + 0.5 s, optimum exp(s) = 2 L
        ("paper", ["regression", "classification"], [2.0, math.sqrt(0.5)]),
    ],
)
def test_sigma_approaches_the_optimum_for_a_constant_loss(
    variant: str, types: list[str] | None, expected: list[float]
) -> None:
    bal = tb.UncertaintyWeighting(2, variant=variant, task_types=types, lr=0.1, record=False)
    for _ in range(300):
        bal(const(4.0, 0.25)).backward()
    assert bal.sigma.tolist() == pytest.approx(expected, rel=1e-3)


def test_positive_sigma_approaches_its_optimum() -> None:
    """0.5 L / q + log(1 + q) with q = p^2 is minimal where q^2 = 0.5 L (1 + q)."""
    bal = tb.UncertaintyWeighting(2, variant="positive", lr=0.1, record=False)
    for _ in range(300):
        bal(const(4.0, 0.25)).backward()
    expected = []
    for loss in (4.0, 0.25):
        q = (0.5 * loss + math.sqrt(0.25 * loss**2 + 2 * loss)) / 2
        expected.append(math.sqrt(q))
    assert bal.sigma.tolist() == pytest.approx(expected, rel=1e-3)


def test_sigma_of_a_task_with_noise_matches_its_mse() -> None:
    """Regression with Gaussian noise of std 3: sigma^2 goes to the mean squared error."""
    gen = torch.Generator().manual_seed(0)
    noise = 3.0 * torch.randn(4000, generator=gen)
    bal = tb.UncertaintyWeighting(1, lr=0.05, record=False)
    for i in range(400):
        chunk = noise[(i % 40) * 100 : (i % 40 + 1) * 100]
        bal([(chunk**2).mean()]).backward()
    mse = float((noise**2).mean())
    assert bal.sigma.item() == pytest.approx(math.sqrt(mse), rel=0.05)


def test_recorded_weights_are_the_factors_before_the_step() -> None:
    bal = tb.UncertaintyWeighting(2, lr=0.1)
    bal(const(5.0, 0.2)).backward()
    first = bal.last_weights.clone()
    assert first.tolist() == [1.0, 1.0]
    bal(const(5.0, 0.2)).backward()
    # after one Adam step s moved by +-0.1: factors exp(-0.1), exp(0.1)
    assert bal.last_weights.tolist() == pytest.approx([math.exp(-0.1), math.exp(0.1)], rel=1e-4)
    assert bal.history is not None
    assert torch.equal(bal.history.weights[0], first.double())
    assert bal.history.extra("sigma")[1].tolist() == pytest.approx(
        [math.exp(0.05), math.exp(-0.05)], rel=1e-4
    )


def test_float64_losses() -> None:
    bal, _ = external(2)
    total = bal(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert total.dtype == torch.float64
    assert total.item() == 3.0


# ---------------------------------------------------------------------- validation
def test_bad_variant() -> None:
    with pytest.raises(ValueError, match="variant"):
        tb.UncertaintyWeighting(2, variant="gaussian")  # type: ignore[arg-type]


def test_positive_variant_needs_non_zero_init() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        tb.UncertaintyWeighting(2, variant="positive", init=0.0)


def test_task_types_length() -> None:
    with pytest.raises(ValueError, match="3 task types"):
        tb.UncertaintyWeighting(2, variant="paper", task_types=["regression"] * 3)


def test_task_types_kind() -> None:
    with pytest.raises(ValueError, match=r"'b'.*segmentation"):
        tb.UncertaintyWeighting(
            ["a", "b"], variant="paper", task_types=["regression", "segmentation"]
        )
    with pytest.raises(ValueError, match="'a'"):
        tb.UncertaintyWeighting(["a", "b"], variant="paper", task_types={"a": "cls"})


def test_task_types_mapping_with_unknown_task_raises() -> None:
    with pytest.raises(
        tb.TaskMismatchError,
        match=r"task types do not match the tasks \['seg', 'depth'\].*unexpected \['sgm'\]",
    ):
        tb.UncertaintyWeighting(
            ["seg", "depth"], variant="paper", task_types={"sgm": "classification"}
        )


def test_loading_a_state_of_another_variant_raises() -> None:
    kendall = tb.UncertaintyWeighting(2)
    positive = tb.UncertaintyWeighting(2, variant="positive")
    with pytest.raises(tb.TaskBalanceError):
        positive.load_state_dict(save_load(kendall.state_dict()))


def test_own_optimizer_default_learning_rate() -> None:
    """optimizer="own" steps the log-variances with Adam at lr = 1e-3 by default: Adam's
    first step moves each by lr against the sign of its gradient (1 - L_i at s = 0)."""
    bal = tb.UncertaintyWeighting(["a", "b"])
    bal(const(3.0, 0.5, requires_grad=True)).backward()
    torch.testing.assert_close(
        bal.log_vars.detach(), torch.tensor([1e-3, -1e-3]), rtol=1e-4, atol=0
    )
