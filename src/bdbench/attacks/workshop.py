"""What an attack may use while it learns its trigger (`Attack.prepare`): the experiment's seed,
the device, and the artifact cache, so that anything learned (a universal perturbation, a
trigger generator, a clean surrogate model) is trained once and reused like a victim."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from bdbench.data import Dataset
from bdbench.errors import ArtifactError
from bdbench.models import create_model, with_normalization
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache
from bdbench.training import TrainConfig, train


@dataclass(frozen=True)
class AttackWorkshop:
    """`dataset_key` identifies the data set (the hash of its spec) and enters every cache key."""

    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: ArtifactCache | None = None
    dataset_key: str = ""

    def generator(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, purpose))

    def learned(self, name: str, params: Mapping[str, Any], build: Callable[[], dict[str, torch.Tensor]],
                version: int = 1) -> dict[str, torch.Tensor]:
        """The tensors `build()` returns for (`name`, `params`, data set, seed): from the cache when
        they were learned before, otherwise built now and cached.

        `version` is the format of what `build` returns: an attack bumps it whenever it changes the
        tensors it stores (names, shapes, meaning), so that artefacts cached by older code are
        learned again instead of being read in the wrong format. It enters the cache key from 2 on,
        so artefacts of format 1 cached before versions existed are still found."""
        description = {"name": name, "params": dict(params), "dataset": self.dataset_key, "seed": self.seed}
        if version != 1:
            description["format"] = version
        key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.cache is None:
            return build()
        with self.cache.lock("attacks", key):  # concurrent workers learn it once
            try:
                cached = self.cache.load_tensors("attacks", key)
            except ArtifactError:
                self.cache.discard("attacks", key)
                cached = None
            if cached is None:
                cached = build()
                self.cache.save_tensors("attacks", key, cached, description)
        return cached

    def surrogate(self, dataset: Dataset, model: str = "cnn-small", training: TrainConfig | None = None,
                  **options: Any) -> nn.Module:
        """A clean model trained on `dataset`'s clean training set, for attacks that need gradients
        of a model the attacker owns (adversarial perturbations, universal perturbations)."""
        training = training or TrainConfig()

        def fresh() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "surrogate_init"))
                net = create_model(model, dataset.num_classes, dataset.in_channels, dataset.image_size, **options)
            return with_normalization(net, dataset.mean, dataset.std)

        def build() -> dict[str, torch.Tensor]:
            net = train(fresh(), dataset.x_train, dataset.y_train, training, seed=derive_seed(self.seed, "surrogate"),
                        crop_padding=dataset.crop_padding, hflip=dataset.allow_hflip, device=self.device)
            return net.state_dict()

        params = {"model": model, "options": options, "training": training.model_dump()}
        net = fresh()
        net.load_state_dict(self.learned("surrogate", params, build))
        return net.to(self.device).eval()


def surrogate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """An attack's `surrogate` parameter -> keyword arguments of `AttackWorkshop.surrogate`.

    `{model: cnn-small, epochs: 4, width: 8}`: `model` names the architecture (default cnn-small),
    the keys of TrainConfig (epochs, batch_size, lr, ...) set its training (default TrainConfig()),
    and any other key is a model option. Tests pass tiny surrogates this way.
    """
    options = dict(options or {})
    model = options.pop("model", "cnn-small")
    training = {k: options.pop(k) for k in list(options) if k in TrainConfig.model_fields}
    return {"model": model, "training": TrainConfig(**training), **options}
