"""Bad input is refused before any work: one line, a non-zero exit, nothing run, and an existing
results database left exactly as it was (each case once ran to completion with status `ok`)."""

import hashlib
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from bdbench.cli import main
from bdbench.data.loaders import load_npz
from bdbench.errors import DataError

BASE = {
    "name": "preflight",
    "dataset": "digits",
    "model": {"name": "cnn-small", "width": 8},
    "training": {"epochs": 1, "batch_size": 64},
    "attacks": ["none", {"name": "badnets", "patch_size": 2}],
    "defenses": ["none"],
    "seeds": [0],
}


def _npz(path, y_train=None, y_test=None, train=80, test=40):
    rng = np.random.default_rng(0)
    np.savez(path,
             x_train=rng.integers(0, 256, (train, 8, 8, 1), dtype=np.uint8),
             y_train=np.arange(train) % 4 if y_train is None else np.asarray(y_train),
             x_test=rng.integers(0, 256, (test, 8, 8, 1), dtype=np.uint8),
             y_test=np.arange(test) % 4 if y_test is None else np.asarray(y_test))
    return str(path)


def _fingerprint(out):
    """Every file of an output folder with the hash of its bytes."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An output folder holding a finished grid's results database and cached victims."""
    out = tmp_path_factory.mktemp("finished") / "out"
    config = tmp_path_factory.mktemp("config") / "grid.yaml"
    config.write_text(yaml.safe_dump(BASE))
    ran = CliRunner().invoke(main, ["run", str(config), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    return out


def _refused(tmp_path, finished, spec_changes=None, overrides=()):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _fingerprint(out)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**BASE, **(spec_changes or {})}))
    args = ["run", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert _fingerprint(out) == before  # nothing ran, nothing was written
    return lines[0]


@pytest.mark.parametrize("width, message", [
    (0, "parameter 'width' is 0: input should be greater than 0"),
    (-1, "parameter 'width' is -1: input should be greater than 0"),
    ("wide", "parameter 'width' is 'wide': input should be a valid number"),
])
def test_model_width_out_of_range_or_of_the_wrong_type(tmp_path, finished, width, message):
    line = _refused(tmp_path, finished, {"model": {"name": "preact-resnet18", "width": width}})
    assert "model 'preact-resnet18' " + message in line


def test_an_attack_parameter_of_the_wrong_type(tmp_path, finished):
    line = _refused(tmp_path, finished, overrides=["attacks.1.patch_size=abc"])
    assert "attack 'badnets' parameter 'patch_size' is 'abc': input should be a valid integer" in line


@pytest.mark.parametrize("labels, message", [
    ({"y_train": np.arange(80) % 4 + 1, "y_test": np.arange(40) % 4 + 1}, "no training image has label 0"),
    ({"y_test": np.r_[np.arange(39) % 4, 99]}, "y_test has label 99, which no training image has"),
])
def test_labels_that_are_not_0_to_k_minus_1(tmp_path, finished, labels, message):
    path = _npz(tmp_path / "labels.npz", **labels)
    line = _refused(tmp_path, finished, {"dataset": {"name": "npz", "path": path}})
    assert message in line and "num_classes" in line


def test_declared_classes_cover_a_class_absent_from_training(tmp_path):
    path = _npz(tmp_path / "declared.npz", y_train=np.arange(80) % 4 + 1, y_test=np.arange(40) % 4 + 1)
    assert load_npz(path, num_classes=5).num_classes == 5
    with pytest.raises(DataError, match="label 4, outside the 4 declared classes"):
        load_npz(path, num_classes=4)


@pytest.mark.parametrize("sizes, message", [
    ({"train": 1, "y_train": [0]}, "every training label is 0"),
    ({"train": 8, "y_train": np.arange(8) % 4}, "8 training images, fewer than training.batch_size 64"),
    ({"test": 1, "y_test": [0]}, "1 test images; measuring 4 classes needs at least 40"),
])
def test_data_sets_too_small(tmp_path, finished, sizes, message):
    path = _npz(tmp_path / "small.npz", **sizes)
    assert message in _refused(tmp_path, finished, {"dataset": {"name": "npz", "path": path}})


@pytest.mark.parametrize("changes, message", [
    ({"clean_budget": {"fraction": 0.1, "per_class": 5}}, "clean_budget: give fraction or per_class, not both"),
    ({"clean_budget": {"per_class": 500}}, "clean_budget.per_class 500 is more than the"),
    ({"seeds": [0, 0]}, "seeds: 0 given more than once"),
    ({"target_label": 99}, "target_label 99 is not a class of digits; choose one of 0..9"),
    ({"attacks": [{"name": "badnets", "patch_size": 9}]}, "badnets patch_size 9 does not fit 8x8 images"),
    ({"attacks": [{"name": "source_specific", "patch_size": 9}]}, "source_specific patch_size 9 does not fit"),
    ({"attacks": [{"name": "lsp", "attack_params": {"patch_size": 12}}]}, "badnets patch_size 12 does not fit"),
    ({"attacks": [{"name": "narcissus"}], "dataset": "mnist"},
     "narcissus needs public out-of-distribution data for 'other' and has no default for it"),
    ({"attacks": [{"name": "narcissus", "pood": {"name": "npz", "path": "absent.npz"}}]},
     "narcissus's public out-of-distribution pool absent.npz is missing"),
])
def test_grid_settings_the_data_cannot_take(tmp_path, finished, changes, message):
    if changes.get("dataset") == "mnist":  # any non-digit data set: a small npz stands in for it
        changes["dataset"] = {"name": "npz", "path": _npz(tmp_path / "other.npz")}
    assert message in _refused(tmp_path, finished, changes)


def test_the_bfloat16_cpu_path_on_a_cpu_without_native_bfloat16_is_one_warning(tmp_path, monkeypatch, caplog):
    import bdbench.preflight
    from bdbench import run_grid

    grid = {**BASE, "attacks": ["none"], "training": {"epochs": 1, "batch_size": 64, "cpu_bfloat16": True}}
    monkeypatch.setattr(bdbench.preflight, "cpu_has_native_bfloat16", lambda: False)
    with caplog.at_level("WARNING", logger="bdbench"):
        rows = run_grid(grid, out=tmp_path, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no native bfloat16" in warnings[0] and "\n" not in warnings[0]
    assert set(rows.status) == {"ok"} and set(rows.train_dtype) == {"bfloat16"}  # a warning, not a refusal
    monkeypatch.setattr(bdbench.preflight, "cpu_has_native_bfloat16", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bdbench"):
        run_grid(grid, out=tmp_path, progress=False)
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]
