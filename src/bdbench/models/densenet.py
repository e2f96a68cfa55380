"""DenseNet-121 (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017): growth rate
32, dense blocks of 6, 12, 24 and 16 bottleneck layers (BN-ReLU-1x1 to 4k, BN-ReLU-3x3 to k),
transitions halving channels and resolution. CIFAR form (one 3x3 convolution to 2k channels) for
small images, ImageNet form (7x7 stride-2 convolution and max pool) for large ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Width, imagenet_stem, init_conv_bn


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2) if pool else nn.Identity())


class DenseNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int,
                 growth: int = 32, bottleneck: int = 4, compression: float = 0.5) -> None:
        super().__init__()
        channels = 2 * growth
        if imagenet_stem(image_size):
            layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                       nn.MaxPool2d(3, stride=2, padding=1)]
            size = -(-image_size // 4)
        else:
            layers = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
            size = image_size
        for i, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, growth, bottleneck))
                channels += growth
            if i < len(blocks) - 1:
                reduced = int(channels * compression)
                layers.append(Transition(channels, reduced, pool=size >= 2))
                channels, size = reduced, size // 2 if size >= 2 else size
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@MODELS.register("densenet121")
def densenet121(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """DenseNet-121 (Huang et al. 2017); CIFAR stem up to 64 px, ImageNet stem above; `width` scales the growth rate."""
    return DenseNet((6, 12, 24, 16), num_classes, in_channels, image_size, growth=max(2, int(round(32 * width))))
