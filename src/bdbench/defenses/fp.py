"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

A backdoor tends to live in channels that clean inputs leave dormant. 1. Pruning: feed the clean
budget, rank the channels of the last convolutional layer by their mean activation, and prune them
in increasing order (dormant first) while the accuracy on the clean budget stays within
`max_accuracy_drop` (default 0.10, an absolute drop, as BackdoorBench's `acc_ratio` tolerance) of
the unpruned model's, and at most `max_pruned_ratio` (0.8: the authors' released code prunes 48 of
the 60 channels of their face model's last convolution) of the channels. 2. Fine-tuning: train the
pruned model on the clean budget, pruned channels held at zero, with the `ft` recipe (10 epochs of
SGD at lr 0.01, cosine schedule, batch 32).

The stopping point is chosen on the clean budget only (no test data, no triggered image): it is
the last pruning step whose budget accuracy is within the margin. Steps prune
ceil(channels / `max_evaluations`) channels at a time (one at a time up to 64 channels, as in the
paper), so that wide networks need at most `max_evaluations` passes over the budget.

Which layer: the final spatial feature map (`layers.feature_map_layer`), i.e. the output of the
last convolutional layer after its activation (and pooling), which is what the paper ranks; for
residual networks it is the last block's output, whose channels are those of the last convolution.
The activation of a channel is the mean over budget images and positions of max(0, map): where the
map is taken just before the final ReLU (pre-activation ResNets) this is the activation that ReLU
passes on; where the map is already post-ReLU it is the map itself. A channel is pruned by zeroing
its output (`layers.mask_channels`, a module wrapped around that layer, so the mask survives
BatchNorm folding and quantization), which works on every registered architecture.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.ft import fine_tune
from bdbench.defenses.layers import feature_map_layer, mask_channels, read_activations
from bdbench.params import NonNegativeInt, OpenRate, PositiveFloat, PositiveInt, UpToOne
from bdbench.training import predict


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).double().mean())


def prune_dormant_channels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_accuracy_drop: float,
                           max_pruned_ratio: float, max_evaluations: int = 64) -> torch.Tensor:
    """Prune `model` in place: zero the channels of its final feature map, least active on the uint8
    images `x` first, as long as the accuracy on (x, y) stays within `max_accuracy_drop` of the
    unpruned model's. Returns the boolean mask of kept channels."""
    device = next(model.parameters()).device
    layer = feature_map_layer(model, x[:1].to(device).float().div(255.0))
    activation = read_activations(model, x, "feature_map").clamp_min(0).mean(dim=(0, 2, 3))
    order = torch.argsort(activation, stable=True)
    channels = len(order)
    keep = torch.ones(channels, dtype=torch.bool)
    layer = mask_channels(model, layer, keep)
    baseline = _accuracy(model, x, y)
    step = max(1, math.ceil(channels / max_evaluations))
    pruned = 0
    for count in range(step, int(max_pruned_ratio * channels) + 1, step):
        trial = keep.clone()
        trial[order[:count]] = False
        mask_channels(model, layer, trial)
        if baseline - _accuracy(model, x, y) > max_accuracy_drop:
            break
        pruned = count
    keep[order[:pruned]] = False
    mask_channels(model, layer, keep)
    return keep


@DEFENSES.register("fp")
class FinePruning(Defense):
    """Fine-Pruning (Liu et al. 2018): prune the last convolutional layer's dormant channels, then fine-tune."""

    kind = DefenseKind.MODEL_REPAIR
    citation = "Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks. RAID 2018."

    def __init__(self, max_accuracy_drop: OpenRate = 0.10, max_pruned_ratio: UpToOne = 0.8,
                 epochs: NonNegativeInt = 10, lr: PositiveFloat = 0.01, batch_size: PositiveInt = 32,
                 max_evaluations: PositiveInt = 64) -> None:
        # epochs 0 prunes without fine-tuning
        self.max_accuracy_drop = float(max_accuracy_drop)
        self.max_pruned_ratio = float(max_pruned_ratio)
        self.epochs, self.lr, self.batch_size, self.max_evaluations = epochs, lr, batch_size, max_evaluations

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model)
        prune_dormant_channels(model, context.clean_x, context.clean_y, self.max_accuracy_drop,
                               self.max_pruned_ratio, self.max_evaluations)
        if self.epochs:
            fine_tune(context, model, context.clean_x, context.clean_y, epochs=self.epochs, lr=self.lr,
                      batch_size=self.batch_size, purpose="fp")
        return DefenseOutcome(model=model)
