"""Pure metric functions. The runner computes every number; defenses never score themselves."""

from __future__ import annotations

import torch


def _share(hits: torch.Tensor) -> float | None:
    return float(hits.double().mean()) if hits.numel() else None


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of predictions equal to the true labels (clean accuracy on clean images)."""
    return _share(pred == y)


def attack_success_rate(pred_triggered: torch.Tensor, y_target: torch.Tensor) -> float | None:
    """Share of triggered images (whose true label is not the target) predicted as the target."""
    return _share(pred_triggered == y_target)


def robust_accuracy(pred_triggered: torch.Tensor, y_true: torch.Tensor) -> float | None:
    """Share of triggered images still predicted as their true label."""
    return _share(pred_triggered == y_true)


def defense_effectiveness_rating(clean_acc_before: float, asr_before: float,
                                 clean_acc_after: float, asr_after: float) -> float:
    """BackdoorBench's DER in [0, 1]: (max(0, ASR drop) - max(0, CA drop) + 1) / 2.

    Wu et al., "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning", NeurIPS 2022.
    0.5 means no change; 1 means ASR fell by 100 points at no accuracy cost.
    """
    asr_drop = max(0.0, asr_before - asr_after)
    acc_drop = max(0.0, clean_acc_before - clean_acc_after)
    return (asr_drop - acc_drop + 1.0) / 2.0


def detection_rates(flagged: torch.Tensor, is_positive: torch.Tensor) -> tuple[float | None, float | None]:
    """(TPR, FPR) of boolean flags against ground truth; None where a class has no members."""
    flagged, is_positive = flagged.bool(), is_positive.bool()
    return _share(flagged[is_positive]), _share(flagged[~is_positive])


def auroc(scores: torch.Tensor, is_positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` (higher = more suspicious), ties counted half.

    Computed as the Mann-Whitney U statistic from average ranks; None when either class is empty.
    """
    scores = scores.double().flatten()
    is_positive = is_positive.bool().flatten()
    n_pos = int(is_positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    ranks[order] = (rank_sums / counts)[inverse]
    u = float(ranks[is_positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
