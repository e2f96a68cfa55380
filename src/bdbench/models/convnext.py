"""ConvNeXt-T (Liu et al., "A ConvNet for the 2020s", CVPR 2022): stages of 3, 3, 9, 3 blocks at
96..768 channels; each block a 7x7 depthwise convolution, LayerNorm, an inverted MLP with GELU and a
layer scale (1e-6), with stochastic depth rising to 0.1. The ImageNet stem is a 4x4 stride-4
"patchify" convolution; small images (up to 64 px) use 2x2 patches instead, so a 32x32 image ends
at 2x2 rather than 1x1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import DropPath, Width, imagenet_stem, scaled


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop: float, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop = DropPath(drop)

    def forward(self, x):
        out = self.dwconv(x).permute(0, 2, 3, 1)  # to channels-last for LayerNorm and the MLP
        out = self.fc2(F.gelu(self.fc1(self.norm(out)))) * self.gamma
        return x + self.drop(out.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int, in_channels: int,
                 image_size: int, drop_path: float = 0.1) -> None:
        super().__init__()
        patch = 4 if imagenet_stem(image_size) else 2
        patch = min(patch, image_size)
        size = image_size // patch
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], patch, stride=patch), LayerNorm2d(dims[0], eps=1e-6)]
        total, index = sum(depths), 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                step = 2 if size >= 2 else 1  # a 1-pixel map only changes channels
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, step, stride=step)]
                size //= step
            for _ in range(depth):
                layers.append(ConvNeXtBlock(dim, drop_path * index / max(1, total - 1)))
                index += 1
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean(dim=(2, 3))))


@MODELS.register("convnext-tiny")
def convnext_tiny(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """ConvNeXt-T (Liu et al. 2022); 2x2 patch stem up to 64 px, 4x4 above; `width` scales channels."""
    dims = tuple(scaled(d, width) for d in (96, 192, 384, 768))
    return ConvNeXt((3, 3, 9, 3), dims, num_classes, in_channels, image_size)
