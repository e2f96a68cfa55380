"""MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019, Table 1): inverted
residual blocks with squeeze-and-excitation and hard-swish, a 960-channel last convolution and a
1280-wide head with dropout 0.2.

Small images (up to 64 px) keep the stem and the first stride-2 block at stride 1, so the network
down-samples by 8 rather than 32, as CIFAR adaptations do. BatchNorm uses the reference eps 1e-3
with PyTorch's default momentum, which suits the short schedules of a benchmark grid.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Width, halve, imagenet_stem, init_conv_bn, make_divisible

_BatchNorm = partial(nn.BatchNorm2d, eps=1e-3)

# kernel, expanded channels, output channels, squeeze-excite, hard-swish, stride (Table 1).
_LARGE = (
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: type[nn.Module] | None = nn.ReLU, norm=_BatchNorm) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               norm(cout)]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Hu et al. 2018's channel gate, with the MobileNetV3 hard-sigmoid."""

    def __init__(self, channels: int, squeeze: int, activation: type[nn.Module] = nn.ReLU,
                 gate: type[nn.Module] = nn.Hardsigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = activation(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        scale = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, hard_swish: bool,
                 stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if hard_swish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn(cin, expanded, 1, activation=activation))
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if use_se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: Width = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        large = imagenet_stem(image_size)
        cin = make_divisible(16 * width)
        stride, size = halve(image_size) if large else (1, image_size)
        layers: list[nn.Module] = [conv_bn(in_channels, cin, 3, stride, activation=nn.Hardswish)]
        first_down = True
        for kernel, expanded, cout, use_se, hard_swish, stride in _LARGE:
            if stride == 2:
                # The CIFAR form keeps the first stride-2 block at full resolution.
                stride, size = (1, size) if first_down and not large else halve(size)
                first_down = False
            cout = make_divisible(cout * width)
            layers.append(InvertedResidual(cin, kernel, make_divisible(expanded * width), cout, use_se,
                                           hard_swish, stride))
            cin = cout
        last = 6 * cin
        layers.append(conv_bn(cin, last, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        head = make_divisible(1280 * width)
        self.classifier = nn.Sequential(nn.Linear(last, head), nn.Hardswish(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(head, num_classes))
        init_conv_bn(self)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@MODELS.register("mobilenetv3-large")
def mobilenetv3_large(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """MobileNetV3-Large (Howard et al. 2019); stride-8 CIFAR form up to 64 px; `width` is the paper's multiplier."""
    return MobileNetV3(num_classes, in_channels, image_size, width)
