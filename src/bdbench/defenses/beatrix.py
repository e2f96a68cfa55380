"""Beatrix (Ma, Wang, Sun, Xue, Wen and Xiang, "The 'Beatrix' Resurrections: Robust Backdoor
Detection via Gram Matrices", NDSS 2023), applied to the training set.

A triggered input carries feature correlations that clean inputs of the class it is classified
as do not. For an image, take the final spatial feature map F (C x HW) and its Gram matrices of
orders p = 1..`orders` (8, as the authors' code), G_p = sign(F^p F^p') |F^p F^p'|^(1/p) (upper
triangle), the features of Sastry and Oore (ICML 2020) that Beatrix builds on; the signed root
keeps the sign of correlations between channels that can be negative (a pre-activation network's
final map, after BatchNorm and before the ReLU, for one). For each class, the clean budget's
samples the model assigns to it give robust bounds of every Gram entry, median +- `mad_scale` x MAD
(Beatrix's replacement of Sastry and Oore's min/max; 10 and the raw MAD, as the authors' code). A
sample's deviation is the mean over entries of its distance outside the bounds, in units of the
entry's typical size on the budget. A training sample is scored at the class the model predicts for
it and flagged when its deviation exceeds that class's threshold: the (1 - `false_rejection`) order
statistic (95%, as the authors' code) of the class's clean deviations, each measured against bounds
from the other folds of a 5-fold split of the class's budget samples (their threshold_determine).

Deviations from the authors' code (github:wanlunsec/Beatrix, defenses/Beatrix/Beatrix.py):
- The unit of an entry's deviation. Theirs, after Sastry and Oore, is the bound crossed:
  (low - G) / |low| below, (G - high) / |high| above. On a final map after a ReLU (cnn-small's,
  ResNet-18's) many channels are silent for a class, so both bounds of their products are 0, and
  any activation there is divided by ~1e-6 and swamps the score: on the tests' digits BadNets model
  (seed 0) with 30 clean images a class, that unit gave an AUROC of 0.81 and caught 11% of the
  poisons, and the entry's typical size on the whole budget (its median magnitude, floored at 1% of
  the mean of those medians) gave 0.99 and 93%, with 3% of clean samples flagged either way.
- The layer: the final spatial feature map of any architecture (layers.feature_map_layer); their
  demo hooks the input of PreActResNet-18's layer4, one stage earlier, a map that is not rectified.
- A class with fewer than two budget samples gets no threshold, and none of its samples is flagged;
  the median of an even count is the mean of the two middle values (torch's is the lower one).
- Beatrix is a run-time input detector; here its per-input verdict is applied to the training set,
  and its model-level step (the kernel MMD between flagged and kept inputs of each class, to name a
  target label) is not used: a training-set cleanser removes the flagged samples of every class.

Scores are the deviations themselves; the flagged set follows per-class thresholds, so there is no
single threshold (`threshold` stays None).
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import read_activations
from bdbench.defenses.scoring import mad, median
from bdbench.params import OpenRate, PositiveInt
from bdbench.training import predict

_FOLDS = 5


def gram_features(feature_maps: torch.Tensor, orders: int) -> torch.Tensor:
    """(N, orders x C(C+1)/2) Gram-matrix entries of feature maps (N, C, H, W) for p = 1..orders,
    each entry's p-th root taken with its sign."""
    c = feature_maps.shape[1]
    flat = feature_maps.double().flatten(2)
    upper = torch.triu_indices(c, c)
    out = []
    for p in range(1, orders + 1):
        powered = flat.pow(p)
        gram = powered @ powered.transpose(1, 2)
        out.append((gram.sign() * gram.abs().pow(1.0 / p))[:, upper[0], upper[1]])
    return torch.cat(out, 1)


class GramBounds:
    """Per-class robust bounds of Gram entries, and the deviation of samples from them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, mad_scale: float,
                 scale: torch.Tensor) -> None:
        dim = features.shape[1]
        self.scale = scale
        self.low = torch.full((num_classes, dim), -float("inf"), dtype=torch.float64)
        self.high = torch.full((num_classes, dim), float("inf"), dtype=torch.float64)
        for label in labels.unique():
            rows = features[labels == label].double()
            centre, spread = median(rows), mad_scale * mad(rows)
            self.low[label], self.high[label] = centre - spread, centre + spread

    def deviation(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Mean over entries of the distance outside the bounds of `classes`, in units of `scale` (0 for a
        class without bounds)."""
        low, high = self.low[classes], self.high[classes]
        outside = (low - features).clamp_min(0) + (features - high).clamp_min(0)
        return (outside.nan_to_num(0.0, posinf=0.0) / self.scale).mean(1)


def typical_size(features: torch.Tensor) -> torch.Tensor:
    """Each Gram entry's median magnitude over the budget, floored at 1% of the mean of those medians (so
    that entries that are zero on clean data do not divide by zero)."""
    typical = median(features.abs())
    return typical + 0.01 * typical.mean()


def class_thresholds(features: torch.Tensor, labels: torch.Tensor, num_classes: int, mad_scale: float,
                     scale: torch.Tensor, false_rejection: float) -> torch.Tensor:
    """Per class, the (1 - false_rejection) order statistic of its clean samples' deviations, each measured
    against bounds from the other folds of a 5-fold split of the class (in order; the last n mod 5 samples are
    never held out, as in the authors' code); +inf for a class with fewer than two samples."""
    thresholds = torch.full((num_classes,), float("inf"), dtype=torch.float64)
    for label in labels.unique():
        rows = features[labels == label]
        folds = min(_FOLDS, len(rows))
        if folds < 2:
            continue
        size, held_out = len(rows) // folds, []
        zeros = torch.zeros(len(rows), dtype=torch.long)
        for fold in range(folds):
            test = torch.zeros(len(rows), dtype=torch.bool)
            test[fold * size:(fold + 1) * size] = True
            bounds = GramBounds(rows[~test], zeros[~test], 1, mad_scale, scale)
            held_out.append(bounds.deviation(rows[test], zeros[test]))
        ordered = torch.cat(held_out).sort().values
        thresholds[label] = ordered[min(int(len(ordered) * (1.0 - false_rejection)), len(ordered) - 1)]
    return thresholds


@DEFENSES.register("beatrix")
class Beatrix(Defense):
    """Beatrix (Ma et al. 2023): flag samples whose Gram-matrix feature correlations leave their class's clean range."""

    kind = DefenseKind.DATA_DETECTION
    citation = ("Ma, Wang, Sun, Xue, Wen, Xiang. The 'Beatrix' Resurrections: Robust Backdoor Detection via Gram "
                "Matrices. NDSS 2023.")

    def __init__(self, orders: PositiveInt = 8, mad_scale: float = 10.0, false_rejection: OpenRate = 0.05) -> None:
        self.orders, self.mad_scale = orders, mad_scale
        self.false_rejection = float(false_rejection)

    def _features(self, context: DefenseContext, x: torch.Tensor) -> torch.Tensor:
        return gram_features(read_activations(context.model, x, "feature_map"), self.orders)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        clean = self._features(context, context.clean_x)
        clean_classes = predict(context.model, context.clean_x)  # the class the model assigns, as the authors'
        scale = typical_size(clean)
        thresholds = class_thresholds(clean, clean_classes, context.num_classes, self.mad_scale, scale,
                                      self.false_rejection)
        bounds = GramBounds(clean, clean_classes, context.num_classes, self.mad_scale, scale)
        train_x, _ = context.training_set()
        predicted = predict(context.model, train_x)
        scores = bounds.deviation(self._features(context, train_x), predicted)
        return DefenseOutcome(sample_scores=scores, flagged=scores > thresholds[predicted])
