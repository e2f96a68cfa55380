"""The attacker's public data: images it holds without touching the victim's training set.

Clean-label attacks whose threat model gives the attacker public data, instead of the training set,
get it here in one of two kinds:

- **Public images of the task's own classes** (DFB's public images of the target class and of
  the others, Narcissus' examples of the target class): simulated by the *attacker pool*, a fixed
  share of the training set (`ATTACKER_POOL_SHARE` of every class, drawn with one fixed seed, the
  same for every experiment) that the victim never trains on. Attacks that use it derive from
  `PublicPoolAttack`: they learn from the pool, and `poison` hands the victim the rest of the
  training set only (so their `poison_rate` is a share of that rest). Nothing offline is a truer
  "public" set of CIFAR-10's or GTSRB's classes; the pool has the training set's distribution,
  which favours the attacker as much as public data of the same source would.
- **Public out-of-distribution (POOD) data**, disjoint from the task's classes (Narcissus): another
  data set, named by a data-set spec like the grid's `dataset`. `DEFAULT_POOD` gives one per data
  set: GTSRB for CIFAR-10 victims and CIFAR-10 for GTSRB victims (from `../shared/data`, relative to
  the working directory as the grids' own paths are), and for the digit sets the other digit set,
  whose images of the target's class are left out. Images are resized to the task's size and
  channels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bdbench.attacks.base import Attack, PoisonedTrainingSet
from bdbench.data import Dataset, load_dataset
from bdbench.errors import BdbenchError, ConfigError
from bdbench.seeding import derive_seed

ATTACKER_POOL_SHARE = 0.1  # of every class of the training set

DEFAULT_POOD: dict[str, dict[str, Any]] = {
    "cifar10": {"name": "npz", "path": "../shared/data/gtsrb32.npz"},
    "gtsrb32": {"name": "npz", "path": "../shared/data/cifar10.npz"},
    "gtsrb": {"name": "npz", "path": "../shared/data/cifar10.npz"},
    "mnist5k": {"name": "digits"},
    "digits": {"name": "mnist5k"},
}


def attacker_pool_rows(y_train: torch.Tensor, share: float = ATTACKER_POOL_SHARE) -> torch.Tensor:
    """The training-set rows of the attacker pool, sorted: round(`share` x its size) of every class
    (at least one, never all of it), drawn with a fixed seed, so that every experiment of a data
    set, whatever its seed, splits it alike."""
    generator = torch.Generator().manual_seed(derive_seed(0, "attacker_pool"))
    rows = []
    for label in torch.unique(y_train).tolist():
        members = torch.nonzero(y_train == label).flatten()
        count = min(len(members) - 1, max(1, round(share * len(members))))
        rows.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(rows)).values


def victim_rows(y_train: torch.Tensor) -> torch.Tensor:
    """The training-set rows outside the attacker pool, sorted: the only ones the victim trains on."""
    keep = torch.ones(len(y_train), dtype=torch.bool)
    keep[attacker_pool_rows(y_train)] = False
    return torch.nonzero(keep).flatten()


def attacker_pool(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker pool's uint8 images and labels."""
    rows = attacker_pool_rows(dataset.y_train)
    return dataset.x_train[rows], dataset.y_train[rows]


def without_attacker_pool(dataset: Dataset) -> Dataset:
    """`dataset` with the attacker pool taken out of its training set (test set and statistics unchanged)."""
    rows = victim_rows(dataset.y_train)
    return dataclasses.replace(dataset, x_train=dataset.x_train[rows], y_train=dataset.y_train[rows])


class PublicPoolAttack(Attack):
    """An attack that learns from the attacker pool: the victim trains on the rest of the training set."""

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        return super().poison(without_attacker_pool(dataset), poison_rate, target_label, generator)


def pood_spec(dataset: Dataset, pood: Mapping[str, Any] | None, attack: str) -> dict[str, Any]:
    """The POOD data-set spec for `dataset`: `pood` as given, else `DEFAULT_POOD`'s; refuses, in
    one line, a data set without a default and a missing .npz file."""
    if pood is None:
        if dataset.name not in DEFAULT_POOD:
            raise ConfigError(f"{attack} needs public out-of-distribution data for {dataset.name!r} and has no "
                              f"default for it: give {attack} pood: {{name: npz, path: FILE.npz}}, a data set "
                              "none of whose classes is the task's")
        pood = DEFAULT_POOD[dataset.name]
    spec = dict(pood)
    if "name" not in spec:
        raise ConfigError(f"{attack}'s pood {spec} names no data set: give it as {{name: npz, path: FILE.npz}}")
    path = spec.get("path")
    if spec["name"] == "npz" and path is not None and not Path(str(path)).expanduser().is_file():
        raise ConfigError(f"{attack}'s public out-of-distribution pool {path} is missing (relative to "
                          f"{Path.cwd()}): give {attack} pood: {{name: npz, path: FILE.npz}} with an existing file")
    return spec


def pood_images(dataset: Dataset, spec: Mapping[str, Any], target_label: int,
                attack: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The POOD set's training images, as uint8 images of `dataset`'s size and channels, with the POOD
    set's own labels; images of a class named like the task's target class are left out."""
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        source = load_dataset(spec["name"], **params)
    except BdbenchError as exc:
        raise ConfigError(f"{attack}'s public out-of-distribution pool {dict(spec)} cannot be loaded: {exc}") from None
    if source.name == dataset.name:
        raise ConfigError(f"{attack}'s public out-of-distribution pool is the task's own data set "
                          f"{dataset.name!r}: give it one whose classes differ from the task's")
    target_name = dataset.class_names[target_label]
    keep = source.y_train != (source.class_names.index(target_name) if target_name in source.class_names else -1)
    x, y = source.x_train[keep].float(), source.y_train[keep]
    size, channels = dataset.image_size, dataset.in_channels
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous(), y.clone()
