"""Channel Lipschitzness-based Pruning (Zheng, Zhang, Wang, Liang and Zhang, "Data-free Backdoor
Removal based on Channel Lipschitzness", ECCV 2022).

Data-free. A backdoor makes a few channels react strongly to a small trigger: their upper bound of
the channel Lipschitz constant (UCLC) stands out. For output channel k of a convolution W read
directly by a BatchNorm layer, the channel's map is W_k (its in_channels/groups x kernel-area
matrix) scaled by gamma_k / sqrt(var_k + eps), so UCLC_k = sigma_max(W_k) |gamma_k| / sqrt(var_k +
eps). Within each layer, channels whose UCLC exceeds mean + u x std of the layer's UCLCs are
pruned (u = 3, the paper's default) by zeroing the BatchNorm's scale and shift for them. A layer of n
channels cannot hold a value more than (n - 1) / sqrt(n) standard deviations above its mean (3.75 at
n = 16), so on narrow networks u = 3 prunes little or nothing; `u` is a parameter.

Which convolution feeds which BatchNorm is found by tracing one forward pass of a blank image
(`layers.conv_norm_pairs`), not by registration order. A convolution that no BatchNorm reads
directly (a pre-activation ResNet's second convolution, whose output joins the residual sum; a
squeeze-excitation gate; ConvNeXt's depthwise convolution, read by a LayerNorm after a permutation;
a ViT's patch embedding) has no per-channel affine to fold, so with `unpaired: conv` (the default)
its UCLC is the spectral norm of W_k alone and pruning zeroes that output channel's weights and
bias; `unpaired: skip` leaves such convolutions alone. Linear layers are never pruned (the paper's
bound is for convolutions). No clean data is used: nothing here is tuned.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import conv_norm_pairs
from bdbench.params import NonNegativeFloat


def channel_lipschitz_bounds(conv: nn.Conv2d, norm: nn.Module | None) -> torch.Tensor:
    """UCLC of every output channel of `conv`, folded with `norm` where it is a BatchNorm2d."""
    weight = conv.weight.detach().float()
    bounds = torch.linalg.matrix_norm(weight.flatten(2), ord=2)  # (out, in/groups, kh*kw) -> (out,)
    if isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None:
        scale = norm.weight.detach().float() if norm.weight is not None else torch.ones_like(bounds)
        bounds = bounds * (scale / (norm.running_var.float() + norm.eps).sqrt()).abs()
    return bounds


def outlier_channels(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """Channels whose bound exceeds the layer's mean + u x std (none in a layer of one channel)."""
    if len(bounds) < 2:
        return torch.zeros_like(bounds, dtype=torch.bool)
    return bounds > bounds.mean() + u * bounds.std()


@DEFENSES.register("clp")
class ChannelLipschitzPruning(Defense):
    """CLP (Zheng et al. 2022): data-free pruning of channels with an outlying Lipschitz upper bound."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Zheng, Zhang, Wang, Liang, Zhang. Data-free Backdoor Removal based on Channel Lipschitzness. "
                "ECCV 2022.")

    def __init__(self, u: NonNegativeFloat = 3.0, unpaired: Literal["conv", "skip"] = "conv") -> None:
        self.u, self.unpaired = u, unpaired

    def run(self, context: DefenseContext) -> DefenseOutcome:
        model = copy.deepcopy(context.model).to(context.device).eval()
        blank = torch.zeros(1, context.in_channels, context.image_size, context.image_size, device=context.device)
        with torch.no_grad():
            for conv, norm in conv_norm_pairs(model, blank):
                if not isinstance(norm, nn.BatchNorm2d) and self.unpaired == "skip":
                    continue
                pruned = outlier_channels(channel_lipschitz_bounds(conv, norm), self.u).to(conv.weight.device)
                weight: torch.Tensor
                bias: torch.Tensor | None
                if isinstance(norm, nn.BatchNorm2d) and norm.weight is not None:  # zero the folded scale
                    weight, bias = norm.weight, norm.bias
                else:
                    weight, bias = conv.weight, conv.bias
                weight[pruned] = 0.0
                if bias is not None:
                    bias[pruned] = 0.0
        return DefenseOutcome(model=model)
