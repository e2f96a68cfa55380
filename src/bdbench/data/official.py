"""Loaders for data sets in the official formats users already have on disk; nothing is downloaded.

Each loader takes the `root` a grid spec names (`dataset: {name: cifar10, root: /data/cifar10}`),
checks the official layout there and raises a one-line `DataError` naming what is missing. The
pixels are decoded once and kept in the decoded-array cache (`bdbench.data.cache`), so a second
load, in this or any later process, memory-maps them instead. Facts (normalisation, flips, class
names) come from `bdbench.data.facts`.

| name            | layout under root                                                              |
|-----------------|--------------------------------------------------------------------------------|
| mnist           | train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-* (each may be .gz)     |
| fashion-mnist   | the same four IDX files                                                        |
| cifar10         | cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz   |
| cifar100        | cifar-100-python/ (train, test) or cifar-100-python.tar.gz                     |
| gtsrb           | [GTSRB/]Final_Training/Images/000NN/*.ppm + GT-000NN.csv, Final_Test/Images/   |
|                 | *.ppm + GT-final_test.csv                                                      |
| tiny-imagenet   | [tiny-imagenet-200/]wnids.txt, train/<wnid>/images/*, val/val_annotations.txt  |
| imagefolder     | train/<class>/<image>, val/<class>/<image> (or test/)                          |
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import logging
import os
import pickle
import struct
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from bdbench.data.cache import cached_arrays, fingerprint
from bdbench.data.dataset import Dataset, channel_stats
from bdbench.data.facts import make_dataset
from bdbench.data.loaders import DATASETS
from bdbench.errors import ConfigError, DataError

log = logging.getLogger("bdbench")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _root(root: str, holds: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; set dataset.root to the folder that holds {holds}")
    return path


def _check_size(size: int) -> int:
    if not isinstance(size, int) or not 4 <= size <= 1024:
        raise ConfigError(f"dataset size {size!r} is not an image side length in 4..1024")
    return size


def _arrays_to_dataset(name: str, arrays: dict[str, np.ndarray], class_names: Sequence[str] | None = None) -> Dataset:
    return make_dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                        tuple(class_names) if class_names is not None else None)


# ----------------------------------------------------------------------------- MNIST (IDX)

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, stem: str) -> Path | None:
    # The original names, and the dotted variant some mirrors use (train-images.idx3-ubyte).
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX array of unsigned bytes (LeCun et al.'s format): magic 0x0000 08 <dims>, big-endian sizes."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc}); download it again") from None
    if len(data) < 4 + 4 * dims or data[:3] != b"\x00\x00\x08" or data[3] != dims:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {dims} dimensions "
                        f"(header {data[:4].hex() or 'empty'}, expected 000008{dims:02x})")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = data[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes) but the file holds "
                        f"{len(body)}; the file is truncated or not MNIST")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _load_idx_dataset(name: str, root: str, torchvision_folder: str) -> Dataset:
    base = _root(root, f"the {name} IDX files")
    folders = [base, base / "raw", base / torchvision_folder / "raw"]
    found = [{stem: _idx_file(folder, stem) for stem in _IDX_STEMS} for folder in folders]
    best = max(range(len(folders)), key=lambda i: sum(p is not None for p in found[i].values()))
    files = found[best]
    missing = [stem for stem, path in files.items() if path is None]
    if missing:
        raise DataError(f"{folders[best]}: missing {', '.join(f'{m}[.gz]' for m in missing)} "
                        f"(the official {name} IDX files; also looked in raw/ and {torchvision_folder}/raw/)")

    present = {stem: path for stem, path in files.items() if path is not None}  # all of them, as checked above

    def build() -> dict[str, np.ndarray]:
        images = {split: _read_idx(present[f"{prefix}-images-idx3-ubyte"], 3)
                  for split, prefix in (("train", "train"), ("test", "t10k"))}
        labels = {split: _read_idx(present[f"{prefix}-labels-idx1-ubyte"], 1)
                  for split, prefix in (("train", "train"), ("test", "t10k"))}
        for split in ("train", "test"):
            if len(images[split]) != len(labels[split]):
                raise DataError(f"{folders[best]}: {len(images[split])} {split} images but "
                                f"{len(labels[split])} labels; the IDX files do not belong together")
        return {"x_train": images["train"][:, None], "y_train": labels["train"].astype(np.int64),
                "x_test": images["test"][:, None], "y_test": labels["test"].astype(np.int64)}

    return _arrays_to_dataset(name, cached_arrays(name, fingerprint(present.values()), build))


@DATASETS.register("mnist")
def load_mnist(root: str) -> Dataset:
    """MNIST (LeCun et al. 1998) from its four IDX files, gzipped or not: 60,000 train / 10,000 test."""
    return _load_idx_dataset("mnist", root, "MNIST")


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: str) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) from its four IDX files, gzipped or not: 60,000 / 10,000."""
    return _load_idx_dataset("fashion-mnist", root, "FashionMNIST")


# ----------------------------------------------------------------------------- CIFAR (python batches)

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch is a pickle, and a general
    unpickler would run whatever code a tampered file names."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[..., object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes written by Python 3
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays") from None


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR copy keeps its python batches, and under which key a batch holds its labels."""

    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    labels: str

    def batches(self, split: str) -> tuple[str, ...]:
        return self.train if split == "train" else self.test


_CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"),
    "cifar100": _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "fine_labels"),
}


def _read_cifar_batch(data: bytes, source: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # latin1: the official batches were pickled by Python 2, whose byte strings numpy reads this way.
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{source}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DataError(f"{source}: not a CIFAR python batch (expected a dict with 'data' and '{label_key}')")
    x, y = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise DataError(f"{source}: 'data' is {x.dtype} {x.shape} with {y.shape[0]} labels; expected uint8 "
                        f"(N, 3072) and N labels")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _cifar_source(name: str, root: Path) -> tuple[list[Path], Callable[[], dict[str, tuple[str, bytes]]]]:
    """The files a CIFAR copy is read from, and a function giving each batch's (source, bytes) by name."""
    spec = _CIFAR[name]
    batches = spec.train + spec.test
    for folder in (root, root / spec.folder):
        if folder.is_dir() and any((folder / b).is_file() for b in batches):
            missing = [b for b in batches if not (folder / b).is_file()]
            if missing:
                raise DataError(f"{folder}: missing {', '.join(missing)} of the {name} python batches")
            return ([folder / b for b in batches],
                    lambda folder=folder: {b: (str(folder / b), (folder / b).read_bytes()) for b in batches})
    archive = root if root.is_file() else root / spec.archive
    if not archive.is_file():
        raise DataError(f"{root}: no {name} data; expected {spec.folder}/ with {', '.join(batches)}, "
                        f"or {spec.archive}")

    def read_archive() -> dict[str, tuple[str, bytes]]:
        wanted = {f"{spec.folder}/{b}": b for b in batches}
        found: dict[str, tuple[str, bytes]] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    handle = tar.extractfile(member) if member.name in wanted and member.isfile() else None
                    if handle is not None:
                        found[wanted[member.name]] = (f"{archive}:{member.name}", handle.read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive}: not a readable tar archive ({exc})") from None
        missing = [f"{spec.folder}/{b}" for b in batches if b not in found]
        if missing:
            raise DataError(f"{archive}: missing {', '.join(missing)}; is this the python version of {name}?")
        return found

    return [archive], read_archive


def _load_cifar(name: str, root: str) -> Dataset:
    spec = _CIFAR[name]
    files, read = _cifar_source(name, _root(root, f"{spec.folder}/ or {spec.archive}"))

    def build() -> dict[str, np.ndarray]:
        raw = read()
        arrays = {}
        for split in ("train", "test"):
            parts = [_read_cifar_batch(raw[b][1], raw[b][0], spec.labels) for b in spec.batches(split)]
            arrays[f"x_{split}"] = np.concatenate([x for x, _ in parts])
            arrays[f"y_{split}"] = np.concatenate([y for _, y in parts])
        return arrays

    return _arrays_to_dataset(name, cached_arrays(name, fingerprint(files), build))


@DATASETS.register("cifar10")
def load_cifar10(root: str) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) from the python batches, as a folder or the original .tar.gz: 50,000 / 10,000."""
    return _load_cifar("cifar10", root)


@DATASETS.register("cifar100")
def load_cifar100(root: str) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009), fine labels, from the python files or the original .tar.gz: 50,000 / 10,000."""
    return _load_cifar("cifar100", root)


# ----------------------------------------------------------------------------- image files

def _open_rgb_or_gray(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _resize_full_frame(image, size: int):
    """The whole frame to size x size, bicubic (how gtsrb32.npz was made; PIL returns a copy at the same size)."""
    from PIL import Image

    return image.resize((size, size), Image.Resampling.BICUBIC)


def _resize_center_crop(image, size: int):
    """Shorter side to `size` (bicubic), then the central size x size: keeps a photo's aspect ratio."""
    from PIL import Image

    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_images(paths: Sequence[Path], size: int | None,
                  resize: Callable | None = _resize_full_frame) -> np.ndarray:
    """Decode image files to uint8 (N, C, size, size), C = 1 when every image is grayscale, else 3.

    With `size` None every image must already be square and of one size. Files are decoded on a
    few threads: Pillow releases the GIL while it decodes and resizes.
    """
    if not paths:
        return np.zeros((0, 3, size or 1, size or 1), np.uint8)
    if size is None:
        size = _open_rgb_or_gray(paths[0]).size[0]
    out = np.empty((len(paths), 3, size, size), np.uint8)
    gray = np.zeros(len(paths), bool)

    def decode(i: int) -> None:
        image = _open_rgb_or_gray(paths[i])
        if resize is not None:
            image = resize(image, size)
        if image.size != (size, size):
            raise DataError(f"{paths[i]}: {image.size[0]}x{image.size[1]} pixels; without a size every image must "
                            f"be square and as large as {paths[0].name}; set the data set's size to resize them")
        pixels = np.asarray(image)
        gray[i] = pixels.ndim == 2
        out[i] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(decode, range(len(paths))))
    return np.ascontiguousarray(out[:, :1]) if gray.all() else out


def _decode_labelled(name: str, splits: dict[str, tuple[list[Path], list[int]]], size: int | None,
                     resize: Callable | None, key: dict) -> dict[str, np.ndarray]:
    """Decode a train and a test list of (files, labels) through the cache, with the training
    split's channel statistics (`stats`: mean and std rows) for sets without published ones."""
    files = splits["train"][0] + splits["test"][0]

    def build() -> dict[str, np.ndarray]:
        log.info("%s: decoding %d images once; later loads read the cache", name, len(files))
        arrays = {}
        for split, (paths, labels) in splits.items():
            arrays[f"x_{split}"] = decode_images(paths, size, resize)
            arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            # One split all grayscale, the other with colour: give both three channels.
            arrays = {k: np.repeat(v, 3, axis=1) if k.startswith("x_") and v.shape[1] == 1 else v
                      for k, v in arrays.items()}
        arrays["stats"] = np.array(channel_stats(torch.from_numpy(arrays["x_train"])), dtype=np.float64)
        return arrays

    return cached_arrays(name, {**key, "size": size, "files": fingerprint(files)}, build)


# ----------------------------------------------------------------------------- GTSRB

def _gtsrb_csv(path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    """Image paths and ClassIds from an official GT-*.csv (semicolon-separated, with a header)."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=";"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable GTSRB annotation file ({exc})") from None
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise DataError(f"{path}: expected semicolon-separated columns Filename;...;ClassId "
                        f"(GT-final_test.test.csv has no labels: use GT-final_test.csv from GTSRB_Final_Test_GT.zip)")
    paths, labels = [], []
    for row in rows:
        image = folder / row["Filename"]
        if not image.is_file():
            raise DataError(f"{path}: lists {row['Filename']}, which is not in {folder}")
        try:
            labels.append(int(row["ClassId"]))
        except ValueError:
            raise DataError(f"{path}: ClassId {row['ClassId']!r} of {row['Filename']} is not an integer") from None
        paths.append(image)
    return paths, labels


@DATASETS.register("gtsrb")
def load_gtsrb(root: str, size: int = 32) -> Dataset:
    """GTSRB (Stallkamp et al. 2011) from the official Final_Training/Final_Test folders: 39,209 / 12,630, 43 classes.

    Each full frame (not the ROI) is resized bicubic to `size` x `size`, as gtsrb32.npz was made.
    """
    size = _check_size(size)
    top = _root(root, "Final_Training/ and Final_Test/ (the official GTSRB folders)")
    base = top / "GTSRB" if (top / "GTSRB" / "Final_Training").is_dir() else top
    train_dir, test_dir = base / "Final_Training" / "Images", base / "Final_Test" / "Images"
    for folder, archive in ((train_dir, "GTSRB_Final_Training_Images.zip"), (test_dir, "GTSRB_Final_Test_Images.zip")):
        if not folder.is_dir():
            raise DataError(f"{base}: missing {folder.relative_to(base)}/ (unpack {archive} here)")
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not class_dirs:
        raise DataError(f"{train_dir}: no class folders 00000..00042")
    train_paths, train_labels = [], []
    for class_dir in class_dirs:
        annotations = class_dir / f"GT-{class_dir.name}.csv"
        if not annotations.is_file():
            raise DataError(f"{class_dir}: missing GT-{class_dir.name}.csv (the class's official annotations)")
        paths, labels = _gtsrb_csv(annotations, class_dir)
        train_paths += paths
        train_labels += labels
    candidates = [test_dir / "GT-final_test.csv", test_dir.parent / "GT-final_test.csv", base / "GT-final_test.csv",
                  top / "GT-final_test.csv"]
    test_csv = next((p for p in candidates if p.is_file()), None)
    if test_csv is None:
        raise DataError(f"{base}: missing GT-final_test.csv (the test labels, from GTSRB_Final_Test_GT.zip); "
                        f"put it in Final_Test/Images/")
    test_paths, test_labels = _gtsrb_csv(test_csv, test_dir)
    arrays = _decode_labelled("gtsrb", {"train": (train_paths, train_labels), "test": (test_paths, test_labels)},
                              size, _resize_full_frame, {"root": str(base.resolve())})
    return _arrays_to_dataset("gtsrb", arrays)


# ----------------------------------------------------------------------------- Tiny-ImageNet

def _readable_names(base: Path, wnids: list[str]) -> list[str]:
    """A class's first synonym from words.txt ('n01443537' -> 'goldfish'), or its wnid."""
    words = base / "words.txt"
    names = dict.fromkeys(wnids)
    if words.is_file():
        for line in words.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in names:
                names[wnid] = text.split(",")[0].strip() or wnid
    return [names[w] or w for w in wnids]


@DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(root: str, size: int = 64) -> Dataset:
    """Tiny-ImageNet (Le and Yang 2015) from tiny-imagenet-200/: 100,000 train / 10,000 val (as test), 200 classes."""
    size = _check_size(size)
    top = _root(root, "tiny-imagenet-200/")
    base = top / "tiny-imagenet-200" if (top / "tiny-imagenet-200").is_dir() else top
    required = [base / "wnids.txt", base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"]
    missing = [str(p.relative_to(base)) for p in required if not p.exists()]
    if missing:
        raise DataError(f"{base}: missing {', '.join(missing)} of the tiny-imagenet-200 layout")
    wnids = sorted({line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip()})
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{base}: missing train/{wnid}/images/ (wnids.txt lists {wnid})")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        train_paths += paths
        train_labels += [label[wnid]] * len(paths)
    test_paths, test_labels = [], []
    annotations = base / "val" / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DataError(f"{annotations}: line {number} is not '<file>\\t<wnid>...' with a wnid of wnids.txt")
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise DataError(f"{annotations}: line {number} names {fields[0]}, which is not in val/images/")
        test_paths.append(path)
        test_labels.append(label[fields[1]])
    arrays = _decode_labelled("tiny-imagenet", {"train": (train_paths, train_labels),
                                                "test": (test_paths, test_labels)},
                              size, _resize_full_frame, {"root": str(base.resolve())})
    return _arrays_to_dataset("tiny-imagenet", arrays, _readable_names(base, wnids))


# ----------------------------------------------------------------------------- image folders

def _class_files(folder: Path) -> list[Path]:
    # os.walk knows files from folders without a stat per entry; image folders hold many files.
    return [Path(p) for p in sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder, followlinks=True)
                                    for name in names if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)]


@DATASETS.register("imagefolder")
def load_imagefolder(root: str, size: int | None = None, allow_hflip: bool = False) -> Dataset:
    """Any images in root/train/<class>/ and root/val/<class>/ (or test/), e.g. an ImageNet subset.

    With `size`, each image's shorter side is resized (bicubic) to `size` and the centre cropped;
    without, every image must already be square and of one size. Grayscale-only folders give one
    channel. Normalisation is computed from the training split; flips only with `allow_hflip`.
    """
    if size is not None:
        size = _check_size(size)
    base = _root(root, "train/ and val/ with one subfolder per class")
    train_dir = base / "train"
    test_dir = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = " and ".join(n for n, ok in (("train/", train_dir.is_dir()), ("val/ (or test/)", test_dir)) if not ok)
        raise DataError(f"{base}: missing {missing}; an image folder holds train/<class>/ and val/<class>/")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class subfolders; put each class's images in train/<class>/")
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DataError(f"{test_dir}: class folder {unknown[0]!r} has no counterpart in {train_dir}")
    splits = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        paths, labels = [], []
        for index, name in enumerate(classes):
            files = _class_files(folder / name) if (folder / name).is_dir() else []
            paths += files
            labels += [index] * len(files)
        if not paths:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        splits[split] = (paths, labels)
    empty = [name for i, name in enumerate(classes) if i not in set(splits["train"][1])]
    if empty:
        raise DataError(f"{train_dir / empty[0]}: no images; every class needs training images")
    arrays = _decode_labelled("imagefolder", splits, size, _resize_center_crop if size else None,
                              {"root": str(base.resolve())})
    x_train, x_test = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["x_test"])
    mean, std = (tuple(float(v) for v in row) for row in arrays["stats"])
    return Dataset(base.name, x_train, torch.from_numpy(np.asarray(arrays["y_train"])), x_test,
                   torch.from_numpy(np.asarray(arrays["y_test"])), tuple(classes), mean, std,
                   allow_hflip=allow_hflip, crop_padding=max(1, round(x_train.shape[2] / 8)))
