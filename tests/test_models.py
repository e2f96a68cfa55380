import pytest
import torch

from bdbench.errors import ConfigError
from bdbench.models import MODELS, create_model, with_normalization


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 8)])
def test_every_model_gives_logits_for_each_shape(name, channels, size):
    width = {"cnn-small": 8}.get(name, 0.125)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size, width=width)
    model.eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_width_scales_parameters():
    small = sum(p.numel() for p in create_model("preact-resnet18", 10, 3, 32, width=0.25).parameters())
    full = sum(p.numel() for p in create_model("preact-resnet18", 10, 3, 32).parameters())
    assert 10.5e6 < full < 11.5e6  # the standard PreAct-ResNet18 at CIFAR size has ~11.2M parameters
    assert small < full / 10


def test_normalization_is_part_of_the_model():
    net = create_model("cnn-small", 10, 1, 8, width=8).eval()
    model = with_normalization(net, (0.5,), (0.25,)).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model(x), net((x - 0.5) / 0.25))


def test_unknown_model_and_option():
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'; choose one of: cnn-small"):
        create_model("resnet9000", 10)
    with pytest.raises(ConfigError, match="model 'vgg11-bn' has no parameter 'depth'"):
        create_model("vgg11-bn", 10, depth=3)
