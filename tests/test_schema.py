"""The one result schema: every column list derives from `bdbench.schema.ResultRow`, a misspelled column fails
where the row is made (and for mypy, before anything runs), and no column of an earlier version is renamed."""

import importlib.util
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bdbench import schema
from bdbench.schema import ResultRow
from bdbench.store import COLUMNS, ResultStore

README = Path(__file__).resolve().parents[1] / "README.md"

# Every column as version 0.1.0 stored it (name and SQLite type). Names and meanings never change: stored
# databases must read back. New columns may be added after these.
COLUMNS_0_1_0 = {
    "experiment_id": "TEXT PRIMARY KEY", "dataset": "TEXT", "dataset_loader": "TEXT", "model": "TEXT",
    "attack": "TEXT", "attack_params": "TEXT", "attack_variant": "TEXT", "poison_rate": "REAL",
    "target_label": "INTEGER", "defense": "TEXT", "defense_params": "TEXT", "defense_variant": "TEXT",
    "defense_kind": "TEXT", "precision": "TEXT", "precision_order": "TEXT", "quantized_layers": "TEXT",
    "proxy": "TEXT", "seed": "INTEGER", "status": "TEXT", "error": "TEXT", "clean_acc": "REAL", "asr": "REAL",
    "robust_acc": "REAL", "der": "REAL", "clean_acc_before": "REAL", "asr_before": "REAL",
    "robust_acc_before": "REAL", "psnr": "REAL", "ssim": "REAL", "detected": "INTEGER", "anomaly_index": "REAL",
    "suspected_targets": "TEXT", "det_tpr": "REAL", "det_fpr": "REAL", "det_auroc": "REAL",
    "det_threshold": "REAL", "clean_budget": "INTEGER", "victim_cached": "INTEGER", "victim_train_s": "REAL",
    "victim_train_cpu_s": "REAL",
    "wall_s": "REAL", "defense_s": "REAL", "defense_method_s": "REAL", "defense_retrain_s": "REAL",
    "defense_scoring_s": "REAL", "defense_cpu_s": "REAL", "peak_rss_mb": "REAL", "device": "TEXT", "torch_threads": "INTEGER",
    "train_dtype": "TEXT", "cpu_kernels": "TEXT", "victim_key": "TEXT", "spec": "TEXT", "finished_at": "TEXT",
}


def test_the_database_columns_derive_from_the_schema_and_keep_every_earlier_column():
    assert schema.sql_columns() == COLUMNS
    assert list(COLUMNS)[:len(COLUMNS_0_1_0)] == list(COLUMNS_0_1_0)
    assert {name: COLUMNS[name] for name in COLUMNS_0_1_0} == COLUMNS_0_1_0
    assert schema.BOOL_COLUMNS == ("detected", "victim_cached", "repair_declined")
    assert schema.JSON_COLUMNS == ("attack_params", "defense_params", "suspected_targets", "server_defense_params",
                                   "round_metrics", "settings", "class_statistics")


def test_cli_and_report_columns_come_from_the_schema():
    from bdbench import cli
    from bdbench.report import page

    assert cli.TABLE_COLUMNS is schema.TABLE_COLUMNS
    assert set(page.EXPERIMENT_COLUMNS) == set(schema.REPORT_COLUMNS)
    assert set(schema.TABLE_COLUMNS) <= set(schema.COLUMN_NAMES)


def test_the_readme_column_table_is_the_schema():
    text = README.read_text()
    table = schema.markdown_table()
    assert table in text, "README's result columns table differs from bdbench.schema.markdown_table(); paste it in"
    documented = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
    assert documented == list(schema.COLUMN_NAMES)


def test_a_misspelled_column_fails_where_the_row_is_made():
    with pytest.raises(TypeError, match="clean_ac"):
        ResultRow(experiment_id="e", clean_ac=0.5)  # type: ignore[call-arg]
    row = ResultRow(experiment_id="e")
    with pytest.raises(AttributeError):
        row.clean_ac = 0.5  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="unknown result column 'clean_ac'"):
        row.update(clean_acc=0.5, clean_ac=0.5)
    assert row.clean_acc is None  # nothing was set by the refused update
    assert row.as_dict()["experiment_id"] == "e" and list(row.as_dict()) == list(schema.COLUMN_NAMES)


def test_the_store_refuses_an_unknown_column_before_writing(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    with pytest.raises(TypeError, match="unknown result column 'clean_ac'"):
        store.write({"experiment_id": "e", "clean_ac": 0.5})
    store.write(ResultRow(experiment_id="e", detected=True, attack_params={"alpha": 0.2}, clean_acc=0.5))
    store.close()
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT detected, attack_params, clean_acc FROM experiments").fetchall() == [
            (1, '{"alpha": 0.2}', 0.5)]


def test_experiment_rows_are_built_through_the_schema(tiny_grid):
    from bdbench.experiment import base_row
    from bdbench.grid import GridSpec, expand

    spec = expand(GridSpec.model_validate(tiny_grid))[0]
    row = base_row(spec)
    assert isinstance(row, ResultRow) and row.experiment_id == spec.experiment_id and row.status is None


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (the dev extra)")
def test_mypy_finds_a_misspelled_column_before_anything_runs(tmp_path):
    snippet = tmp_path / "typo.py"
    snippet.write_text("from bdbench.schema import ResultRow\n"
                       "row = ResultRow(experiment_id='e', clean_ac=0.5)\n"
                       "row.detetced = True\n")
    src = Path(schema.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file", "/dev/null",
                             "--follow-imports", "silent", str(snippet)],
                            capture_output=True, text=True, env={"MYPYPATH": str(src), "PATH": ""}, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Unexpected keyword argument "clean_ac"' in result.stdout
    assert '"ResultRow" has no attribute "detetced"' in result.stdout
