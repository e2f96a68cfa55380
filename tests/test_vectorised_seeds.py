"""Several seeds trained as one vectorised computation (`benchmarks/vectorised_seeds.py`, issue 26) compute what
the trainer computes for each seed alone, BatchNorm running statistics included."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, train

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "vectorised_seeds.py"


def _benchmark():
    """The benchmark script as a module (registered under its name, as its dataclasses need)."""
    if "vectorised_seeds" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vectorised_seeds", BENCHMARK)
        assert spec is not None and spec.loader is not None
        sys.modules["vectorised_seeds"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["vectorised_seeds"]


def _models(digits, seeds):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(with_normalization(create_model("cnn-small", 10, 1, digits.image_size, width=4),
                                         digits.mean, digits.std))
    return models


def test_vectorised_seeds_train_each_seed_as_the_trainer_does(digits):
    seeds = [5, 9]
    x, y = digits.x_train[:96], digits.y_train[:96]
    config = TrainConfig(epochs=2, batch_size=32)  # 2 epochs of 3 steps: a fresh order per epoch
    start = _models(digits, seeds)
    alone = [train(copy.deepcopy(m), x, y, config, seed=s, crop_padding=1, hflip=True, device=torch.device("cpu"))
             for m, s in zip(start, seeds)]
    together = _benchmark().train_seeds_vectorised(copy.deepcopy(start), x, y, config, seeds=seeds,
                                                   crop_padding=1, hflip=True)
    for k, (a, b) in enumerate(zip(alone, together)):
        assert not b.training
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"seed {seeds[k]}: {name}")
    # Training moved the weights and BatchNorm's running statistics, differently for each seed.
    bn = "net.features.1.running_mean"
    assert not torch.equal(together[0].state_dict()[bn], start[0].state_dict()[bn])
    assert int(together[0].state_dict()["net.features.1.num_batches_tracked"]) == 6
    assert not torch.allclose(together[0].state_dict()[bn], together[1].state_dict()[bn])


def test_vectorised_seeds_refuse_a_seed_count_that_does_not_match_and_dropout(digits):
    bench = _benchmark()
    x, y = digits.x_train[:64], digits.y_train[:64]
    with pytest.raises(ValueError, match="2 models but 1 seeds"):
        bench.train_seeds_vectorised(_models(digits, [0, 1]), x, y, TrainConfig(epochs=1), seeds=[0])
    dropout = [nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10)) for _ in range(2)]
    with pytest.raises(ValueError, match="dropout"):
        bench.train_seeds_vectorised(dropout, x, y, TrainConfig(epochs=1), seeds=[0, 1])
