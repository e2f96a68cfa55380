"""Per-data-set facts in one place: normalisation, flips, native image size, crop padding, class names.

Loaders take these facts from here rather than computing or hard-coding them, so a data set is
normalised and augmented the same way wherever it comes from. `mean`/`std` are the published
per-channel statistics of each training set (in [0, 1] units); `None` means "compute them from
the training split" (the embedded subsets, whose statistics differ from their parents').
Horizontal flips are allowed only where a mirrored image keeps its label: never for digits or
traffic signs ("turn left" mirrors to "turn right"), always for natural photos and clothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bdbench.data.dataset import Dataset, channel_stats
from bdbench.errors import DataError

_DIGITS = tuple(str(i) for i in range(10))

_FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")

_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100's fine labels in the order of the official `meta` file (alphabetical).
_CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# GTSRB's ClassId 0..42 (Stallkamp et al. 2011, Table 1 / the benchmark's sign catalogue).
_GTSRB = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)


@dataclass(frozen=True)
class DatasetFacts:
    """What a loader needs to know about a data set beyond its pixels.

    `image_size` is the native (or default) side length; `crop_padding` is the random-crop padding
    at that size (scaled when a loader resizes). `class_names` of None means the names come from
    the files (Tiny-ImageNet's wnids, an image folder's subfolders).
    """

    name: str
    image_size: int
    in_channels: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    allow_hflip: bool
    crop_padding: int
    class_names: tuple[str, ...] | None

    def padding_at(self, image_size: int) -> int:
        """The crop padding for images resized to `image_size`: the same share of the side."""
        return max(1, round(self.crop_padding * image_size / self.image_size))


FACTS: dict[str, DatasetFacts] = {facts.name: facts for facts in (
    DatasetFacts("mnist", 28, 1, (0.1307,), (0.3081,), False, 2, _DIGITS),
    DatasetFacts("fashion-mnist", 28, 1, (0.2860,), (0.3530,), True, 2, _FASHION_MNIST),
    DatasetFacts("cifar10", 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, 4, _CIFAR10),
    DatasetFacts("cifar100", 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, 4, _CIFAR100),
    # Statistics of the 39,209 official training images resized to 32x32.
    DatasetFacts("gtsrb", 32, 3, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), False, 4, _GTSRB),
    DatasetFacts("tiny-imagenet", 64, 3, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), True, 8, None),
    # The embedded subsets: statistics computed from their own training split.
    DatasetFacts("mnist5k", 28, 1, None, None, False, 2, _DIGITS),
    DatasetFacts("digits", 8, 1, None, None, False, 1, _DIGITS),
)}


def facts_for(name: str) -> DatasetFacts:
    try:
        return FACTS[name]
    except KeyError:
        raise DataError(f"no facts recorded for data set {name!r}; known: {', '.join(sorted(FACTS))}") from None


def make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 class_names: tuple[str, ...] | None = None) -> Dataset:
    """A `Dataset` from uint8 (N, C, H, W) arrays and integer labels, with the facts recorded for `name`.

    `class_names` replaces the recorded names where those come from the files.
    """
    facts = facts_for(name)
    names = class_names if class_names is not None else facts.class_names
    if names is None:
        raise ValueError(f"{name}: class names come from the files; pass class_names")
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(f"{name}: {split} labels span {int(y.min())}..{int(y.max())}, "
                            f"but the data set has {len(names)} classes (0..{len(names) - 1})")
    xt, xs = _tensor(x_train), _tensor(x_test)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    ys = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    if facts.mean is not None and facts.std is not None:
        mean, std = facts.mean, facts.std
    else:
        mean, std = channel_stats(xt)
    return Dataset(name, xt, yt, xs, ys, tuple(names), mean, std, allow_hflip=facts.allow_hflip,
                   crop_padding=facts.padding_at(int(xt.shape[2])))


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing `x`'s memory where that is safe (a writable or copy-on-write array), else a copy."""
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())
