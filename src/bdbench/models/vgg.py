"""VGG with BatchNorm (Simonyan and Zisserman, "Very Deep Convolutional Networks", ICLR 2015),
in the CIFAR form: conv stages, global pooling and one linear classifier."""

from __future__ import annotations

from torch import nn

from bdbench.models import MODELS

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, config: tuple, num_classes: int, in_channels: int, image_size: int,
                 width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for item in config:
            if item == "M":
                if size >= 2:  # skip pools that would shrink the map below 1x1
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = max(8, int(round(item * width)))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("vgg11-bn")
def vgg11_bn(num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """VGG-11 with BatchNorm (Simonyan and Zisserman 2015), CIFAR form; `width` scales channels."""
    return VGG(_VGG11, num_classes, in_channels, image_size, width)
