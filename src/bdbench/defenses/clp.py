"""Channel Lipschitzness-based Pruning (Zheng, Tang, Li and Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022; arXiv:2208.03111).

Data-free. A backdoor makes a few channels react strongly to a small trigger: their upper bound of
the channel Lipschitz constant (UCLC) stands out. For output channel k of a convolution W read
directly by a BatchNorm layer, the channel's map is W_k (its in_channels/groups x kernel-area
matrix) scaled by gamma_k / sqrt(var_k + eps), so UCLC_k = sigma_max(W_k) |gamma_k| / sqrt(var_k +
eps). Within each layer, channels whose UCLC exceeds mean + u x std of the layer's UCLCs (the sample
standard deviation) are pruned (u = 3, the paper's default) by zeroing the BatchNorm's scale and
shift for them, so the channel's output is exactly zero. A layer of n channels cannot hold a value
more than (n - 1) / sqrt(n) standard deviations above its mean (3.75 at n = 16), so on narrow
networks u = 3 prunes little or nothing; `u` is a parameter.

Which convolution feeds which normalisation layer is found by tracing one forward pass of a blank
image (`layers.conv_norm_pairs`), not by registration order. A convolution that no BatchNorm reads
directly (a pre-activation ResNet's second convolution, whose output joins the residual sum; a
squeeze-excitation gate; ConvNeXt's depthwise convolution, read by a LayerNorm after a permutation;
a ViT's patch embedding; a convolution read by a GroupNorm or a channel LayerNorm, whose scale
depends on the data) has no data-free per-channel scale to fold, so with `unpaired: conv` (the
default) its UCLC is the spectral norm of W_k alone, the paper's bound before the BatchNorm fold;
the authors' code never prunes such convolutions (see below). A pruned channel is silenced where it
leaves the pair: a normalisation layer that reads the convolution has its per-channel scale and
shift zeroed (or, where it has none, as in a BatchNorm without affine, its output channel masked),
since zeroing the convolution's channel would leave the normaliser's output at beta - gamma mu /
sigma, not zero, and would shift its group's statistics; a convolution read by anything else has
that output channel's weights and bias zeroed. That zero is what the next layer sees, which is not
always a silenced channel: a squeeze-excitation gate opens to sigmoid(0) = 1/2, and ConvNeXt's
depthwise channel still leaves its LayerNorm (which the trace does not see through the permutation)
as beta_k - gamma_k mu / sigma.
`unpaired: skip` leaves all such convolutions alone. Linear layers are never pruned (the paper's
bound is for convolutions). No clean data is used: nothing here is tuned.

Where this differs from the authors' release (github.com/rkteddy/channel-Lipschitzness-based-pruning,
`defense.py`) and BackdoorBench's copy of it (`defense/clp.py`, `CLP_prune`), which agree line for
line with each other:

- Pairing. Both fold every `nn.BatchNorm2d` with the `nn.Conv2d` registered last before it (their
  comment: "Convolutional layer should be followed by a BN layer by default"), and never prune a
  convolution that no BatchNorm follows. On networks where every convolution feeds its own
  BatchNorm (ResNet-18, VGG-BN, the authors' models) the pairs are the same as ours. On a
  pre-activation ResNet-18 (BackdoorBench's model) 8 of its 17 BatchNorms (bn1 of every block but
  the first, and the final bn) read a residual sum, not a convolution: their code folds each into
  the previous block's conv2 or shortcut and zeroes it; here those BatchNorms are left alone and
  the 8 conv2 and 3 shortcut convolutions are pruned on their own weights instead (with the
  default `unpaired: conv`). The authors' README says their code has to be adapted for
  pre-activation ResNets and VGG; registration order cannot pair DenseNet's concatenations at all.
- Epsilon. They divide by sqrt(running_var), we by sqrt(running_var + eps), which is what the
  BatchNorm itself divides by at inference. The two agree except on channels of near-zero
  variance. On a channel of exactly zero running variance (a dead filter) their scale is infinite
  and `torch.svd` stops with an error on the non-finite matrix; ours gives the channel a finite
  bound (zero for an all-zero filter).
- Their threshold (torch's default std, the sample one; strict `>`), the spectral norm of the
  (in_channels, kernel-area) matrix, zeroing BatchNorm weight and bias, and u = 3 (the authors'
  `test.py` default and BackdoorBench's `config/defense/clp/*.yaml`) are followed as written. They
  prune in place; we prune a copy.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from bdbench.defenses.base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.defenses.layers import conv_norm_pairs, mask_channels
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


def _channel_affine(norm: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weight and bias with which `norm` scales and shifts each channel (dimension 1) of its (N, C, H, W)
    output (BatchNorm, GroupNorm, affine InstanceNorm, a channel LayerNorm); None where it has none. A plain
    `nn.LayerNorm` on an (N, C, H, W) map normalises its last dimension, so its weight is not per channel."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if type(norm) is nn.LayerNorm or not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        return None
    return (weight, bias) if tuple(weight.shape) == tuple(bias.shape) == (channels,) else None


def _silence(model: nn.Module, conv: nn.Conv2d, norm: nn.Module | None, pruned: torch.Tensor) -> None:
    """Make the pruned output channels of the pair exactly zero, where the pair's output leaves it."""
    if not bool(pruned.any()):
        return
    affine = None if norm is None else _channel_affine(norm, conv.out_channels)
    if norm is None:
        conv.weight[pruned] = 0.0
        if conv.bias is not None:
            conv.bias[pruned] = 0.0
    elif affine is not None:  # the authors' pruning: the BatchNorm's scale and shift of the channel
        affine[0][pruned] = 0.0
        affine[1][pruned] = 0.0
    else:
        mask_channels(model, norm, ~pruned)


@DEFENSES.register("clp")
class ChannelLipschitzPruning(Defense):
    """CLP (Zheng et al. 2022): data-free pruning of channels with an outlying Lipschitz upper bound."""

    kind = DefenseKind.MODEL_REPAIR
    citation = ("Zheng, Tang, Li, Liu. Data-free Backdoor Removal based on Channel Lipschitzness. "
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
                _silence(model, conv, norm, pruned)
        return DefenseOutcome(model=model)
