"""`bdbench scan`: an audit of models that bdbench trained, a BadNets one and a clean one, against what the
same detector said about them inside the grid; exit statuses; pictures and page; bad input as one line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_GRID
from safetensors.torch import load_file, save_file

from bdbench import run_grid
from bdbench.cli import main
from bdbench.data import load_dataset
from bdbench.experiment import clean_budget
from bdbench.grid import CleanBudget
from bdbench.scan import clean_draw, scan

GRID = {**copy.deepcopy(TINY_GRID), "model": {"name": "cnn-small", "width": 16},
        "training": {"epochs": 10, "batch_size": 64, "lr": 0.05},
        "defenses": ["none", "nc"], "clean_budget": {"per_class": 15}}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A clean and a BadNets (2x2 patch, target 0) cnn-small on digits, each with its grid row for Neural
    Cleanse on a budget of 15 training images per class, and the victims' weights as the grid cached them."""
    out = tmp_path_factory.mktemp("grid")
    rows = run_grid(GRID, out=out, threads=1, progress=False)
    assert (rows.status == "ok").all(), rows.error.tolist()
    found = {}
    for attack in ("none", "badnets"):
        row = rows[(rows.attack == attack) & (rows.defense == "nc")].iloc[0]
        found[attack] = (out / "cache" / "victims" / f"{row.victim_key}.safetensors", row)
    return found


def _scan_args(weights: Path, *extra: str) -> list[str]:
    return ["scan", str(weights), "--model", "cnn-small", "--model-param", "width=16", "--data", "digits", *extra]


def test_scan_flags_the_badnets_target_and_passes_the_clean_model_as_the_grid_did(audited, tmp_path):
    outcomes = {}
    for attack, (weights, grid_row) in audited.items():
        page = tmp_path / attack / "report.html"
        # The grid's own budget (15 training images per class, seed 0) and detector seed: the grid's verdict.
        result = CliRunner().invoke(main, _scan_args(weights, "--split", "train", "--per-class", "15",
                                                     "--detectors", "nc", "-o", str(page)))
        outcomes[attack] = result
        lines = result.output.strip().splitlines()
        nc_line = next(line for line in lines if line.startswith("nc: "))
        assert f"anomaly index {grid_row.anomaly_index:.2f} (flags above 2.00)" in nc_line, (nc_line, grid_row)
        assert lines[-1] == f"report: {page}" and page.is_file()
        pictures = sorted(p.name for p in (tmp_path / attack / "report-pictures").iterdir())
        assert pictures == [f"nc-label-{label}.png" for label in range(10)]
        html = page.read_text()
        assert "data:image/png;base64," in html and "150 images, 15-15 per class" in html
    badnets, clean = outcomes["badnets"], outcomes["none"]
    assert badnets.exit_code == 1, badnets.output
    assert audited["badnets"][1].detected and 0 in audited["badnets"][1].suspected_targets
    assert "nc: FLAGGED: anomaly index" in badnets.output and "suspected target 0" in badnets.output
    assert "verdict: BACKDOOR SUSPECTED by nc (exit 1)" in badnets.output
    assert clean.exit_code == 0, clean.output
    assert not audited["none"][1].detected
    assert "nc: not flagged" in clean.output and "verdict: nothing flagged (exit 0)" in clean.output
    assert "Nothing flagged" in (tmp_path / "none" / "report.html").read_text()


def test_the_api_returns_each_detectors_statistics(audited):
    weights = audited["badnets"][0]
    report = scan(weights, "cnn-small", "digits", model_params={"width": 16}, split="train", per_class=15,
                  detectors="[{name: mmbd, restarts: 5, steps: 30}]", output=None)
    (verdict,) = report.verdicts
    assert verdict.detector == "mmbd(restarts=5, steps=30)" and verdict.error is None
    assert len(verdict.class_statistics) == 10 and verdict.threshold == pytest.approx(1.301, abs=1e-3)
    assert report.exit_code == (1 if verdict.detected else 0) and report.page is None
    assert report.images == 150 and report.split == "train"


def test_cpu_bfloat16_runs_the_detector_loops_as_a_bfloat16_grid_does(audited):
    weights = audited["badnets"][0]
    kwargs = dict(model_params={"width": 16}, split="train", per_class=15, detectors="nc", output=None,
                  device=torch.device("cpu"))
    plain = scan(weights, "cnn-small", "digits", **kwargs)
    fast = scan(weights, "cnn-small", "digits", cpu_bfloat16=True, **kwargs)
    assert plain.device == "cpu (float32 loops)" and fast.device == "cpu (bfloat16 loops)"
    # The same inversion in another precision: the same finding, not the same digits.
    (p,), (f,) = plain.verdicts, fast.verdicts
    assert p.anomaly_index == pytest.approx(audited["badnets"][1].anomaly_index)
    assert f.anomaly_index != p.anomaly_index
    assert f.detected and 0 in f.suspected_targets, f


def test_the_test_split_draw_is_the_grid_draw_applied_to_test_images():
    digits = load_dataset("digits")
    budget = CleanBudget(per_class=7)
    train_x, train_y = clean_draw(digits, "train", budget, 3)
    grid_x, grid_y = clean_budget(digits, budget, 3)
    assert torch.equal(train_x, grid_x) and torch.equal(train_y, grid_y)
    test_x, test_y = clean_draw(digits, "test", budget, 3)
    assert torch.bincount(test_y).tolist() == [7] * 10
    members = {tuple(x.flatten().tolist()) for x in digits.x_test}
    assert all(tuple(x.flatten().tolist()) in members for x in test_x)


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line_with_exit_status_2(audited, tmp_path):
    weights = audited["none"][0]
    run = CliRunner().invoke
    assert "no such file" in _error_line(run(main, _scan_args(tmp_path / "missing.safetensors")))
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    assert "a pickled checkpoint; bdbench never unpickles" in _error_line(run(main, _scan_args(pickled)))
    assert _error_line(run(main, _scan_args(weights, "--detectors", "ft"))) == (
        "error: --detectors: ft is a model_repair defense and gives no verdict on a model; scan runs the model "
        "detectors: cti, mmbd, nc")
    assert "ac is a training_data_detection defense and needs the training set" in _error_line(
        run(main, _scan_args(weights, "--detectors", "nc,ac")))
    assert "unknown defense 'ncc'" in _error_line(run(main, _scan_args(weights, "--detectors", "ncc")))
    assert "the weights do not fit cnn-small" in _error_line(
        run(main, ["scan", str(weights), "--model", "cnn-small", "--data", "digits", "--detectors", "nc"]))
    assert "unknown dataset 'digitz'" in _error_line(run(main, _scan_args(weights, "--data", "digitz")))
    assert "give --per-class or --fraction, not both" in _error_line(
        run(main, _scan_args(weights, "--per-class", "3", "--fraction", "0.1")))
    bare = tmp_path / "bare.safetensors"
    save_file({k[len("net."):]: v for k, v in load_file(str(weights)).items() if k.startswith("net.")}, str(bare))
    assert "carry no input normalisation; give the model's --mean and --std" in _error_line(
        run(main, _scan_args(bare, "--detectors", "nc")))
