"""End to end on a tiny grid: rows, cache reuse, scoring of every outcome kind, failures, resume."""

import copy
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bdbench import experiment, load_results, run_grid
from bdbench.attacks import ATTACKS, AttackWorkshop
from bdbench.data import load_dataset
from bdbench.defenses import DEFENSES, Defense, DefenseKind, DefenseOutcome
from bdbench.defenses.scoring import anomaly_index
from bdbench.errors import BdbenchError
from bdbench.executors.base import available_cpus
from bdbench.store import COLUMNS

REQUIRED = ["experiment_id", "dataset", "model", "attack", "poison_rate", "target_label", "defense", "precision",
            "seed", "status", "error", "clean_acc", "asr", "robust_acc", "der", "detected", "anomaly_index",
            "suspected_targets", "det_tpr", "det_fpr", "det_auroc", "det_threshold", "clean_budget", "wall_s", "defense_s",
            "peak_rss_mb"]


def _corner_is_white(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, -2:, -2:] == 255).flatten(1).all(1)


class CornerInspector(Defense):
    """Test-only data inspection: flags training images whose bottom-right 2x2 corner is white."""

    kind = DefenseKind.DATA_DETECTION

    def run(self, context):
        assert context.train_x is not None  # data inspection receives the training set...
        flagged = _corner_is_white(context.train_x)
        return DefenseOutcome(sample_scores=flagged.float(), flagged=flagged)


class CornerFilter(Defense):
    """Test-only run-time filter: rejects inputs whose bottom-right 2x2 corner is white."""

    kind = DefenseKind.INPUT_DETECTION

    def run(self, context):
        assert context.train_x is None  # ...and input detection does not.
        return DefenseOutcome(input_detector=lambda x: (_corner_is_white(x).float(), _corner_is_white(x)),
                              threshold=0.5)


class CoverInspector(Defense):
    """Test-only data inspection: flags the white-cornered training images that keep a label other than the target
    (0), which are a source-specific attack's cover samples and never its payload (relabelled to the target)."""

    kind = DefenseKind.DATA_DETECTION

    def run(self, context):
        flagged = _corner_is_white(context.train_x) & (context.train_y != 0)
        return DefenseOutcome(sample_scores=flagged.float(), flagged=flagged)


class Crash(Defense):
    """Test-only defense that always raises."""

    kind = DefenseKind.MODEL_REPAIR

    def run(self, context):
        raise RuntimeError("boom")


class SlowInspector(CornerInspector):
    """Test-only data inspection whose method takes 0.1 s."""

    def run(self, context):
        time.sleep(0.1)
        return super().run(context)


class SlowFilter(Defense):
    """Test-only run-time filter whose method takes 0.1 s and whose detector takes 0.5 s a call."""

    kind = DefenseKind.INPUT_DETECTION

    def run(self, context):
        time.sleep(0.1)

        def detector(x):
            time.sleep(0.5)
            return _corner_is_white(x).float(), _corner_is_white(x)

        return DefenseOutcome(input_detector=detector, threshold=0.5)


class BudgetedWrecker(Defense):
    """Test-only repair under an accuracy budget: each attempt scales every weight by `scale - 1` (at scale 1 a zero
    model, then a sign-flipped one); `gentle` attempts return the model as it is, which the budget keeps."""

    kind = DefenseKind.MODEL_REPAIR

    def __init__(self, gentle: bool = False) -> None:
        self.gentle = gentle

    def run(self, context):
        def attempt(scale):
            model = copy.deepcopy(context.model)
            if not self.gentle:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(scale - 1)
            return model

        repair = context.halve_until_within_budget("budgeted-wrecker", attempt, 0.1, 2)
        return DefenseOutcome(model=repair.model, repair_declined=repair.declined)


TEMPORARY = {"corner-inspector": CornerInspector, "cover-inspector": CoverInspector, "corner-filter": CornerFilter,
             "crash": Crash, "budgeted-wrecker": BudgetedWrecker,
             "slow-inspector": SlowInspector, "slow-filter": SlowFilter}


@pytest.fixture
def temporary_defenses():
    for name, cls in TEMPORARY.items():
        DEFENSES.register(name)(cls)
    yield
    for name in TEMPORARY:
        DEFENSES.unregister(name)


def test_tiny_grid_rows_cache_and_rerun(tmp_path, tiny_grid, effect):
    rows = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}
    assert set(REQUIRED) <= set(rows.columns)
    # What produced the numbers: the kernel set PyTorch chose on this CPU (AVX512, AVX2, ...).
    assert set(rows.cpu_kernels) == {torch.backends.cpu.get_cpu_capability()}
    badnets = rows[(rows.attack == "badnets") & (rows.defense == "none")].iloc[0]
    clean = rows[(rows.attack == "none") & (rows.defense == "none")].iloc[0]
    effect.check("BadNets ASR", badnets.asr, ">", 0.9)
    effect.check("BadNets clean accuracy", badnets.clean_acc, ">", 0.8)
    assert clean.asr is None or clean.asr != clean.asr  # no trigger on a clean model: null
    assert 10 < badnets.psnr < 60 and 0.5 < badnets.ssim < 1  # stealth of the triggered test set
    assert clean.psnr != clean.psnr and clean.ssim != clean.ssim  # null (NaN in pandas) without an attack
    per_class = torch.bincount(load_dataset("digits").y_train)
    assert badnets.clean_budget == sum(round(0.05 * int(n)) for n in per_class) == 70  # 5% of each class
    ft = rows[(rows.attack == "badnets") & (rows.defense == "ft")].iloc[0]
    assert ft.victim_cached and ft.clean_acc_before == badnets.clean_acc and ft.asr_before == badnets.asr
    assert 0 <= ft.der <= 1 and ft.defense_s > 0 and ft.peak_rss_mb > 0
    assert sorted((tmp_path / "cache" / "victims").glob("*.safetensors")).__len__() == 2

    # A second run finds every row stored and trains nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "victims").iterdir()}
    again = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert again.experiment_id.tolist() == rows.experiment_id.tolist()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "victims").iterdir()} == mtimes

    # A new defense on the same grid reuses both cached victims.
    tiny_grid["defenses"].append({"name": "ft", "epochs": 1})
    more = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert len(more) == 6
    new = more[~more.experiment_id.isin(rows.experiment_id)]
    assert len(new) == 2 and new.victim_cached.all()
    assert len(load_results(tmp_path)) == 6


def test_a_default_or_revision_changed_in_the_code_runs_its_rows_and_victims_again(tmp_path, tiny_grid, monkeypatch, caplog):
    """Experiment ids hash the parameters as the grid writes them, so a default changed in the code since a
    row was made keeps the id: the row's recorded settings tell the resumed grid to run it again."""
    from bdbench.attacks import ATTACKS

    tiny_grid["defenses"] = ["none", "ft"]  # FT at its defaults
    first = run_grid(tiny_grid, out=tmp_path, progress=False)
    ft_default = DEFENSES.defaults("ft")["epochs"]
    assert {s["defense"]["epochs"] for s in first[first.defense == "ft"].settings} == {ft_default}
    assert {s["attack"]["margin"] for s in first[first.attack == "badnets"].settings} == {0}
    victims = tmp_path / "cache" / "victims"
    info = {p.name: json.loads(p.read_text()) for p in victims.glob("*.json")}
    assert all(i["settings"]["attack"] for i in info.values() if i["spec"]["attack"]["name"] == "badnets")

    class LongerFT(DEFENSES.get("ft")):  # the code's FT default changes
        def __init__(self, epochs: int = ft_default + 1, lr: float = 0.01, batch_size: int = 32) -> None:
            super().__init__(epochs, lr, batch_size)

    monkeypatch.setitem(DEFENSES._entries, "ft", dataclasses.replace(DEFENSES.entry("ft"), obj=LongerFT))
    mtimes = {p: p.stat().st_mtime_ns for p in victims.iterdir()}
    caplog.set_level("INFO", logger="bdbench")
    second = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert second.experiment_id.tolist() == first.experiment_id.tolist()
    assert "4 experiments, 2 stored, 2 to run" in caplog.text  # the two FT rows only
    assert caplog.text.count(f"(defense.epochs {ft_default} -> {ft_default + 1}): running it again") == 2
    assert {s["defense"]["epochs"] for s in second[second.defense == "ft"].settings} == {ft_default + 1}
    assert {p: p.stat().st_mtime_ns for p in victims.iterdir()} == mtimes  # the victims' settings hold

    badnets_class = ATTACKS.get("badnets")

    class MarginBadNets(badnets_class):  # the code's BadNets default margin changes: its victim is stale too
        def __init__(self, patch_size: int = 3, margin: int = 1) -> None:
            super().__init__(patch_size=patch_size, margin=margin)

    monkeypatch.setitem(ATTACKS._entries, "badnets", dataclasses.replace(ATTACKS.entry("badnets"), obj=MarginBadNets))
    caplog.clear()
    third = run_grid(tiny_grid, out=tmp_path, progress=False)
    badnets = third.attack == "badnets"
    assert "4 experiments, 2 stored, 2 to run" in caplog.text  # the two BadNets rows only
    assert caplog.text.count("(attack.margin 0 -> 1): running it again") == 2
    assert "was trained with other defaults than the code's now (attack.margin 0 -> 1); retraining it" in caplog.text
    assert third[badnets].victim_cached.tolist() == [False, True]  # retrained once, then reused
    assert {s["attack"]["margin"] for s in third[badnets].settings} == {1}
    caplog.clear()  # a fourth run finds everything current
    run_grid(tiny_grid, out=tmp_path, progress=False)
    assert "4 experiments, 4 stored, 0 to run" in caplog.text

    class RevisedFT(LongerFT):  # FT's code changes what it computes, its parameters do not
        revision = 2

    monkeypatch.setitem(DEFENSES._entries, "ft", dataclasses.replace(DEFENSES.entry("ft"), obj=RevisedFT))
    mtimes = {p: p.stat().st_mtime_ns for p in victims.iterdir()}
    caplog.clear()
    fifth = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert "4 experiments, 2 stored, 2 to run" in caplog.text  # the two FT rows only
    assert caplog.text.count("(defense revision 1 -> 2): running it again") == 2
    assert {s["defense"]["(revision)"] for s in fifth[fifth.defense == "ft"].settings} == {2}
    assert {p: p.stat().st_mtime_ns for p in victims.iterdir()} == mtimes  # a defense's revision keeps the victims


def test_same_spec_same_seed_same_numbers(tmp_path, tiny_grid):
    first = run_grid(tiny_grid, out=tmp_path / "a", progress=False)
    second = run_grid(tiny_grid, out=tmp_path / "b", progress=False)
    columns = ["experiment_id", "clean_acc", "asr", "robust_acc", "der", "clean_budget"]
    assert first[columns].equals(second[columns])
    tiny_grid["seeds"] = [1]
    other = run_grid(tiny_grid, out=tmp_path / "c", progress=False)
    assert not other[["clean_acc", "asr"]].equals(first[["clean_acc", "asr"]])


def test_every_outcome_kind_is_scored_by_the_runner(tmp_path, tiny_grid, temporary_defenses, effect):
    tiny_grid["defenses"] = ["corner-inspector", "corner-filter", "crash"]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index(["attack", "defense"])
    inspected = rows.loc[("badnets", "corner-inspector")]
    assert inspected.status == "ok"
    assert inspected.det_tpr == 1.0 and inspected.det_fpr < 0.05 and inspected.det_auroc > 0.95
    effect.check("ASR before", inspected.asr_before, ">", 0.9)
    effect.check("ASR after retraining on the kept samples", inspected.asr, "<", 0.2)
    effect.check("DER", inspected.der, ">", 0.85)
    benign = rows.loc[("none", "corner-inspector")]
    assert benign.det_tpr != benign.det_tpr and benign.det_fpr < 0.05  # TPR null: nothing was poisoned
    filtered = rows.loc[("badnets", "corner-filter")]
    assert filtered.det_tpr == 1.0 and filtered.det_fpr < 0.05 and filtered.det_auroc > 0.95
    assert filtered.asr == filtered.asr_before  # a filter does not change the model
    assert filtered.det_threshold == 0.5 and inspected.det_threshold != inspected.det_threshold  # null
    crashed = rows.loc[("badnets", "crash")]
    assert crashed.status == "error" and crashed.error == "RuntimeError: boom"
    assert crashed.clean_acc != crashed.clean_acc  # no numbers: an error is never "not detected"
    log = tmp_path / "logs" / f"{crashed.experiment_id}.log"
    assert "RuntimeError: boom" in log.read_text()


def test_a_repair_that_breaks_its_accuracy_budget_is_declined_and_says_so(tmp_path, tiny_grid, temporary_defenses):
    tiny_grid["defenses"] = ["budgeted-wrecker", {"name": "budgeted-wrecker", "gentle": True}]
    tiny_grid["attacks"] = ["badnets"]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index("defense_variant")
    declined, kept = rows.loc["budgeted-wrecker"], rows.loc["budgeted-wrecker(gentle=True)"]
    assert declined.status == "ok" and declined.repair_declined is True
    assert declined.clean_acc == declined.clean_acc_before and declined.asr == declined.asr_before
    assert kept.repair_declined is False


def test_payload_rates_leave_out_the_cover_samples_a_cleanser_flags(tmp_path, tiny_grid, temporary_defenses):
    """TaCT's cover samples carry its white corner under their true label: flagging them raises det_tpr but is no
    detected backdoor (det_payload_tpr, Qi et al.'s elimination rate), and they count as sacrificed clean samples
    (det_payload_fpr, the sacrifice rate). Without cover samples (BadNets) and for an input detector the two agree."""
    tiny_grid["attacks"] = [{"name": "badnets", "patch_size": 2}, "source_specific"]
    tiny_grid["defenses"] = ["cover-inspector", "corner-inspector", "corner-filter"]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index(["attack", "defense"])
    assert set(rows.status) == {"ok"}
    covers = rows.loc[("source_specific", "cover-inspector")]
    assert covers.det_payload_tpr == 0.0 and covers.det_tpr == pytest.approx(0.5)  # cover_ratio 1: half are covers
    assert covers.det_fpr < 0.05 and covers.det_payload_fpr > covers.det_fpr + 0.05
    assert covers.det_auroc > 0.7 and covers.det_payload_auroc < 0.5
    every = rows.loc[("source_specific", "corner-inspector")]
    assert every.det_tpr == every.det_payload_tpr == 1.0 and every.det_payload_fpr > every.det_fpr
    for defense in ("cover-inspector", "corner-inspector", "corner-filter"):
        plain = rows.loc[("badnets", defense)]
        for rate in ("tpr", "fpr", "auroc"):
            assert plain[f"det_payload_{rate}"] == plain[f"det_{rate}"], (defense, rate)
    screen = rows.loc[("source_specific", "corner-filter")]
    assert screen.det_tpr == screen.det_payload_tpr == 1.0 and screen.det_payload_fpr == screen.det_fpr < 0.05


def test_scoring_a_cleanser_that_flags_exactly_the_adaptive_attacks_cover_samples(digits):
    attack = ATTACKS.build("adaptive_blend", {})
    attack.prepare(digits, 0, AttackWorkshop(seed=0))
    poisoned = attack.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    assert poisoned.cover_mask is not None
    flagged = poisoned.cover_mask.clone()
    row = experiment._score_outcome(DefenseOutcome(sample_scores=flagged.float(), flagged=flagged), poisoned, flagged,
                                    None)
    n, payload = len(flagged), int(poisoned.payload_mask.sum())
    assert row["det_payload_tpr"] == 0.0 and row["det_tpr"] == pytest.approx(0.5)  # cover_ratio 1
    assert row["det_fpr"] == 0.0 and row["det_payload_fpr"] == pytest.approx(payload / (n - payload))
    plain = ATTACKS.build("badnets", {"patch_size": 2})
    plain.prepare(digits, 0, AttackWorkshop(seed=0))
    badnets = plain.poison(digits, 0.1, 0, torch.Generator().manual_seed(0))
    flagged = badnets.poison_mask.clone()
    flagged[:50] = True  # some clean samples too
    row = experiment._score_outcome(DefenseOutcome(sample_scores=flagged.float(), flagged=flagged), badnets, flagged,
                                    None)
    assert 0 < row["det_fpr"] < 0.1 and row["det_tpr"] == 1.0
    assert [row[f"det_payload_{r}"] for r in ("tpr", "fpr", "auroc")] == [row[f"det_{r}"] for r in ("tpr", "fpr", "auroc")]


def test_defense_time_is_the_method_plus_the_retraining_plus_the_screening_of_inputs(tmp_path, tiny_grid,
                                                                                     temporary_defenses, monkeypatch):
    def slow_retraining(spec, dataset, poisoned, flagged, device):
        time.sleep(1.0)
        return experiment.new_model(spec, dataset, "retrain_init")

    monkeypatch.setattr(experiment, "retrain_on_kept", slow_retraining)
    tiny_grid["attacks"] = [{"name": "badnets", "patch_size": 2}]
    tiny_grid["defenses"] = ["slow-inspector", "slow-filter", "none"]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False).set_index("defense")
    inspector, screen, none = rows.loc["slow-inspector"], rows.loc["slow-filter"], rows.loc["none"]
    # Each part in its own column: the method's 0.1 s holds neither the retraining nor the screening.
    assert 0.1 <= inspector.defense_method_s < 1.0 and inspector.defense_retrain_s >= 1.0
    assert 0.1 <= screen.defense_method_s < 1.0 and screen.defense_scoring_s >= 1.0  # clean and triggered images
    assert pd.isna(inspector.defense_scoring_s) and pd.isna(screen.defense_retrain_s)
    assert pd.isna(none.defense_retrain_s) and pd.isna(none.defense_scoring_s)
    for row in (inspector, screen, none):
        parts = [row.defense_method_s, row.defense_retrain_s, row.defense_scoring_s]
        assert row.defense_s == pytest.approx(sum(part for part in parts if not pd.isna(part)), abs=0.002)
    # CPU seconds: sleeping costs none, so the slow parts' CPU time stays well below their wall time.
    assert inspector.defense_cpu_s < inspector.defense_s - 0.9 and screen.defense_cpu_s < screen.defense_s - 0.9
    assert rows.defense_cpu_s.notna().all() and (rows.defense_cpu_s >= 0).all()
    # One victim, trained by the first row to need it. Its CPU seconds cover all the process's threads, so they are
    # bounded by the wall seconds times the cores this process may use (plus the columns' rounding to 1 ms and the
    # two clocks being read a moment apart), not by a fixed 2: CI may have more cores than this machine.
    trained = rows[rows.victim_train_s.notna()]
    assert len(trained) == 1
    assert 0 < trained.victim_train_cpu_s.iloc[0] <= available_cpus() * trained.victim_train_s.iloc[0] + 0.01


def test_error_rows_are_kept_then_retried_on_request(tmp_path, tiny_grid, temporary_defenses):
    tiny_grid["defenses"] = ["crash"]
    tiny_grid["attacks"] = ["none"]
    first = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert first.status.tolist() == ["error"]
    stamp = first.finished_at[0]
    time.sleep(1.1)
    assert run_grid(tiny_grid, out=tmp_path, progress=False).finished_at[0] == stamp
    assert run_grid(tiny_grid, out=tmp_path, progress=False, retry_errors=True).finished_at[0] != stamp


def test_corrupt_cached_victim_is_retrained(tmp_path, tiny_grid, caplog):
    tiny_grid["attacks"] = ["none"]
    tiny_grid["defenses"] = ["none"]
    run_grid(tiny_grid, out=tmp_path, progress=False)
    (weights,) = (tmp_path / "cache" / "victims").glob("*.safetensors")
    weights.write_bytes(b"\x00garbage")
    tiny_grid["defenses"] = [{"name": "ft", "epochs": 1}]
    rows = run_grid(tiny_grid, out=tmp_path, progress=False)
    assert rows.status.tolist() == ["ok"] and rows.victim_cached.tolist() == [False]
    assert "unreadable or mismatched model file" in caplog.text


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, tiny_grid):
    from bdbench.runner import exclusive

    with exclusive(tmp_path), pytest.raises(BdbenchError, match=f"in use by a running bdbench \\(pid {os.getpid()}\\)"):
        run_grid(tiny_grid, out=tmp_path, progress=False)


def test_a_store_from_before_the_payload_columns_loads_and_gains_them(tmp_path):
    """Rows stored before the det_payload_* columns existed read back with those columns null; the report then scores
    them on det_tpr; the next write adds the columns and keeps the row."""
    from bdbench.report.stats import payload_rate

    earlier = [name for name in COLUMNS if not name.startswith("det_payload_")]
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.execute(f"CREATE TABLE experiments ({', '.join(f'{c} {COLUMNS[c]}' for c in earlier)})")
    db.execute("INSERT INTO experiments (experiment_id, attack, defense, status, det_tpr, det_fpr) "
               "VALUES ('old', 'adaptive_blend', 'ac', 'ok', 0.8, 0.1)")
    db.commit()
    db.close()
    rows = load_results(tmp_path)
    assert rows.det_payload_tpr.isna().all() and rows.det_tpr.tolist() == [0.8]
    assert payload_rate(rows, "det_tpr").tolist() == [0.8] and payload_rate(rows, "det_fpr").tolist() == [0.1]
    from bdbench.store import ResultStore

    store = ResultStore(tmp_path / "results.sqlite")
    store.write({"experiment_id": "new", "status": "ok", "det_tpr": 0.8, "det_payload_tpr": 0.6})
    store.close()
    rows = load_results(tmp_path).set_index("experiment_id")
    assert rows.loc["old", "det_tpr"] == 0.8 and pd.isna(rows.loc["old", "det_payload_tpr"])
    assert rows.loc["new", "det_payload_tpr"] == 0.6


def test_store_adds_new_columns_to_an_older_database(tmp_path):
    path = tmp_path / "results.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE experiments (experiment_id TEXT PRIMARY KEY, status TEXT)")
    db.execute("INSERT INTO experiments VALUES ('abc', 'ok')")
    db.commit()
    db.close()
    rows = load_results(tmp_path)
    assert set(COLUMNS) <= set(rows.columns) and rows.experiment_id.tolist() == ["abc"]


def _wait_for_rows(db: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] >= count:
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {count} rows within {timeout}s")


def kill_mid_grid_then_resume(tmp_path: Path, grid: dict, *options: str, at_kill=lambda proc: None):
    """`bdbench run` a grid of 8 experiments, kill -9 it once 2 rows are stored, run it again, and
    check that nothing was lost, duplicated or run twice. Returns what `at_kill(proc)` returned."""
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bdbench", "run", str(config), "--out", str(out), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(out / "results.sqlite", 2, proc, timeout=300)
        seen = at_kill(proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = load_results(out)
    assert 2 <= len(partial) < 8
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = load_results(out)
    assert len(rows) == 8 and rows.experiment_id.is_unique and set(rows.status) == {"ok"}
    # Rows finished before the kill were kept as they were, not run again.
    kept = rows.set_index("experiment_id").loc[partial.experiment_id]
    assert kept.finished_at.tolist() == partial.finished_at.tolist()
    assert f"{8 - len(partial)}/{8 - len(partial)}]" in done.stderr
    return seen


def test_kill_minus_nine_mid_grid_then_resume(tmp_path, tiny_grid):
    tiny_grid["seeds"] = [0, 1]
    tiny_grid["training"]["epochs"] = 30  # slow enough (about 1 s per victim) to be killed mid-grid
    kill_mid_grid_then_resume(tmp_path, tiny_grid)  # asserts: no lost, duplicate or re-run row


def test_cli_results_json_and_one_line_errors(tmp_path, tiny_grid):
    config = tmp_path / "grid.yaml"
    tiny_grid["attacks"] = ["none"]
    tiny_grid["defenses"] = ["none"]
    config.write_text(yaml.safe_dump(tiny_grid))
    out = tmp_path / "out"
    bdbench = [sys.executable, "-m", "bdbench"]
    ran = subprocess.run([*bdbench, "run", str(config), "--out", str(out)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1].startswith("1 experiment: 1 ok; rows in ")
    listed = json.loads(subprocess.run([*bdbench, "results", "--out", str(out), "--format", "json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert len(listed) == 1 and set(REQUIRED) <= set(listed[0]) and listed[0]["status"] == "ok"
    csv = subprocess.run([*bdbench, "results", "--out", str(out), "--format", "csv"],
                         capture_output=True, text=True, check=True).stdout
    assert csv.splitlines()[0].startswith("experiment_id,") and len(csv.splitlines()) == 2

    for args, message in [
        (["run", str(config), "--out", str(out), "--set", "attacks=[badnetz]"], "error: unknown attack 'badnetz'"),
        (["run", "nosuchgrid"], "error: no config file or built-in grid named 'nosuchgrid'"),
        (["run", str(config), "--out", str(out), "--set", "dataset={name: npz, path: /nope.npz}"],
         "error: /nope.npz: no such file"),
        (["results", "--out", str(tmp_path / "empty")], "error: " + str(tmp_path / "empty" / "results.sqlite")),
    ]:
        bad = subprocess.run([*bdbench, *args], capture_output=True, text=True)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith(message), bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert len(load_results(out)) == 1  # nothing finished was lost


def test_cli_list_json_has_name_and_description():
    for what in ("configs", "datasets", "models", "attacks", "defenses", "precisions"):
        listed = json.loads(subprocess.run([sys.executable, "-m", "bdbench", "list", what, "--format", "json"],
                                           capture_output=True, text=True, check=True).stdout)
        assert listed and all(item["name"] and item["description"] for item in listed), what
    attacks = json.loads(subprocess.run([sys.executable, "-m", "bdbench", "list", "attacks", "--format", "json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert {a["name"] for a in attacks} >= {
        "none", "badnets", "blended", "sig", "wanet", "lf", "ssba", "inputaware", "bpp", "lc", "trojannn",
        "advdoor", "narcissus", "source_specific", "lsp", "dfb"}
    assert all(a["citation"] for a in attacks if a["name"] != "none")
    assert all("Gu" in a["citation"] for a in attacks if a["name"] == "badnets")


def test_two_badnets_variants_and_two_strip_settings_stay_four_rows(tmp_path, tiny_grid):
    """Issue 27: parameters were shown nowhere, so these four cells were pooled as badnets x strip."""
    from click.testing import CliRunner

    from bdbench.cli import main
    from bdbench.report import report_from_out

    tiny_grid.update(training={"epochs": 1, "batch_size": 64, "lr": 0.05}, target_label=3,
                     attacks=[{"name": "badnets", "patch_size": 2}, {"name": "badnets", "patch_size": 3}],
                     defenses=[{"name": "strip", "overlays": 10}, "strip"])
    rows = run_grid(tiny_grid, out=tmp_path, progress=False, threads=1)
    assert set(rows.status) == {"ok"}
    pairs = list(zip(rows.attack_variant, rows.defense_variant))
    assert pairs == [("badnets(patch_size=2)", "strip(overlays=10)"), ("badnets(patch_size=2)", "strip"),
                     ("badnets", "strip(overlays=10)"), ("badnets", "strip")]
    table = CliRunner().invoke(main, ["results", "--out", str(tmp_path)])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert "target_label" in lines[0] and len(lines) == 5
    assert sum("badnets(patch_size=2)" in line and "strip(overlays=10)" in line for line in lines) == 1
    html = report_from_out(tmp_path).read_text()
    leaderboard = html[html.index('id="leaderboard"'):html.index('id="heatmaps"')]
    assert "Not ranked by DER: strip, strip(overlays=10)." in leaderboard  # filters change no model
    detection = html[html.index('id="detection"'):html.index('id="precision"')]
    for attack, defense in pairs:
        assert f"<td>{defense}</td><td>{attack}</td>" in detection
    assert "target label: 3" in html


def test_run_exits_non_zero_when_an_experiment_errored_and_keeps_its_rows(tmp_path, tiny_grid):
    """Issue 27: a grid whose every experiment errored exited 0. (Its cases, target label 99 and a patch larger
    than the image, are now refused before any work: tests/test_preflight.py. An unknown surrogate model
    fails inside the experiment, where the attack learns its trigger.)"""
    failing = {"name": "trojannn", "surrogate": {"model": "no-such-model"}}
    tiny_grid.update(training={"epochs": 1}, attacks=["none", failing], defenses=["none"])
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid))
    out = tmp_path / "out"
    ran = subprocess.run([sys.executable, "-m", "bdbench", "run", str(config), "--out", str(out), "--threads", "1"],
                         capture_output=True, text=True)
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout.strip().splitlines()[-1].startswith("2 experiments: 1 error, 1 ok;")
    assert "1 experiment ended in error" in ran.stdout.strip().splitlines()[-1]
    assert "Traceback" not in ran.stderr
    assert sorted(load_results(out).status) == ["error", "ok"]  # both rows kept

    tiny_grid.update(attacks=[failing])
    config.write_text(yaml.safe_dump(tiny_grid))
    every = subprocess.run([sys.executable, "-m", "bdbench", "run", str(config), "--out", str(tmp_path / "all"),
                            "--threads", "1"], capture_output=True, text=True)
    assert every.returncode == 3, every.stderr
    assert every.stdout.strip().splitlines()[-1].startswith("1 experiment: 1 error;")
    assert load_results(tmp_path / "all").error.str.contains("unknown model 'no-such-model'").all()


def test_rows_name_the_data_set_and_keep_its_loader_beside_it(tmp_path, tiny_grid):
    """Issue 19: a grid on {name: npz, path: .../cifar10.npz} stored `dataset = npz`, and the report said
    "data set: npz". The row names the file's stem, or the spec's `label`, with the loader in `dataset_loader`."""
    import numpy as np

    from bdbench.report import report_from_out

    digits = load_dataset("digits")
    np.savez(tmp_path / "tiny-digits.npz", x_train=digits.x_train.permute(0, 2, 3, 1).numpy(),
             y_train=digits.y_train.numpy(), x_test=digits.x_test.permute(0, 2, 3, 1).numpy(),
             y_test=digits.y_test.numpy())
    tiny_grid.update(training={"epochs": 1}, attacks=["none"], defenses=["none"],
                     dataset={"name": "npz", "path": str(tmp_path / "tiny-digits.npz")})
    rows = run_grid(tiny_grid, out=tmp_path / "out", progress=False, threads=1)
    assert rows[["dataset", "dataset_loader", "status"]].values.tolist() == [["tiny-digits", "npz", "ok"]]
    assert "data set: tiny-digits" in report_from_out(tmp_path / "out").read_text()

    tiny_grid["dataset"]["label"] = "my-digits"
    labelled = run_grid(tiny_grid, out=tmp_path / "labelled", progress=False, threads=1)
    assert labelled[["dataset", "dataset_loader"]].values.tolist() == [["my-digits", "npz"]]
    assert labelled.experiment_id.tolist() == rows.experiment_id.tolist()  # a label is a name, not a new cell
    assert labelled.victim_key.tolist() == rows.victim_key.tolist()

    tiny_grid["dataset"] = "digits"  # built-in names stay as they are
    builtin = run_grid(tiny_grid, out=tmp_path / "builtin", progress=False, threads=1)
    assert builtin[["dataset", "dataset_loader"]].values.tolist() == [["digits", "digits"]]


def test_an_older_database_without_dataset_loader_still_loads(tmp_path):
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.execute("CREATE TABLE experiments (experiment_id TEXT PRIMARY KEY, dataset TEXT, attack TEXT, "
               "attack_params TEXT, defense TEXT, defense_params TEXT, status TEXT)")
    db.execute("INSERT INTO experiments VALUES ('old', 'npz', 'badnets', '{\"patch_size\": 4}', 'none', '{}', 'ok')")
    db.commit()
    db.close()
    rows = load_results(tmp_path)
    assert rows[["dataset", "dataset_loader", "attack_variant"]].values.tolist() == [
        ["npz", "npz", "badnets(patch_size=4)"]]
    assert "dataset_loader" not in {r[1] for r in sqlite3.connect(tmp_path / "results.sqlite").execute(
        "PRAGMA table_info(experiments)")}  # read, not altered: a reader never writes


def test_a_clean_model_trained_for_one_target_label_serves_another(tmp_path, tiny_grid):
    tiny_grid["attacks"] = ["none"]
    tiny_grid["defenses"] = ["none"]
    run_grid(tiny_grid, out=tmp_path / "a", progress=False)
    tiny_grid["target_label"] = 3
    # Trained afresh in a new folder, the clean model for target 3 is byte-identical to target 0's...
    run_grid(tiny_grid, out=tmp_path / "b", progress=False)
    (a,) = (tmp_path / "a" / "cache" / "victims").glob("*.safetensors")
    (b,) = (tmp_path / "b" / "cache" / "victims").glob("*.safetensors")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    # ...so in the first folder the target-3 grid finds it cached instead of training it again.
    rows = run_grid(tiny_grid, out=tmp_path / "a", progress=False)
    assert rows.target_label.tolist() == [3] and rows.victim_cached.tolist() == [True]


def test_results_as_csv_and_parquet_read_back_to_the_stored_values(tmp_path, tiny_grid):
    import pandas as pd
    from click.testing import CliRunner

    from bdbench.cli import main
    from bdbench.schema import BOOL_COLUMNS, JSON_COLUMNS
    from bdbench.store import read_exported

    tiny_grid["defenses"] = ["none", {"name": "nc", "epochs": 2}]  # suspected_targets, booleans, params
    run_grid(tiny_grid, out=tmp_path / "out", progress=False)
    stored = load_results(tmp_path / "out")
    assert stored.defense_params.map(lambda v: isinstance(v, dict)).all()
    # NC's per-class norms are stored, and its anomaly index is recomputed from them (labels below the median).
    nc_rows = stored[stored.defense == "nc"]
    assert len(nc_rows) > 0
    for nc_row in nc_rows.itertuples():
        norms = torch.tensor(nc_row.class_statistics, dtype=torch.float64)
        assert len(norms) == 10
        below = norms < float(np.median(norms.numpy()))
        assert nc_row.anomaly_index == pytest.approx(float(anomaly_index(norms).abs()[below].max()))
    for fmt in ("csv", "parquet"):
        path = tmp_path / f"rows.{fmt}"
        result = CliRunner().invoke(main, ["results", "--out", str(tmp_path / "out"), "--format", fmt,
                                           "-o", str(path)])
        assert result.exit_code == 0, result.output
        raw = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
        # Structured columns are JSON text in the file, not Python reprs.
        assert all(json.loads(v) == p for v, p in zip(raw.defense_params, stored.defense_params))
        back = read_exported(path)
        assert list(back.columns) == list(stored.columns)
        for column in stored.columns:
            if column in JSON_COLUMNS or column in BOOL_COLUMNS or stored[column].dtype == object:
                # A missing number reads back as NaN where SQLite gave None (the pandas convention for files).
                def missing_as_none(values: list) -> list:
                    return [None if not isinstance(v, (str, list, dict)) and pd.isna(v) else v for v in values]

                assert missing_as_none(back[column].tolist()) == missing_as_none(stored[column].tolist()), (fmt, column)
            else:
                pd.testing.assert_series_equal(back[column], stored[column], check_dtype=fmt == "parquet",
                                               check_exact=True, obj=f"{fmt} {column}")
    result = CliRunner().invoke(main, ["results", "--out", str(tmp_path / "out"), "--format", "parquet"])
    assert result.exit_code == 2 and "-o results.parquet" in result.output
