"""VGG-11, -16 and -19 with BatchNorm (Simonyan and Zisserman, "Very Deep Convolutional Networks",
ICLR 2015, configurations A, D and E), in the CIFAR form at every image size: the conv stages,
global average pooling and one linear classifier. (The paper's two 4096-wide layers would add
about 120M parameters at 224 px; the backdoor studies' CIFAR models do without them.) Pools that
would shrink a map below one pixel are skipped, so 8x8 images work too.
"""

from __future__ import annotations

from torch import nn

from bdbench.models import MODELS
from bdbench.models.common import Width, scaled

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, config: tuple, num_classes: int, in_channels: int, image_size: int,
                 width: Width = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for item in config:
            if item == "M":
                if size >= 2:  # skip pools that would shrink the map below 1x1
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = scaled(item, width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("vgg11-bn")
def vgg11_bn(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """VGG-11 with BatchNorm (Simonyan and Zisserman 2015), CIFAR form; `width` scales channels."""
    return VGG(_VGG11, num_classes, in_channels, image_size, width)


@MODELS.register("vgg16-bn")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """VGG-16 with BatchNorm (Simonyan and Zisserman 2015), CIFAR form; `width` scales channels."""
    return VGG(_VGG16, num_classes, in_channels, image_size, width)


@MODELS.register("vgg19-bn")
def vgg19_bn(num_classes: int, in_channels: int, image_size: int, width: Width = 1.0) -> nn.Module:
    """VGG-19 with BatchNorm (Simonyan and Zisserman 2015), CIFAR form; `width` scales channels."""
    return VGG(_VGG19, num_classes, in_channels, image_size, width)
