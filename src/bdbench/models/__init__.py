"""Model registry: `create_model("preact-resnet18", num_classes=43, in_channels=3, image_size=32)`.

Every factory takes the same arguments (`num_classes`, `in_channels`, `image_size`, plus its
own keyword options such as `width`) and returns a network that expects normalised input.
`with_normalization` puts the data set's normalisation in front, so that attacks and defenses
work on images in [0, 1]. Each architecture takes images of 8 to 224 pixels a side, in its CIFAR
form up to 64 px and its ImageNet form above (models/common.py). `load_model` reads a user's
own trained weights from a .safetensors file, never from a pickle.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from bdbench.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 **options: Any) -> nn.Module:
    """Build a registered architecture for the given number of classes, channels and image size."""
    params = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, **options}
    return MODELS.build(name, params)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with fixed buffers, so the model's input is an image in [0, 1]."""

    mean: torch.Tensor  # buffers: typed here, as nn.Module's attribute lookup would give Tensor | Module
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedClassifier(nn.Module):
    """A classifier whose forward takes images in [0, 1]: `normalize` then `net`."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def with_normalization(net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> NormalizedClassifier:
    return NormalizedClassifier(net, mean, std)


# Importing the family modules registers their models.
from bdbench.models import (  # noqa: E402,F401
    cnn,
    convnext,
    densenet,
    efficientnet,
    mobilenet,
    preact_resnet,
    resnet,
    vgg,
    vit,
)
from bdbench.models.weights import load_model  # noqa: E402


def count_parameters(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     **options: Any) -> int:
    """Parameters of a registered architecture, counted without allocating or initialising them."""
    with torch.device("meta"):
        model = create_model(name, num_classes, in_channels, image_size, **options)
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "NormalizedClassifier", "count_parameters", "create_model", "load_model", "with_normalization"]
