"""A grid held against its data set before the first experiment starts.

`GridSpec` refuses what the spec alone shows (unknown names, mistyped parameters, repeated seeds).
What needs the data is refused here: a target label the data set does not have, a data set too
small for the batch size, the test set or the clean budget, a trigger that does not fit its images,
a model that cannot take them (and, needing no data, Ray missing where `federated.client_workers` asks
for it). Every refusal is one `ConfigError` line naming the key and what it accepts; nothing has run
and no results database has been opened.
"""

from __future__ import annotations

import torch

from bdbench.attacks import ATTACKS
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.grid import GridSpec, without_poison_rate
from bdbench.models import create_model
from bdbench.ray_support import import_ray
from bdbench.training import cpu_has_native_bfloat16, default_device

# A test set with fewer images than this per class cannot resolve clean accuracy or ASR to a few
# points (one test image gives an accuracy of 0 or 1), so a grid on it is refused.
MIN_TEST_IMAGES_PER_CLASS = 10


def bfloat16_warning(grid: GridSpec) -> str | None:
    """One line when the grid asks for the bfloat16 CPU path on a CPU without native bfloat16, where it
    is emulated (same results as on any CPU of its kernel set, and no faster than float32)."""
    if grid.training.cpu_bfloat16 and default_device().type == "cpu" and not cpu_has_native_bfloat16():
        return ("training.cpu_bfloat16 is set, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                "bfloat16 is emulated, which gives no speed-up over float32; set it to false unless you want "
                "bfloat16 numerics")
    return None


def check_grid(grid: GridSpec, dataset: Dataset) -> None:
    """Refuse a grid that cannot run on `dataset`, before any work (see the module docstring)."""
    k = dataset.num_classes
    if not grid.target_label < k:
        raise ConfigError(f"target_label {grid.target_label} is not a class of {dataset.name}; "
                          f"choose one of 0..{k - 1}")
    train_size, test_size = len(dataset.y_train), len(dataset.y_test)
    if train_size < grid.training.batch_size:
        raise ConfigError(f"{dataset.name} has {train_size} training images, fewer than training.batch_size "
                          f"{grid.training.batch_size}; use a larger data set or a smaller batch_size")
    if test_size < MIN_TEST_IMAGES_PER_CLASS * k:
        raise ConfigError(f"{dataset.name} has {test_size} test images; measuring {k} classes needs at least "
                          f"{MIN_TEST_IMAGES_PER_CLASS * k} ({MIN_TEST_IMAGES_PER_CLASS} per class): "
                          "give the data set a larger test split")
    per_class = grid.clean_budget.per_class
    if per_class is not None:
        counts = torch.bincount(dataset.y_train, minlength=k)
        smallest = int(counts.argmin())
        if per_class > int(counts[smallest]):
            raise ConfigError(f"clean_budget.per_class {per_class} is more than the {int(counts[smallest])} "
                              f"training images of class {smallest} of {dataset.name}; use at most that, "
                              "or a fraction")
    for attack in grid.attacks:
        ATTACKS.build(attack.name, without_poison_rate(attack).params).check(dataset, grid.target_label)
    federated = grid.federated
    if federated is not None and federated.split == "iid" and train_size // federated.clients < federated.batch_size:
        raise ConfigError(f"{federated.clients} IID clients of {dataset.name} hold {train_size // federated.clients} "
                          f"training images each, fewer than federated.batch_size {federated.batch_size}; lower "
                          "batch_size or use fewer clients")
    if federated is not None and federated.client_workers is not None:
        import_ray("federated.client_workers")
    try:
        create_model(grid.model.name, k, dataset.in_channels, dataset.image_size, **grid.model.params)
    except ConfigError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"model {grid.model.name!r} with {grid.model.params or 'its defaults'} cannot take "
                          f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size} images: "
                          f"{str(exc).splitlines()[0]}") from None
