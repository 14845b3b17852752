"""ROC AUC and Hamming loss: hand-computed cases and the pairwise definition."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance.problems._scores import average_ranks, hamming_loss, roc_auc


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2, by enumeration."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_hand_case() -> None:
    # positives at 0.8 and 0.4, negatives at 0.5 and 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5,
    # 0.4>0.1) -> 3 of 4
    auc = roc_auc(torch.tensor([0.8, 0.5, 0.4, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert auc == pytest.approx(0.75)


def test_ties_count_half() -> None:
    # every score equal: each pair is a tie -> 1/2
    assert roc_auc(torch.zeros(5), torch.tensor([1, 0, 1, 0, 0])) == pytest.approx(0.5)
    # one tie between a positive and a negative, one clean win: (1 + 0.5) / 2
    assert roc_auc(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1, 1, 0])) == pytest.approx(0.75)


def test_perfect_and_reversed() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([-3.0, -1.0, 2.0, 5.0])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0


@given(
    st.lists(st.tuples(st.integers(-4, 4), st.integers(0, 1)), min_size=2, max_size=30).filter(
        lambda rows: len({y for _, y in rows}) == 2
    )
)
def test_matches_the_pairwise_definition(rows: list[tuple[int, int]]) -> None:
    scores = [float(s) for s, _ in rows]
    labels = [y for _, y in rows]
    got = roc_auc(torch.tensor(scores), torch.tensor(labels))
    assert got == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_average_ranks_share_ties() -> None:
    ranks = average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [([1, 1, 1], "no negative"), ([0, 0, 0], "no positive"), ([0, 2, 1], "0 or 1")],
)
def test_undefined_auc_is_refused(labels: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=f"task 'x'.*{message}|{message}"):
        roc_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor(labels), name="task 'x'")


def test_non_finite_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="not all finite"):
        roc_auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_hamming_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 3.0, -2.0]])
    labels = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # wrong: (0,1) predicted 0 for 1, (0,2) predicted 1 for 0, (1,2) predicted 0 for 1
    assert hamming_loss(logits, labels) == pytest.approx(3 / 6)


def test_hamming_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        hamming_loss(torch.zeros(2, 3), torch.zeros(3, 2))
