"""A small convolutional network with BatchNorm, fast enough to train on two CPU cores."""

from __future__ import annotations

from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Channels


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Two stages of two 3x3 conv-BN-ReLU layers with max pooling, global pooling and a two-layer head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: Channels = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        cin = in_channels
        for cout in (width, 2 * width):
            layers += _block(cin, cout) + _block(cout, cout)
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
def cnn_small(num_classes: int, in_channels: int, image_size: int, width: Channels = 32) -> nn.Module:
    """Four 3x3 conv-BN-ReLU layers (width, 2x width) with pooling and a small head; CPU-friendly."""
    return SmallCNN(num_classes, in_channels, image_size, width)
