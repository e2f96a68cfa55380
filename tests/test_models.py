import json

import pytest
import torch
from click.testing import CliRunner

from bdbench.cli import main
from bdbench.errors import ConfigError
from bdbench.models import MODELS, create_model, with_normalization
from bdbench.models.common import imagenet_stem
from bdbench.models.vit import patch_size_for
from bdbench.training import TrainConfig, predict_logits, train

ONE_STEP = TrainConfig(epochs=1, batch_size=4, lr=0.01)


def _small(name: str, num_classes: int, channels: int, size: int):
    width = {"cnn-small": 8}.get(name, 0.125)  # small widths: every shape in seconds on two cores
    return create_model(name, num_classes=num_classes, in_channels=channels, image_size=size, width=width)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64)])
def test_every_model_trains_a_step_and_evaluates(name, channels, size):
    model = _small(name, 7, channels, size)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    train(model, x, torch.tensor([0, 1, 2, 6]), ONE_STEP, seed=0, crop_padding=2, hflip=True,
          device=torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logits = predict_logits(model, x[:3])
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 224)])
def test_every_model_gives_logits_at_the_smallest_and_largest_size(name, channels, size):
    model = _small(name, 5, channels, size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


# torchvision's and timm's ImageNet models (3x224x224, 1000 classes) have exactly these counts.
REFERENCE_PARAMETERS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "densenet121": 7_978_856, "mobilenetv3-large": 5_483_032,
    "efficientnet-b0": 5_288_548, "convnext-tiny": 28_589_128, "vit-small": 22_050_664,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_imagenet_form_matches_the_reference_parameter_count(name):
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = create_model(name, 1000, 3, 224)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMETERS[name]


def test_cli_lists_each_model_with_its_parameter_count_at_cifar_size():
    result = CliRunner().invoke(main, ["list", "models", "--format", "json"])
    counts = {entry["name"]: entry["params"] for entry in json.loads(result.stdout)}
    assert set(counts) == set(MODELS.names())
    # The usual CIFAR-10 ResNet-18 (3x3 stem) has 11,173,962 parameters.
    assert counts["resnet18"] == 11_173_962 and counts["cnn-small"] == 75_370


def test_stem_follows_the_image_size():
    assert not imagenet_stem(64) and imagenet_stem(96)
    for size, final in ((32, 4), (64, 8), (224, 7)):
        model = create_model("resnet18", 10, 3, size, width=0.125)
        features = model.stages(model.stem(torch.rand(1, 3, size, size)))
        assert features.shape[-1] == final
    assert [patch_size_for(s) for s in (8, 28, 32, 64, 224)] == [1, 4, 4, 8, 16]


def test_random_layers_are_fixed_by_the_training_seed():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(8) % 4
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        model = create_model("vit-small", 4, 3, 8, width=0.05)  # stochastic depth in 11 of 12 blocks
        torch.manual_seed(global_seed)  # whatever ran before training must not matter
        train(model, x, y, TrainConfig(epochs=2, batch_size=4), seed=3, device=torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


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


def test_cnn_small_pools_the_features_to_the_grid_it_is_given():
    """pool 1 is global average pooling; pool 4 keeps a 4x4 grid of the last feature map (16x the head's inputs),
    so two images whose features differ only in where they lie can be told apart; pool 0 is refused."""
    flat = create_model("cnn-small", 10, 3, 32, width=8, norm="group")
    grid = create_model("cnn-small", 10, 3, 32, width=8, norm="group", pool=4)
    assert flat.classifier[0].in_features == 16 and grid.classifier[0].in_features == 16 * 16
    assert grid(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    x = torch.zeros(1, 3, 32, 32)
    left, right = x.clone(), x.clone()
    left[..., 8:12, 2:6], right[..., 8:12, 26:30] = 1.0, 1.0  # the same blob, mirrored across the image
    features = grid.features.eval()
    assert not torch.allclose(features(left), features(right))
    with pytest.raises(ConfigError, match="pool"):
        create_model("cnn-small", 10, 3, 32, pool=0)
