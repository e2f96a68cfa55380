"""Loaders of official on-disk formats, on small fixture files written here in each format."""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from bdbench.data import FACTS, load_dataset, official
from bdbench.data.cache import cache_root
from bdbench.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BDBENCH_CACHE_DIR", str(tmp_path / "cache"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- MNIST IDX

def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", gz)  # torchvision's layout under the root
    ds = official.load_mnist(str(tmp_path))
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.mean == FACTS["mnist"].mean and not ds.allow_hflip and ds.class_names[3] == "3"


def test_fashion_mnist_facts(tmp_path):
    _write_mnist(tmp_path, gz=True)
    ds = official.load_fashion_mnist(str(tmp_path))
    assert ds.name == "fashion-mnist" and ds.class_names[9] == "Ankle boot" and ds.allow_hflip


def test_mnist_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        official.load_mnist(str(tmp_path / "nowhere"))
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]") as info:
        official.load_mnist(str(tmp_path))
    assert str(tmp_path) in _one_line(info)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes with 1 dimensions"):
        official.load_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="6 test images but 5 labels"):
        official.load_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(6, np.uint8))[:-2])
    with pytest.raises(DataError, match="truncated"):
        official.load_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(6, 12, np.uint8)))
    with pytest.raises(DataError, match=r"mnist: test labels span 12..12, but the data set has 10 classes \(0..9\)"):
        official.load_mnist(str(tmp_path))


# ----------------------------------------------------------------------------- CIFAR python batches

def _cifar_batch(n: int, label_key: str, first: int, classes: int = 10) -> tuple[bytes, np.ndarray, list[int]]:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [(first + i) % classes for i in range(n)]
    batch = {"batch_label": "fixture", label_key: labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
    return pickle.dumps(batch, protocol=2), data, labels  # protocol 2, as the official (Python 2) batches


def _write_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        raw, data, labels = _cifar_batch(3, "labels", i)
        (folder / name).write_bytes(raw)
        written[name] = (data, labels)
    return written


def test_cifar10_from_folder_and_archive(tmp_path):
    written = _write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    ds = official.load_cifar10(str(tmp_path / "data"))
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    data, labels = written["data_batch_2"]
    assert torch.equal(ds.x_train[3], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert ds.y_train[3:6].tolist() == labels
    assert ds.class_names[0] == "airplane" and ds.allow_hflip and ds.crop_padding == 4

    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "data" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_archive = official.load_cifar10(str(tmp_path / "cifar-10-python.tar.gz"))
    assert torch.equal(from_archive.x_train, ds.x_train) and torch.equal(from_archive.y_test, ds.y_test)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        raw, _, _ = _cifar_batch(n, "fine_labels", 95, classes=100)
        (folder / name).write_bytes(raw)
    ds = official.load_cifar100(str(tmp_path))
    assert ds.num_classes == 100 and ds.y_train.tolist() == [95, 96, 97, 98]
    assert ds.class_names[99] == "worm"


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar_batches_are_never_unpickled_with_code(tmp_path):
    _write_cifar10(tmp_path)
    marker = tmp_path / "code-ran"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR python batch \(refusing to load posix.mkdir"):
        official.load_cifar10(str(tmp_path))
    assert not marker.exists()


def test_cifar_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="no cifar10 data; expected cifar-10-batches-py/ with data_batch_1"):
        official.load_cifar10(str(tmp_path))
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing data_batch_4 of the cifar10 python batches"):
        official.load_cifar10(str(tmp_path))
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="c.tar.gz: missing cifar-10-batches-py/data_batch_4"):
        official.load_cifar10(str(tmp_path / "c.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="junk.tar.gz: not a readable tar archive"):
        official.load_cifar10(str(tmp_path / "junk.tar.gz"))
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(
        pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        official.load_cifar10(str(tmp_path))


# ----------------------------------------------------------------------------- GTSRB

def _write_gtsrb(base: Path, train: dict[int, list[np.ndarray]], test: list[tuple[np.ndarray, int]],
                 test_csv: bool = True) -> None:
    """The official layout: Final_Training/Images/000NN/*.ppm + GT-000NN.csv, Final_Test/Images/*.ppm."""
    header = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
    for label, images in train.items():
        folder = base / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i, pixels in enumerate(images):
            name = f"00000_{i:05d}.ppm"
            Image.fromarray(pixels).save(folder / name)
            rows.append([name, pixels.shape[1], pixels.shape[0], 1, 1, pixels.shape[1] - 1, pixels.shape[0] - 1, label])
        with (folder / f"GT-{label:05d}.csv").open("w", newline="") as handle:
            csv.writer(handle, delimiter=";").writerows([header, *rows])
    folder = base / "Final_Test" / "Images"
    folder.mkdir(parents=True)
    rows = []
    for i, (pixels, label) in enumerate(test):
        Image.fromarray(pixels).save(folder / f"{i:05d}.ppm")
        rows.append([f"{i:05d}.ppm", pixels.shape[1], pixels.shape[0], 1, 1, 2, 2, label])
    if test_csv:
        with (folder / "GT-final_test.csv").open("w", newline="") as handle:
            csv.writer(handle, delimiter=";").writerows([header, *rows])


def test_gtsrb_resizes_full_frames_bicubic(tmp_path):
    frames = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 37), (29, 52), (33, 33))]
    _write_gtsrb(tmp_path / "GTSRB", {0: frames[:2], 14: frames[2:]}, [(frames[1], 14)])
    ds = official.load_gtsrb(str(tmp_path), size=16)
    assert ds.x_train.shape == (3, 3, 16, 16) and ds.y_train.tolist() == [0, 0, 14] and ds.y_test.tolist() == [14]
    expected = np.asarray(Image.fromarray(frames[1]).resize((16, 16), Image.BICUBIC)).transpose(2, 0, 1).copy()
    assert torch.equal(ds.x_train[1], torch.from_numpy(expected))
    assert ds.class_names[14] == "Stop" and not ds.allow_hflip and ds.crop_padding == 2


def test_gtsrb_bad_layouts(tmp_path):
    with pytest.raises(DataError, match=r"missing Final_Training/Images/ \(unpack GTSRB_Final_Training_Images.zip"):
        official.load_gtsrb(str(tmp_path))
    frame = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    _write_gtsrb(tmp_path, {0: [frame]}, [(frame, 0)], test_csv=False)
    with pytest.raises(DataError, match=r"missing GT-final_test.csv \(the test labels, from GTSRB_Final_Test_GT.zip\)"):
        official.load_gtsrb(str(tmp_path))
    (tmp_path / "Final_Test" / "Images" / "GT-final_test.csv").write_text("Filename;Width\n00000.ppm;20\n")
    with pytest.raises(DataError, match="expected semicolon-separated columns Filename;...;ClassId"):
        official.load_gtsrb(str(tmp_path))
    (tmp_path / "Final_Test" / "Images" / "GT-final_test.csv").write_text("Filename;ClassId\n00001.ppm;0\n")
    with pytest.raises(DataError, match="lists 00001.ppm, which is not in"):
        official.load_gtsrb(str(tmp_path))
    (tmp_path / "Final_Training" / "Images" / "00000" / "GT-00000.csv").unlink()
    with pytest.raises(DataError, match="00000: missing GT-00000.csv"):
        official.load_gtsrb(str(tmp_path))
    with pytest.raises(ConfigError, match="dataset size 2 is not an image side length"):
        official.load_gtsrb(str(tmp_path), size=2)


@pytest.mark.skipif(not (SHARED_DATA / "gtsrb32.npz").is_file(), reason="../shared/data/gtsrb32.npz is absent")
def test_gtsrb_tree_and_gtsrb32_npz_give_the_same_tensors(tmp_path):
    with np.load(SHARED_DATA / "gtsrb32.npz") as archive:
        x_train, y_train = archive["x_train"], archive["y_train"]
        x_test, y_test = archive["x_test"], archive["y_test"]
    through_npz = load_dataset("npz", path=str(SHARED_DATA / "gtsrb32.npz"))
    # A few images of a few classes, written as the official tree; 32x32 frames resize to themselves.
    train_idx = {label: np.flatnonzero(y_train == label)[:3] for label in (0, 7, 14, 42)}
    test_idx = np.arange(0, len(y_test), 997)
    _write_gtsrb(tmp_path, {label: list(x_train[idx]) for label, idx in train_idx.items()},
                 [(x_test[i], int(y_test[i])) for i in test_idx])
    through_tree = official.load_gtsrb(str(tmp_path))
    order = np.concatenate(list(train_idx.values()))
    assert torch.equal(through_tree.x_train, through_npz.x_train[order])
    assert torch.equal(through_tree.y_train, through_npz.y_train[order])
    assert torch.equal(through_tree.x_test, through_npz.x_test[test_idx])
    assert torch.equal(through_tree.y_test, through_npz.y_test[test_idx])


# ----------------------------------------------------------------------------- Tiny-ImageNet

def _write_tiny_imagenet(top: Path) -> Path:
    base = top / "tiny-imagenet-200"
    wnids = ["n02099601", "n01443537", "n09999999"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02099601\tgolden retriever\n")
    for wnid in wnids:
        (base / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", format="JPEG")
    lines = []
    for i, wnid in enumerate(["n01443537", "n09999999", "n01443537"]):
        pixels = RNG.integers(0, 256, (64, 64), dtype=np.uint8)  # grayscale, as some of the real files
        Image.fromarray(pixels).save(base / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tiny_imagenet(tmp_path):
    base = _write_tiny_imagenet(tmp_path)
    ds = official.load_tiny_imagenet(str(tmp_path))
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (3, 3, 64, 64)
    assert ds.class_names == ("goldfish", "golden retriever", "n09999999")  # sorted wnids, named by words.txt
    assert ds.y_train.tolist() == [0, 0, 1, 1, 2, 2] and ds.y_test.tolist() == [0, 2, 0]
    first = np.asarray(Image.open(base / "train" / "n01443537" / "images" / "n01443537_0.JPEG").convert("RGB"))
    assert torch.equal(ds.x_train[0], torch.from_numpy(first.transpose(2, 0, 1).copy()))
    gray = np.array(Image.open(base / "val" / "images" / "val_1.JPEG"))
    assert all(torch.equal(ds.x_test[1, c], torch.from_numpy(gray)) for c in range(3))
    assert ds.mean == FACTS["tiny-imagenet"].mean and ds.allow_hflip and ds.crop_padding == 8
    assert official.load_tiny_imagenet(str(base), size=32).x_train.shape == (6, 3, 32, 32)


def test_tiny_imagenet_bad_layouts(tmp_path):
    base = _write_tiny_imagenet(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1 is not '<file>\\\\t<wnid>...' with a wnid of wnids.txt"):
        official.load_tiny_imagenet(str(tmp_path))
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="missing val/val_annotations.txt of the tiny-imagenet-200 layout") as info:
        official.load_tiny_imagenet(str(tmp_path))
    _one_line(info)


# ----------------------------------------------------------------------------- image folders

def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder_resizes_and_centre_crops(tmp_path):
    wide = RNG.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    _save(tmp_path / "train" / "cat" / "a.png", wide)
    _save(tmp_path / "train" / "cat" / "b.jpg", RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    _save(tmp_path / "train" / "dog" / "nested" / "c.bmp", RNG.integers(0, 256, (12, 12), dtype=np.uint8))
    _save(tmp_path / "val" / "dog" / "d.png", RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = official.load_imagefolder(str(tmp_path), size=10, allow_hflip=True)
    assert ds.class_names == ("cat", "dog") and ds.y_train.tolist() == [0, 0, 1] and ds.y_test.tolist() == [1]
    assert ds.x_train.shape == (3, 3, 10, 10) and ds.allow_hflip
    centre = np.asarray(Image.fromarray(wide).resize((20, 10), Image.BICUBIC).crop((5, 0, 15, 10)))
    assert torch.equal(ds.x_train[0], torch.from_numpy(centre.transpose(2, 0, 1).copy()))


def test_imagefolder_of_grayscale_images_has_one_channel(tmp_path):
    for split, name in (("train", "a"), ("train", "b"), ("test", "a")):
        _save(tmp_path / split / name / "x.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8))
    ds = official.load_imagefolder(str(tmp_path))
    assert ds.x_train.shape == (2, 1, 8, 8) and ds.x_test.shape == (1, 1, 8, 8)


def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(DataError, match=r"missing train/ and val/ \(or test/\)"):
        official.load_imagefolder(str(tmp_path))
    _save(tmp_path / "train" / "a" / "x.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _save(tmp_path / "train" / "a" / "y.png", RNG.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    _save(tmp_path / "val" / "b" / "x.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="class folder 'b' has no counterpart"):
        official.load_imagefolder(str(tmp_path))
    (tmp_path / "val" / "b").rename(tmp_path / "val" / "a")
    with pytest.raises(DataError, match=r"y.png: 9x9 pixels; without a size every image must be square and as large as x.png"):
        official.load_imagefolder(str(tmp_path))
    (tmp_path / "train" / "a" / "y.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="y.png: not a readable image"):
        official.load_imagefolder(str(tmp_path))


# ----------------------------------------------------------------------------- the decoded-array cache

def test_second_load_reads_the_cache_and_an_edit_invalidates_it(tmp_path, monkeypatch):
    for split, name in (("train", "a"), ("train", "b"), ("val", "a")):
        _save(tmp_path / "data" / split / name / "x.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    first = official.load_imagefolder(str(tmp_path / "data"))
    assert any((cache_root() / "datasets").iterdir())

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(official, "decode_images", no_decoding)
    second = official.load_imagefolder(str(tmp_path / "data"))
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)

    _save(tmp_path / "data" / "train" / "b" / "y.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(AssertionError, match="decoded again"):
        official.load_imagefolder(str(tmp_path / "data"))


def test_cache_off_and_unwritable_cache_still_load(tmp_path, monkeypatch):
    _write_mnist(tmp_path / "m", gz=False)
    monkeypatch.setenv("BDBENCH_CACHE_DIR", "off")
    assert cache_root() is None
    assert official.load_mnist(str(tmp_path / "m")).x_train.shape == (12, 1, 28, 28)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("BDBENCH_CACHE_DIR", str(blocker))
    assert official.load_mnist(str(tmp_path / "m")).x_test.shape == (6, 1, 28, 28)


def test_grid_spec_parameters_reach_the_loader(tmp_path):
    _write_mnist(tmp_path, gz=True)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds is load_dataset("mnist", root=str(tmp_path))
    with pytest.raises(ConfigError, match="dataset 'gtsrb' has no parameter 'resize'; valid parameters: root, size"):
        load_dataset("gtsrb", root=str(tmp_path), resize=3)


def test_facts_table_is_consistent():
    for name, facts in FACTS.items():
        if facts.mean is not None:
            assert len(facts.mean) == len(facts.std) == facts.in_channels, name
        assert facts.class_names is None or len(set(facts.class_names)) == len(facts.class_names), name
    assert len(FACTS["cifar100"].class_names) == 100 and len(FACTS["gtsrb"].class_names) == 43
