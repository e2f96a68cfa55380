"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016),
in the CIFAR form used by BackdoorBench: 3x3 stem, four stages of two pre-activation blocks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS


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
                 width: float = 1.0) -> None:
        super().__init__()
        channels = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        stages = []
        cin = channels[0]
        size = image_size
        for i, (cout, n) in enumerate(zip(channels, blocks)):
            # Downsample only while the feature map is large enough, so tiny inputs still work.
            stride = 2 if i > 0 and size >= 4 else 1
            size = (size + stride - 1) // stride
            layers = []
            for j in range(n):
                layers.append(PreActBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(F.relu(self.bn(out))).flatten(1)
        return self.linear(out)


@MODELS.register("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """Pre-activation ResNet-18 (He et al. 2016), CIFAR stem; `width` scales every stage's channels."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, image_size, width)
