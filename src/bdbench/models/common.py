"""Pieces every model family shares: the small-image policy, channel scaling and stochastic depth.

Stems. The studies' architectures come in two forms: the CIFAR form, whose stem keeps the full
resolution (a 3x3 convolution, stride 1), and the ImageNet form, whose stem divides it by four
(a 7x7 stride-2 convolution and a max pool, or the family's own). bdbench uses the CIFAR form for
images up to `SMALL_IMAGE_MAX` pixels a side (MNIST, CIFAR, GTSRB, Tiny-ImageNet) and the
ImageNet form above it (ImageNet subsets at 96..224), so a 32x32 image ends at 4x4 and a 224x224
image at 7x7, as in the papers. Down-sampling stops before a feature map gets too small, so
every model also accepts 8x8 images.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

SMALL_IMAGE_MAX = 64

# A model's `width` parameter: the multiplier of every layer's channels (cnn-small: its base channel count).
Width = Annotated[float, Field(gt=0)]
Channels = Annotated[int, Field(ge=1)]


def imagenet_stem(image_size: int) -> bool:
    """Whether a model for `image_size` uses the ImageNet form of its stem (see the module docstring)."""
    return image_size > SMALL_IMAGE_MAX


def halve(size: int) -> tuple[int, int]:
    """The stride of a padded down-sampling layer on a `size`-wide map and the width after it:
    2 while the map is at least 4 pixels wide, then 1, so small images keep a 2x2 map."""
    stride = 2 if size >= 4 else 1
    return stride, -(-size // stride)


def scaled(channels: int, width: float, minimum: int = 8) -> int:
    """`channels` times the width multiplier, at least `minimum`."""
    return max(minimum, int(round(channels * width)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: to a multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016): in training,
    drop a residual branch per sample with probability `p` and scale the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


def init_conv_bn(module: nn.Module) -> None:
    """He initialisation (fan-out) for convolutions, BatchNorm at identity: the ResNet/DenseNet/MobileNet habit."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
