"""A small convolutional network, fast enough to train on two CPU cores.

Its normalisation is BatchNorm by default; `norm: group` (GroupNorm) or `norm: none` give a network without
running statistics, which federated clients need: they train as one vectorised computation
(`bdbench.federated.clients`), and Lockdown's models normalise without running statistics too.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Channels

Norm = Literal["batch", "group", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, max(1, channels // 8)), channels)  # 8 or more channels a group
    return nn.Identity()


def _block(cin: int, cout: int, norm: Norm = "batch") -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Two stages of two 3x3 conv-norm-ReLU layers with max pooling, global pooling and a two-layer head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: Channels = 32,
                 norm: Norm = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        cin = in_channels
        for cout in (width, 2 * width):
            layers += _block(cin, cout, norm) + _block(cout, cout, norm)
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(cin, 4 * width), nn.ReLU(inplace=True),
                                        nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("cnn-small")
def cnn_small(num_classes: int, in_channels: int, image_size: int, width: Channels = 32,
              norm: Norm = "batch") -> nn.Module:
    """Four 3x3 conv-norm-ReLU layers (width, 2x width) with pooling and a small head; CPU-friendly.
    `norm`: batch (BatchNorm, the default), group (GroupNorm) or none."""
    return SmallCNN(num_classes, in_channels, image_size, width, norm)
