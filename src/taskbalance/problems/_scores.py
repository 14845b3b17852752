"""Scores of binary predictions: ROC AUC and the Hamming loss (pure functions).

* ROC AUC, the probability that a random positive scores above a random negative (ties
  count one half): with ``r_i`` the rank of score ``i`` among all ``n`` scores (1 = lowest,
  tied scores share the mean of their ranks), ``n₊`` positives and ``n₋`` negatives,

      AUC = (Σ_{i positive} r_i − n₊(n₊ + 1)/2) / (n₊ n₋)

  (the Mann–Whitney U statistic divided by ``n₊ n₋``; Hanley & McNeil, Radiology 1982).
* Hamming loss of a multi-label prediction (Schapire & Singer, Machine Learning 2000): the
  fraction of (example, label) pairs predicted wrong, labels predicted positive where the
  logit is above 0 (probability above 1/2).
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..n`` of a 1-D tensor's values (float64), ties sharing the mean of their ranks."""
    if values.dim() != 1:
        raise ValueError(f"expected a 1-D tensor, got shape {tuple(values.shape)}")
    n = values.numel()
    sorted_values, order = torch.sort(values.double(), stable=True)
    # the first and last position of each run of equal values, mapped back to every member
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()  # 1-based last rank of each run
    starts = ends - counts.double() + 1
    ranks_sorted = ((starts + ends) / 2)[inverse]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(scores: Tensor, labels: Tensor, name: str = "the task") -> float:
    """ROC AUC of ``scores`` (any monotone score, e.g. logits) for 0/1 ``labels``.

    Raises:
        ValueError: the shapes differ, a label is not 0 or 1, or one class is absent (the
            AUC is undefined; ``name`` says which task).
    """
    scores = scores.detach().reshape(-1)
    labels = labels.detach().reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"{name}: {scores.numel()} scores for {labels.numel()} labels; give one each"
        )
    positive = labels == 1
    if not bool((positive | (labels == 0)).all()):
        raise ValueError(f"{name}: labels must be 0 or 1")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: the scores are not all finite")
    n_pos = int(positive.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        kind = "positive" if n_pos == 0 else "negative"
        raise ValueError(f"{name}: the AUC is undefined, there is no {kind} example")
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def hamming_loss(logits: Tensor, labels: Tensor) -> float:
    """Fraction of entries of ``(N, L)`` 0/1 ``labels`` that ``logits > 0`` gets wrong."""
    if logits.shape != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape"
        )
    if labels.numel() == 0:
        raise ValueError("the Hamming loss of no prediction is undefined")
    wrong = (logits.detach() > 0) != (labels.detach() == 1)
    return float(wrong.double().mean())
