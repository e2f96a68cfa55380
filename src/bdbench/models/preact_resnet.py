"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016):
four stages of two pre-activation blocks. For small images the CIFAR form used by BackdoorBench
(one 3x3 convolution as the stem); above 64 px the ImageNet form (7x7 stride-2 convolution,
BN-ReLU and max pool), as in the paper's ImageNet models. See models/common.py."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Width, imagenet_stem, scaled
from bdbench.models.resnet import residual_stages, stem


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int,
                 width: Width = 1.0) -> None:
        super().__init__()
        channels = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1: nn.Module
        if imagenet_stem(image_size):
            self.conv1, size = stem(in_channels, channels[0], image_size)
        else:
            self.conv1, size = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False), image_size
        stages = residual_stages(PreActBlock, channels, blocks, size)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(channels[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(F.relu(self.bn(out))).flatten(1)
        return self.linear(out)


@MODELS.register("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """Pre-activation ResNet-18 (He et al. 2016); CIFAR stem up to 64 px, ImageNet stem above; `width` scales channels."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, image_size, width)
