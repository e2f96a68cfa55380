"""A user's own trained model from safetensors; pickled checkpoints are refused without being opened."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import bdbench
from bdbench.errors import ArtifactError, ConfigError
from bdbench.models import create_model, load_model, with_normalization


def _state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    # Move BatchNorm's running statistics off their defaults, so a load that skipped them would show.
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *_INPUT))
    return model.eval()


_INPUT = (3, 16, 16)


def test_a_saved_bdbench_model_round_trips_with_its_normalisation(tmp_path):
    original = _trained_like(with_normalization(create_model("resnet18", 5, 3, 16, width=0.125),
                                                (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))
    save_file(_state(original), str(tmp_path / "model.safetensors"))
    loaded = bdbench.load_model(tmp_path / "model.safetensors", "resnet18", 5, 3, 16, width=0.125)
    x = torch.rand(4, *_INPUT)
    assert torch.allclose(loaded(x), original(x), atol=1e-6)
    assert not loaded.training


def test_bare_weights_need_their_normalisation(tmp_path):
    net = _trained_like(create_model("vgg11-bn", 5, 3, 16, width=0.125))
    save_file(_state(net, prefix="module."), str(tmp_path / "net.safetensors"))  # as DataParallel saves
    with pytest.raises(ConfigError, match="carry no input normalisation; pass mean=... and std="):
        load_model(tmp_path / "net.safetensors", "vgg11-bn", 5, 3, 16, width=0.125)
    loaded = load_model(tmp_path / "net.safetensors", "vgg11-bn", 5, 3, 16, width=0.125,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(4, *_INPUT)
    assert torch.allclose(loaded(x), net((x - 0.5) / 0.25), atol=1e-6)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.ckpt", "model.bin", "disguised.safetensors"])
def test_pickled_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "code-ran"
    (tmp_path / name).write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(ArtifactError) as info:
        load_model(tmp_path / name, "resnet18", 10)
    message = str(info.value)
    assert "\n" not in message and "unpickling runs whatever code the file names" in message
    assert f"safetensors.torch.save_file(torch.load('{tmp_path / name}'), 'model.safetensors')" in message
    assert not marker.exists()


def test_a_torch_save_zip_is_refused_whatever_its_name(tmp_path):
    torch.save(_state(create_model("cnn-small", 3, 1, 8, width=8)), tmp_path / "weights.safetensors")
    with pytest.raises(ArtifactError, match="a pickled checkpoint"):
        load_model(tmp_path / "weights.safetensors", "cnn-small", 3, 1, 8, width=8)


def test_corrupt_missing_and_mismatched_files(tmp_path):
    with pytest.raises(ArtifactError, match="nope.safetensors: no such file"):
        load_model(tmp_path / "nope.safetensors", "resnet18", 10)
    good = tmp_path / "good.safetensors"
    save_file(_state(with_normalization(create_model("resnet18", 5, 3, 16, width=0.125), (0.5,) * 3, (0.2,) * 3)),
              str(good))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ArtifactError, match="corrupt.safetensors: not a readable safetensors file") as info:
        load_model(corrupt, "resnet18", 5, 3, 16, width=0.125)
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match=r"do not fit resnet18 for 7 classes at 3x16x16: net.fc.weight is "
                                            r"\(5, 64\) in the file but \(7, 64\) in the model"):
        load_model(good, "resnet18", 7, 3, 16, width=0.125)
    with pytest.raises(ArtifactError, match="do not fit vgg11-bn for 5 classes at 3x16x16: missing net.features"):
        load_model(good, "vgg11-bn", 5, 3, 16, width=0.125)
