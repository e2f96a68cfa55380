"""EfficientNet-B0 (Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, Table 1): MBConv blocks with squeeze-and-excitation (ratio 0.25) and SiLU,
stochastic depth rising to 0.2, a 1280-channel head with dropout 0.2.

Small images (up to 64 px) keep the stem and the first stride-2 stage at stride 1 (down-sampling
by 8 rather than 32), as CIFAR adaptations do.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import DropPath, Width, halve, imagenet_stem, init_conv_bn, make_divisible
from bdbench.models.mobilenet import SqueezeExcite, conv_bn

# expand ratio, kernel, stride, output channels, layers (Table 1, stages 2..8).
_B0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
       (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop: float) -> None:
        super().__init__()
        expanded = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, expanded, 1, activation=nn.SiLU))
        layers += [conv_bn(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU),
                   SqueezeExcite(expanded, max(1, cin // 4), activation=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn(expanded, cout, 1, activation=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.drop = DropPath(drop)

    def forward(self, x):
        out = self.block(x)
        return x + self.drop(out) if self.residual else out


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: Width = 1.0,
                 depth: float = 1.0, dropout: float = 0.2, stochastic_depth: float = 0.2) -> None:
        super().__init__()
        large = imagenet_stem(image_size)
        cin = make_divisible(32 * width)
        stride, size = halve(image_size) if large else (1, image_size)
        layers: list[nn.Module] = [conv_bn(in_channels, cin, 3, stride, activation=nn.SiLU)]
        stages = [(e, k, s, make_divisible(c * width), int(math.ceil(n * depth))) for e, k, s, c, n in _B0]
        total, index = sum(n for *_, n in stages), 0
        first_down = True
        for expand, kernel, stride, cout, count in stages:
            if stride == 2:
                # The CIFAR form keeps the first stride-2 stage at full resolution.
                stride, size = (1, size) if first_down and not large else halve(size)
                first_down = False
            for j in range(count):
                # Stochastic depth grows linearly with the block's position (Huang et al. 2016).
                layers.append(MBConv(cin, cout, expand, kernel, stride if j == 0 else 1,
                                     stochastic_depth * index / total))
                cin, index = cout, index + 1
        head = 4 * cin
        layers.append(conv_bn(cin, head, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        init_conv_bn(self)
        bound = 1.0 / math.sqrt(num_classes)
        nn.init.uniform_(self.classifier.weight, -bound, bound)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.dropout(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)))


@MODELS.register("efficientnet-b0")
def efficientnet_b0(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """EfficientNet-B0 (Tan and Le 2019); stride-8 CIFAR form up to 64 px; `width` scales channels."""
    return EfficientNet(num_classes, in_channels, image_size, width)
