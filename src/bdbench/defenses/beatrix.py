"""Beatrix (Ma, Wang, Sun, Xue, Zhang, Nepal, Abuadbba, Xiang, "Beatrix the Robust Backdoor
Detector: Gram Matrices Reveal Backdoor Inputs", NDSS 2023), applied to the training set.

A triggered input carries feature correlations that clean inputs of the class it is classified
as do not. For an image, take the final spatial feature map F (C x HW) and its Gram matrices of
orders p = 1..`orders`, G_p = (F^p F^p')^(1/p) (upper triangle), the features of Sastry and Oore
(ICML 2020) that Beatrix builds on. For each class, the defender's clean budget gives robust
bounds of every Gram entry: median +- `mad_scale` x 1.4826 x MAD (Beatrix's robust replacement
of min/max). A sample's deviation is the sum over entries of its distance outside the bounds,
in units of the entry's typical size on the budget, at the class the model predicts for it. Threshold: the clean
budget's own deviations, computed with leave-half-out bounds (each half of the budget is scored
against bounds from the other half), at a `false_rejection` rate of 5%.
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.defenses.scoring import clean_threshold, median, scaled_mad
from bdbench.params import OpenRate, PositiveInt
from bdbench.training import predict


def gram_features(feature_maps: torch.Tensor, orders: int) -> torch.Tensor:
    """(N, orders x C(C+1)/2) Gram-matrix entries of feature maps (N, C, H, W) for p = 1..orders."""
    c = feature_maps.shape[1]
    flat = feature_maps.double().flatten(2)
    upper = torch.triu_indices(c, c)
    out = []
    for p in range(1, orders + 1):
        powered = flat.pow(p)
        gram = (powered @ powered.transpose(1, 2)).clamp_min(0).pow(1.0 / p)
        out.append(gram[:, upper[0], upper[1]])
    return torch.cat(out, 1)


class GramBounds:
    """Per-class robust bounds of Gram entries, and the deviation of samples from them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, mad_scale: float) -> None:
        dim = features.shape[1]
        # Each entry's deviation is measured in units of its typical size over the whole budget
        # (floored, so that entries that are zero on clean data do not divide by zero).
        typical = median(features.abs())
        self.scale = typical + 0.01 * typical.mean()
        self.low = torch.full((num_classes, dim), -float("inf"), dtype=torch.float64)
        self.high = torch.full((num_classes, dim), float("inf"), dtype=torch.float64)
        for label in labels.unique():
            rows = features[labels == label]
            centre, spread = median(rows), mad_scale * scaled_mad(rows)
            self.low[label], self.high[label] = centre - spread, centre + spread

    def deviation(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        low, high = self.low[classes], self.high[classes]
        outside = (low - features).clamp_min(0) + (features - high).clamp_min(0)
        return (outside.nan_to_num(0.0, posinf=0.0) / self.scale).sum(1)


@DEFENSES.register("beatrix")
class Beatrix(Defense):
    """Beatrix (Ma et al. 2023): flag samples whose Gram-matrix feature correlations leave their class's clean range."""

    kind = DefenseKind.DATA_DETECTION
    citation = ("Ma et al. Beatrix the Robust Backdoor Detector: Gram Matrices Reveal Backdoor Inputs. NDSS 2023.")

    def __init__(self, orders: PositiveInt = 8, mad_scale: float = 3.0, false_rejection: OpenRate = 0.05) -> None:
        self.orders, self.mad_scale = orders, mad_scale
        self.false_rejection = float(false_rejection)

    def _features(self, context: DefenseContext, x: torch.Tensor) -> torch.Tensor:
        return gram_features(read_activations(context.model, x, "feature_map"), self.orders)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        clean = self._features(context, context.clean_x)
        clean_y = context.clean_y
        halves = torch.rand(len(clean_y), generator=context.generator("beatrix")) < 0.5
        held_out = torch.zeros(len(clean_y), dtype=torch.float64)
        for half in (halves, ~halves):
            bounds = GramBounds(clean[~half], clean_y[~half], context.num_classes, self.mad_scale)
            held_out[half] = bounds.deviation(clean[half], clean_y[half])
        threshold = clean_threshold(held_out, self.false_rejection)
        bounds = GramBounds(clean, clean_y, context.num_classes, self.mad_scale)
        train_x, _ = context.training_set()
        predicted = predict(context.model, train_x)
        scores = bounds.deviation(self._features(context, train_x), predicted)
        return DefenseOutcome(sample_scores=scores, flagged=scores > threshold, threshold=threshold)
