"""Small helpers shared by the detection defenses: thresholds set on the clean budget, robust
statistics (median, MAD, anomaly index), and the per-class removal budget of the spectral cleansers."""

from __future__ import annotations

from statistics import NormalDist
from typing import Callable

import torch

# 1 / Phi^-1(3/4) = 1.4826: scales the median absolute deviation to estimate a normal standard deviation.
MAD_CONSISTENCY = 1.0 / NormalDist().inv_cdf(0.75)


def median(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The median along `dim`: for an even count the mean of the two middle values, as the MAD and the
    anomaly index are defined (torch.median returns the lower of the two)."""
    ordered = values.double().sort(dim).values
    count = values.shape[dim]
    return (ordered.select(dim, (count - 1) // 2) + ordered.select(dim, count // 2)) / 2


def mad(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The median absolute deviation from the median along `dim`, unscaled."""
    centre = median(values, dim).unsqueeze(dim)
    return median((values.double() - centre).abs(), dim)


def scaled_mad(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The median absolute deviation along `dim`, times MAD_CONSISTENCY (a robust standard deviation)."""
    return MAD_CONSISTENCY * mad(values, dim)


def anomaly_index(values: torch.Tensor) -> torch.Tensor:
    """(value - median) / scaled MAD of a 1-D tensor: the anomaly index of Neural Cleanse (Wang et al.,
    IEEE S&P 2019) with its sign (negative below the median); SCAn uses it one-sided."""
    return (values.double() - median(values)) / scaled_mad(values).clamp_min(1e-12)


def clean_threshold(clean_scores: torch.Tensor, false_rejection: float) -> float:
    """The threshold that flags (score > threshold) at most `false_rejection` of the clean budget's
    scores: their empirical (1 - false_rejection) quantile, which assumes nothing about their distribution
    (STRIP's paper fits a normal instead; `defenses.strip.entropy_boundary`)."""
    scores = clean_scores.double().flatten()
    if not len(scores):
        raise ValueError("the clean budget gave no scores to set a threshold on")
    return float(torch.quantile(scores, 1.0 - false_rejection))


def removal_budget(poison_fraction: float, class_size: int) -> int:
    """How many of a class's n_c samples the spectral cleansers remove: round(1.5 x eps x n_c), eps
    (`poison_fraction`) the defender's bound on the poisoned share of a class (Tran et al. 2018,
    Algorithm 1; Hayase et al. 2021), at most half the class (their assumption that most of every
    class is clean; it binds only for eps > 1/3)."""
    return min(round(1.5 * poison_fraction * class_size), class_size // 2)


def top_k_flags(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean flags for the k highest scores."""
    flags = torch.zeros(len(scores), dtype=torch.bool)
    if k > 0:
        flags[torch.topk(scores, k).indices] = True
    return flags


class ThresholdDetector:
    """A run-time input detector: `score` maps uint8 images to suspicion scores (higher = more
    likely triggered); an image is flagged when its score exceeds `threshold`."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], threshold: float) -> None:
        self.score, self.threshold = score, threshold

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(x).double().cpu()
        return scores, scores > self.threshold


def remove_per_class(labels: torch.Tensor, poison_fraction: float, min_size: int,
                     score_class: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectral cleansers' loop: for each class with at least `min_size` samples, score its members
    with `score_class(member_indices, budget)` and flag its `removal_budget` highest. Scores are
    divided by their class mean so that they compare across classes (for AUROC)."""
    scores = torch.zeros(len(labels), dtype=torch.float64)
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        if len(members) < min_size:
            continue
        budget = removal_budget(poison_fraction, len(members))
        class_scores = score_class(members, budget)
        scores[members] = class_scores / class_scores.mean().clamp_min(1e-12)
        flagged[members] = top_k_flags(class_scores, budget)
    return scores, flagged
