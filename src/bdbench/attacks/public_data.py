"""The attacker's public data: images it can gather without touching the victim's training set.

Attacks whose threat model gives the attacker public data instead of the training set (Narcissus'
public out-of-distribution set, DFB's public images of the target class) take it from here. No
such set can be downloaded offline, so the public data of an experiment is the *other* embedded
digit set: scikit-learn's 8x8 UCI digits for every data set except `digits`, and mnist5k's
images for `digits`; resized to the experiment's image size and channels. It is public and
disjoint from the training set, but it is closer to MNIST than Tiny-ImageNet (both papers' public
data) is to CIFAR-10: the same ten digit classes, other writers and another scanner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdbench.data import Dataset, load_dataset
from bdbench.errors import ConfigError

_DIGIT_SETS = ("mnist5k", "digits")


def public_images(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's public images for `dataset`, as uint8 images of `dataset`'s shape, with the
    public set's own labels (digit classes)."""
    source = load_dataset("mnist5k" if dataset.name == "digits" else "digits")
    x = source.x_train.float()
    size, channels = dataset.image_size, dataset.in_channels
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous(), source.y_train.clone()


def require_public_task_classes(dataset: Dataset, attack: str) -> None:
    """Refuse a data set for which no public images *of the task's own classes* exist offline: only
    the digit data sets have such a set (their labels are the same ten digits)."""
    if dataset.name not in _DIGIT_SETS:
        raise ConfigError(f"{attack} needs public images of the task's own classes, which bdbench has offline only "
                          f"for the digit data sets ({', '.join(_DIGIT_SETS)}), not {dataset.name!r}: "
                          f"run {attack} on one of those")
