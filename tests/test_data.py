import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from bdbench.data import load_dataset
from bdbench.data.loaders import load_npz
from bdbench.errors import ConfigError, DataError


def test_mnist5k_is_a_stratified_4000_1000_split_of_real_digits():
    ds = load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.num_classes == 10 and not ds.allow_hflip
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    assert load_dataset("mnist5k") is ds  # loaded once per process


def test_digits(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.image_size == 8 and digits.in_channels == 1


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 12, 12, 3), dtype=np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8),
        "y_test": np.arange(8) % 4,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_loads_hwc_as_chw(tmp_path):
    arrays = _write_npz(tmp_path / "d.npz")
    ds = load_npz(str(tmp_path / "d.npz"))
    assert ds.x_train.shape == (20, 3, 12, 12) and ds.num_classes == 4
    assert torch.equal(ds.x_train[3].permute(1, 2, 0), torch.from_numpy(arrays["x_train"][3]))


def test_npz_missing_file_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"nope\.npz: no such file.*x_train, y_train"):
        load_npz(str(tmp_path / "nope.npz"))


@pytest.mark.parametrize("overrides, message", [
    ({"y_test": None}, "missing y_test"),
    ({"x_train": np.zeros((20, 12, 12, 3), dtype=np.float32)}, "dtype float32, not uint8"),
    ({"x_train": np.zeros((20, 12, 12, 5), dtype=np.uint8)}, r"shape \(20, 12, 12, 5\)"),
    ({"y_train": np.arange(19)}, "y_train must be 1-D integers"),
])
def test_npz_malformed_is_one_line_error(tmp_path, overrides, message):
    _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=message) as info:
        load_npz(str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz archive"):
        load_npz(str(tmp_path / "junk.npz"))


def test_unknown_dataset_and_parameter():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; choose one of: cifar10, cifar100, digits, "
                                          "fashion-mnist, gtsrb, imagefolder, mnist, mnist5k, npz, tiny-imagenet"):
        load_dataset("cifar")
    with pytest.raises(ConfigError, match="dataset 'npz' needs parameter 'path'"):
        load_dataset("npz")


@pytest.mark.skipif(not (SHARED_DATA / "gtsrb32.npz").is_file(), reason="../shared/data/gtsrb32.npz is absent")
def test_gtsrb32_through_npz():
    ds = load_dataset("npz", path=str(SHARED_DATA / "gtsrb32.npz"))
    assert ds.x_train.shape == (25087, 3, 32, 32) and ds.x_test.shape == (7949, 3, 32, 32)
    assert ds.num_classes == 43 and not ds.allow_hflip
