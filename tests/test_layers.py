import pytest
import torch
from torch import nn

from bdbench.defenses.layers import (
    capture, classifier_layer, feature_map_layer, grad_cam, last_conv, mask_channels, norm_layers, read_activations,
)
from bdbench.models import MODELS, create_model, with_normalization

SMALL = {"cnn-small": {"width": 8}, "preact-resnet18": {"width": 0.125}, "vgg11-bn": {"width": 0.125}}


@pytest.mark.parametrize("name", MODELS.names())
def test_layers_are_found_and_read_on_every_registered_model(name):
    torch.manual_seed(0)
    model = with_normalization(create_model(name, 10, 1, 8, **SMALL.get(name, {})), (0.5,), (0.25,)).eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    head = classifier_layer(model)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert isinstance(last_conv(model), nn.Conv2d)
    norms = norm_layers(model)
    assert norms and all(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) for m in norms)
    assert all(m.weight is not None and m.weight.shape[0] == m.bias.shape[0] for m in norms)

    features = read_activations(model, x, "penultimate")
    assert features.shape == (6, head.in_features)
    # The penultimate representation is exactly what the head turns into logits.
    with torch.no_grad():
        logits = model(x.float() / 255)
    assert torch.allclose(head(features), logits, atol=1e-5)

    maps = read_activations(model, x, "feature_map")
    assert maps.ndim == 4 and len(maps) == 6
    with torch.no_grad(), capture(feature_map_layer(model, x[:1].float() / 255))  as seen:
        model(x.float() / 255)
    assert seen and seen[0].shape[1:] == maps.shape[1:]
    assert maps.shape[1] >= 8  # (N, C, H, W): channels first, never a channels-last MLP output

    # Pruning by mask: the masked channels of the feature map are zero, the others untouched.
    layer = feature_map_layer(model, x[:1].float() / 255)
    keep = torch.ones(maps.shape[1], dtype=torch.bool)
    keep[::2] = False
    wrapper = mask_channels(model, layer, keep)
    assert wrapper.inner is layer and feature_map_layer(model, x[:1].float() / 255) is wrapper
    with torch.no_grad(), capture(wrapper) as seen:
        model(x.float() / 255)
    assert seen[0][:, ~keep].abs().max() == 0 and torch.equal(seen[0][:, keep], maps[:, keep].to(seen[0].dtype))

    cams = grad_cam(model, x.float() / 255, logits.argmax(1))
    assert cams.shape == (6, 8, 8) and cams.min() >= 0 and cams.max() <= 1 + 1e-6


def test_grad_cam_points_at_the_pixels_that_decide_the_class():
    # A toy classifier whose class-1 logit is the mean of the top-left quadrant of a conv map.
    class Quadrant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1, bias=False)
            nn.init.ones_(self.conv.weight)
            mask = torch.zeros(1, 1, 8, 8)
            mask[..., :4, :4] = 1.0
            self.keep = nn.Conv2d(1, 1, 1, bias=False)  # the final feature map: conv output x mask
            nn.init.ones_(self.keep.weight)
            self.register_buffer("mask", mask)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(1, 2, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[0.0], [1.0]]))

        def forward(self, x):
            return self.head(self.pool(self.keep(self.conv(x) * self.mask)).flatten(1))

    x = torch.rand(2, 1, 8, 8)
    cam = grad_cam(Quadrant(), x, torch.tensor([1, 1]))
    assert cam[:, :3, :3].mean() > cam[:, 5:, 5:].mean() + 0.5
