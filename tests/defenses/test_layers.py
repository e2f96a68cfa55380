import pytest
import torch
from torch import nn

from bdbench.defenses.layers import (
    capture,
    capture_outputs,
    classifier_layer,
    conv_norm_pairs,
    feature_map_layer,
    grad_cam,
    last_conv,
    mask_channels,
    norm_layers,
    read_activations,
    stage_outputs,
    twice_differentiable,
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


@pytest.mark.parametrize("name", MODELS.names())
def test_stages_conv_norm_pairs_and_second_derivatives_on_every_registered_model(name):
    torch.manual_seed(0)
    model = with_normalization(create_model(name, 10, 1, 8, **SMALL.get(name, {})), (0.5,), (0.25,)).eval()
    x = torch.rand(3, 1, 8, 8)
    stages = stage_outputs(model, x, 3)
    assert 2 <= len(stages) <= 3 and len(set(stages)) == len(stages)
    with torch.no_grad(), capture_outputs(model, stages) as seen:
        model(x)
    maps = [outputs[0] for outputs in seen]
    assert all(m.ndim in (3, 4) and len(m) == 3 for m in maps)
    sizes = [m.shape[-2:].numel() if m.ndim == 4 else m.shape[1] for m in maps]
    assert sizes == sorted(sizes, reverse=True)  # deepest last: a stage never grows the map

    pairs = conv_norm_pairs(model, x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {id(c) for c, _ in pairs} == {id(c) for c in convs}
    assert all(norm is None or norm in norm_layers(model) for _, norm in pairs)

    # The same function inside the block, and a Hessian-vector product through it.
    x.requires_grad_(True)
    with twice_differentiable(model):
        inside = model(x)
        grad, = torch.autograd.grad(inside.logsumexp(1).sum(), x, create_graph=True)
        hvp, = torch.autograd.grad(grad.pow(2).sum(), x)
    assert torch.allclose(inside, model(x), atol=1e-5) and torch.isfinite(hvp).all()


def test_stage_outputs_and_conv_norm_pairs_follow_the_data_not_the_registration_order():
    resnet = with_normalization(create_model("preact-resnet18", 10, 3, 32, width=0.125), (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(2, 3, 32, 32)
    assert stage_outputs(resnet, x, 3) == ["net.layer2", "net.layer3", "net.layer4"]
    pairs = {id(conv): norm for conv, norm in conv_norm_pairs(resnet, x)}
    block = resnet.net.layer2[0]
    assert pairs[id(block.conv1)] is block.bn2  # bn2 reads conv1's output
    assert pairs[id(block.conv2)] is None  # conv2's output joins the residual sum
    vit = with_normalization(create_model("vit-small", 10, 3, 32, width=0.125), (0.5,) * 3, (0.25,) * 3)
    assert stage_outputs(vit, x, 2) == ["net.blocks.10", "net.blocks.11"]  # no stages: the last blocks


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
