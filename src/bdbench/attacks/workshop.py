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

    def learned(self, name: str, params: Mapping[str, Any],
                build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors `build()` returns for (`name`, `params`, data set, seed): from the cache when
        they were learned before, otherwise built now and cached."""
        description = {"name": name, "params": dict(params), "dataset": self.dataset_key, "seed": self.seed}
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
