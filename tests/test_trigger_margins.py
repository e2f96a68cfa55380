"""The trigger-margin diagnostic (`benchmarks/trigger_margins.py`) reads a grid's cached victims as the grid scored them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bdbench.runner import run_grid

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trigger_margins.py"
LINE = re.compile(r"^(?P<key>[0-9a-f]{16}): .* ASR (?P<asr>[0-9.]+); clean gap median (?P<gap>-?[0-9.]+) .*"
                  r"pull median (?P<pull>-?[0-9.]+) .*smallest first: (?P<quarters>[0-9. /]+)$")


def _diagnose(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          env=env, check=False)


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("margins")
    grid = {"name": "margins", "dataset": "digits", "model": {"name": "cnn-small", "width": 8},
            "training": {"epochs": 6, "batch_size": 64, "lr": 0.05},
            "attacks": ["none", {"name": "badnets", "patch_size": 2}, {"name": "sig", "delta": 60}],
            "poison_rates": [0.1], "defenses": ["none"], "seeds": [0]}
    rows = run_grid(grid, out=out, threads=1, progress=False)
    return out, {row["attack"]: row for row in rows.to_dict("records")}


def test_it_reproduces_each_victims_stored_asr_and_splits_it_by_clean_gap(grid_out):
    out, rows = grid_out
    result = _diagnose(out)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and sum("clean model, no trigger" in line for line in lines) == 1
    parsed = {m["key"]: m for m in map(LINE.match, lines) if m}
    assert len(parsed) == 2, result.stdout
    asrs = sorted(float(m["asr"]) for m in parsed.values())
    stored = sorted(rows[name]["asr"] for name in ("badnets", "sig"))
    assert all(abs(a - b) <= 5e-4 + 1e-9 for a, b in zip(asrs, stored)), (asrs, stored)
    for m in parsed.values():
        quarters = [float(q) for q in m["quarters"].split(" / ")]
        assert len(quarters) == 4 and min(quarters) <= float(m["asr"]) + 1e-3 and max(quarters) >= float(m["asr"]) - 1e-3
    badnets = next(m for m in parsed.values() if abs(float(m["asr"]) - rows["badnets"]["asr"]) <= 5e-4 + 1e-9)
    assert float(badnets["asr"]) > 0.8 and float(badnets["pull"]) > float(badnets["gap"])  # a backdoor that took hold


def test_a_stronger_test_signal_pulls_harder_on_the_same_victim(grid_out):
    out, _ = grid_out
    plain = LINE.match(next(line for line in _diagnose(out).stdout.splitlines() if "sig" in line))
    assert plain
    strong = _diagnose(out, "--victims", plain["key"], "--trigger-params", '{"delta_test": 120}')
    assert strong.returncode == 0, strong.stderr[-2000:]
    stronger = LINE.match(next(line for line in strong.stdout.splitlines() if "sig" in line))
    assert stronger and plain["key"] == stronger["key"] and plain["gap"] == stronger["gap"]
    assert '"delta_test": 120' in strong.stdout and float(stronger["pull"]) > float(plain["pull"])


def test_trigger_params_that_change_the_training_images_are_refused(grid_out):
    out, _ = grid_out
    sig = LINE.match(next(line for line in _diagnose(out).stdout.splitlines() if "sig" in line))
    assert sig
    result = _diagnose(out, "--victims", sig["key"], "--trigger-params", '{"delta": 90}')
    assert result.returncode != 0 and "changes the training images too" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_victim_is_a_one_line_error(grid_out):
    out, _ = grid_out
    result = _diagnose(out, "--victims", "0123456789abcdef")
    assert result.returncode != 0 and "no cached victim 0123456789abcdef" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
