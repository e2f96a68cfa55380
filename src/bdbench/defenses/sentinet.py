"""SentiNet (Chou, Tramer and Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against
Deep Learning Systems", IEEE S&P Workshops 2020).

A localized trigger is both the region the model attends to and a region that hijacks any image
it is pasted on. For each input, Grad-CAM (at the final feature map, for the predicted class)
picks the most salient `region_fraction` of pixels; that region is transplanted onto `carriers`
clean images from the defender's budget, and the score is the fooled rate, the share of them
then predicted as the input's class. Threshold: the clean budget's fooled rates (budget images
transplanted onto other budget images) at a `false_rejection` rate of 5%.

The region holds exactly `region_fraction` of the pixels (ties broken by position), fewer where
Grad-CAM, which is zero wherever its weighted sum is negative, marks fewer as salient at all.

Simplifications, each a deliberate reduction of the paper's pipeline to what a class-agnostic
benchmark can run without extra models or tuning per data set:
- the paper also proposes other candidate classes (from the predictions on segments of the
  input) and subtracts their Grad-CAM regions from the predicted class's; we take the predicted
  class's region alone (as BackdoorBench's `detection_infer/sentinet.py`, which keeps the pixels
  whose min-max scaled Grad-CAM is at least 0.85 where we keep a fixed share);
- the paper also measures the average confidence on an inert (noise) pattern in the same region and
  fits its decision boundary on clean inputs in that 2-D plane (fooled count against inert
  confidence); we keep the fooled rate alone and cut it at the clean budget's quantile.
"""

from __future__ import annotations

import torch

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import grad_cam
from bdbench.defenses.scoring import ThresholdDetector, clean_threshold
from bdbench.params import OpenRate, PositiveInt
from bdbench.training import predict


def salient_masks(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor,
                  region_fraction: float) -> torch.Tensor:
    """Boolean (N, H, W) masks of the `region_fraction` most salient pixels of float images for `classes`:
    exactly that many (ties broken by position), less where fewer pixels have any saliency at all."""
    cams = grad_cam(model, images, classes).flatten(1)
    keep = max(1, int(round(region_fraction * cams.shape[1])))
    top = cams.topk(keep, dim=1)
    masks = torch.zeros(cams.shape, dtype=torch.bool, device=cams.device)
    masks.scatter_(1, top.indices, top.values > 0)  # Grad-CAM's ReLU zeroes the rest: they are not salient
    return masks.view(-1, *images.shape[-2:])


def fooled_rate(model: torch.nn.Module, x: torch.Tensor, carriers: torch.Tensor, region_fraction: float,
                chunk: int = 64) -> torch.Tensor:
    """Share of carrier images that take each uint8 input's predicted class once its salient region is pasted in."""
    rates = []
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        classes = predict(model, xb)
        masks = salient_masks(model, xb.float().div(255.0), classes, region_fraction)[:, None, None]
        pasted = torch.where(masks, xb[:, None], carriers[None])  # (n, carriers, C, H, W)
        hits = predict(model, pasted.flatten(0, 1)).view(len(xb), len(carriers)) == classes[:, None]
        rates.append(hits.float().mean(1))
    return torch.cat(rates)


@DEFENSES.register("sentinet")
class SentiNet(Defense):
    """SentiNet (Chou et al. 2020): flag inputs whose Grad-CAM region hijacks clean images it is pasted on."""

    kind = DefenseKind.INPUT_DETECTION
    citation = ("Chou, Tramer, Pellegrino. SentiNet: Detecting Localized Universal Attacks Against Deep Learning "
                "Systems. IEEE S&P Workshops 2020.")

    def __init__(self, carriers: PositiveInt = 100, region_fraction: OpenRate = 0.15,
                 false_rejection: OpenRate = 0.05) -> None:
        self.carriers = carriers
        self.region_fraction = float(region_fraction)
        self.false_rejection = float(false_rejection)

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model, budget = context.model, context.clean_x
        generator = context.generator("sentinet")
        order = torch.randperm(len(budget), generator=generator)
        carriers = budget[order[:min(self.carriers, len(budget) // 2)]]
        scored = budget[order[len(carriers):]]  # calibrate on budget images that are not carriers
        threshold = clean_threshold(fooled_rate(model, scored, carriers, self.region_fraction), self.false_rejection)
        detector = ThresholdDetector(lambda x: fooled_rate(model, x, carriers, self.region_fraction), threshold)
        return DefenseOutcome(input_detector=detector, threshold=threshold)
