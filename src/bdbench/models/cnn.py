"""A small convolutional network, fast enough to train on two CPU cores.

Its normalisation is BatchNorm by default; `norm: group` (GroupNorm) or `norm: none` give a network without
running statistics, which federated clients need: they train as one vectorised computation
(`bdbench.federated.clients`), and Lockdown's models normalise without running statistics too.

`pool` is the side of the grid the last feature map is average-pooled to before the head: 1 (the default) is
global average pooling; 4 keeps a 4x4 grid of where in the image each feature was. Where the class depends on
the arrangement of small parts (the digits of a speed-limit sign), global pooling in a network this small learns
slowly: on gtsrb32 (width 16, GroupNorm, SGD lr 0.1 without momentum, batch 64, one seed) the test accuracy after
epochs 1-4 was 0.156, 0.157, 0.175, 0.418 with `pool: 1` and 0.385, 0.927, 0.941, 0.956 with `pool: 4`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import PositiveInt
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
    """Two stages of two 3x3 conv-norm-ReLU layers with max pooling, average pooling to a `pool` x `pool` grid
    and a two-layer head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: Channels = 32,
                 norm: Norm = "batch", pool: int = 1) -> None:
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
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(cin * pool * pool, 4 * width), nn.ReLU(inplace=True),
                                        nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("cnn-small")
def cnn_small(num_classes: int, in_channels: int, image_size: int, width: Channels = 32,
              norm: Norm = "batch", pool: PositiveInt = 1) -> nn.Module:
    """Four 3x3 conv-norm-ReLU layers (width, 2x width) with pooling and a small head; CPU-friendly.
    `norm`: batch (BatchNorm, the default), group (GroupNorm) or none; `pool`: the side of the grid the features
    are average-pooled to before the head (1: global average pooling)."""
    return SmallCNN(num_classes, in_channels, image_size, width, norm, pool)
