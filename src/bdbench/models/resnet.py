"""ResNet-18 and ResNet-34 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016):
basic blocks of two 3x3 convolutions, four stages of 64..512 channels. CIFAR form (3x3 stem) for
small images, ImageNet form (7x7 stride-2 stem and max pool) for large ones; see models/common.py.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Width, halve, imagenet_stem, init_conv_bn, scaled


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def stem(in_channels: int, channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    """The ResNet stem for `image_size` and the feature-map width after it."""
    if imagenet_stem(image_size):
        layers = nn.Sequential(nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False),
                               nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        return layers, -(-image_size // 4)
    layers = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                           nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    return layers, image_size


def residual_stages(block: Callable[[int, int, int], nn.Module], channels: list[int], blocks: tuple[int, ...],
                    size: int) -> list[nn.Sequential]:
    """Four stages of `blocks` residual blocks; every stage after the first halves the map (while it can)."""
    stages, cin = [], channels[0]
    for i, (cout, count) in enumerate(zip(channels, blocks)):
        stride, size = halve(size) if i > 0 else (1, size)
        layers = []
        for j in range(count):
            layers.append(block(cin, cout, stride if j == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*layers))
    return stages


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int,
                 width: Width = 1.0) -> None:
        super().__init__()
        channels = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stem, size = stem(in_channels, channels[0], image_size)
        self.stages = nn.Sequential(*residual_stages(BasicBlock, channels, blocks, size))
        self.fc = nn.Linear(channels[-1], num_classes)
        init_conv_bn(self)

    def forward(self, x):
        out = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """ResNet-18 (He et al. 2016); CIFAR stem up to 64 px, ImageNet stem above; `width` scales channels."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size, width)


@MODELS.register("resnet34")
def resnet34(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """ResNet-34 (He et al. 2016); CIFAR stem up to 64 px, ImageNet stem above; `width` scales channels."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, image_size, width)
