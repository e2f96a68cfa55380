"""What an attack may use while it learns its trigger (`Attack.prepare`): the experiment's seed,
the device, and the artifact cache, so that anything learned (a universal perturbation, a
trigger generator, a clean surrogate model) is trained once and reused like a victim."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from pydantic import BaseModel
from torch import nn

from bdbench.data import Dataset
from bdbench.errors import ArtifactError
from bdbench.models import create_model, with_normalization
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache
from bdbench.training import TrainConfig, train


def dataset_key(dataset: BaseModel) -> str:
    """The data set's part of every attack artefact's cache key: its spec with sorted keys, so that one data set
    written with its parameters in another order (`{path: ..., allow_hflip: true}` or the reverse) finds what was
    learned on it, as it finds its victims (whose key was order-free already). Formatted as pydantic's JSON, so
    that the key of a spec whose parameters were already in sorted order is the one earlier code computed."""
    return json.dumps(dataset.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class AttackWorkshop:
    """`dataset_key` identifies the data set (`dataset_key(spec.dataset)`) and enters every cache key.
    `dataset_key_as_written` is the key earlier code used (the spec's JSON, its parameters in the order the
    config gave them): an artefact not cached under `dataset_key` is looked up under it (and stored under
    `dataset_key` once found) before being learned again, so that a victim trained with it is tested with the
    very same trigger."""

    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: ArtifactCache | None = None
    dataset_key: str = ""
    dataset_key_as_written: str = ""

    @classmethod
    def for_dataset(cls, seed: int, dataset: BaseModel, device: torch.device | None = None,
                    cache: ArtifactCache | None = None) -> AttackWorkshop:
        """The workshop of an experiment (or a triggers picture) on the data set `dataset` (a grid component)."""
        return cls(seed=seed, device=device or torch.device("cpu"), cache=cache, dataset_key=dataset_key(dataset),
                   dataset_key_as_written=dataset.model_dump_json())

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
        if self.cache is None:
            return build()
        key = _key(description)
        with self.cache.lock("attacks", key):  # concurrent workers learn it once
            cached = self._load(key)
            if cached is None and self.dataset_key_as_written not in ("", self.dataset_key):
                cached = self._load(_key({**description, "dataset": self.dataset_key_as_written}))
                if cached is not None:  # stored under the sorted key too, for any order asking next
                    self.cache.save_tensors("attacks", key, cached, description)
            if cached is None:
                cached = build()
                self.cache.save_tensors("attacks", key, cached, description)
        return cached

    def _load(self, key: str) -> dict[str, torch.Tensor] | None:
        assert self.cache is not None
        try:
            return self.cache.load_tensors("attacks", key)
        except ArtifactError:  # unreadable: learned again
            self.cache.discard("attacks", key)
            return None

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


def _key(description: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
