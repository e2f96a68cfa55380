"""Storage faults of an output folder: each is one line naming the path and the fix, a non-zero exit, and no
stored row lost. CI runs as root, which ignores permission bits, so permission faults are injected where the
operating system would raise them (opening `.lock`, creating the folder, writing the database or the page)."""

from __future__ import annotations

import builtins
import copy
import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY_GRID

from bdbench.cli import main
from bdbench.store import ResultStore, load_results


def _stored(out: Path, count: int = 3, spec_chars: int = 10) -> Path:
    """An output folder whose database holds `count` finished rows."""
    store = ResultStore(out / "results.sqlite")
    for i in range(count):
        store.write({"experiment_id": f"e{i:03d}", "dataset": "digits", "model": "cnn-small", "attack": "none",
                     "defense": "none", "precision": "fp32", "seed": i, "status": "ok", "clean_acc": 0.9,
                     "spec": "x" * spec_chars})
    store.close()
    return out / "results.sqlite"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(tmp_path) -> Path:
    grid = copy.deepcopy(TINY_GRID)
    grid.update(training={"epochs": 1}, attacks=["none"], defenses=["none"])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_corrupted_page_is_one_line_for_results_report_and_run(tmp_path, config):
    database = _stored(tmp_path / "out", count=60, spec_chars=2000)
    with open(database, "r+b") as handle:  # one b-tree page in the middle of the file overwritten
        handle.seek(4 * 4096)
        handle.write(b"\xa5" * 4096)
    before = _digest(database)
    runner = CliRunner()
    for args in (["results", "--out", str(tmp_path / "out")], ["report", "--out", str(tmp_path / "out")],
                 ["run", str(config), "--out", str(tmp_path / "out"), "--threads", "1"]):
        line = _one_line_error(runner.invoke(main, args), str(database), "damaged", ".dump")
        assert "malformed" in line
    assert _digest(database) == before  # nothing rewritten, nothing lost
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command line tool is not installed, so the fix the line gives is not tried")
    fix = line.split("`")[1]
    subprocess.run(fix, shell=True, check=True, capture_output=True)
    rows = load_results(tmp_path / "out")
    assert 50 <= len(rows) < 60 and rows.experiment_id.is_unique  # all but the rows of the overwritten page


def test_a_read_only_output_folder_is_one_line_and_loses_nothing(tmp_path, config, monkeypatch):
    out = tmp_path / "out"
    database = _stored(out)
    before = _digest(database)
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):  # what a read-only folder does to `.lock`
        if str(file).endswith(".lock") and any(c in mode for c in "wa+x"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    ran = CliRunner().invoke(main, ["run", str(config), "--out", str(out), "--threads", "1"])
    _one_line_error(ran, str(out), "Permission denied", "writable", "--out")
    monkeypatch.setattr(builtins, "open", real_open)
    assert _digest(database) == before


def test_an_unwritable_parent_is_one_line(tmp_path, config, monkeypatch):
    out = tmp_path / "locked-parent" / "out"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    ran = CliRunner().invoke(main, ["run", str(config), "--out", str(out), "--threads", "1"])
    _one_line_error(ran, str(out), "cannot create", "Permission denied", "--out")


def test_a_read_only_folder_is_read_without_writing_and_a_write_fault_says_so(tmp_path, config, monkeypatch):
    """`results` and `report` only read the database, so a read-only folder does not stop them (they never ask
    SQLite to write); `run` needs to write, and a read-only database is named as such, not as "not a bdbench
    results database"."""
    out = tmp_path / "out"
    database = _stored(out)
    before = _digest(database)
    real_connect = sqlite3.connect

    class ReadOnlyConnection(sqlite3.Connection):
        """A connection to a database on a read-only folder: every write is refused as SQLite refuses it."""

        def execute(self, sql, *args):
            if not sql.lstrip().upper().startswith(("SELECT", "PRAGMA TABLE_INFO", "PRAGMA QUICK_CHECK")):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=ReadOnlyConnection, **k))
    listed = CliRunner().invoke(main, ["results", "--out", str(out)])
    assert listed.exit_code == 0 and len(listed.output.strip().splitlines()) == 4, listed.output
    ran = CliRunner().invoke(main, ["run", str(config), "--out", str(out), "--threads", "1"])
    line = _one_line_error(ran, str(database), "cannot write", "readonly", "--out")
    assert "not a bdbench results database" not in line
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    assert _digest(database) == before


def test_a_report_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _stored(out)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    _one_line_error(CliRunner().invoke(main, ["report", "--out", str(out)]), str(out / "report.html"),
                    "Permission denied", "-o")


def test_a_zero_byte_database_is_one_line_not_an_empty_frame(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"")
    for command in ("results", "report"):
        line = _one_line_error(CliRunner().invoke(main, [command, "--out", str(out)]), str(out / "results.sqlite"),
                               "no finished experiment", "bdbench run")
        assert "Empty DataFrame" not in line
    assert (out / "results.sqlite").stat().st_size == 0  # read, never initialised by a reader


def test_results_of_a_grid_still_at_its_first_experiment_say_so(tmp_path):
    """Issue 25: `bdbench results` on a folder whose run has stored no row yet printed an empty pandas frame."""
    import os

    from bdbench.runner import exclusive

    out = tmp_path / "out"
    with exclusive(out):  # what a running `bdbench run` holds
        runner = CliRunner()
        no_database = runner.invoke(main, ["results", "--out", str(out)])
        _one_line_error(no_database, str(out), f"in progress (pid {os.getpid()})", "no experiment has finished yet")
        ResultStore(out / "results.sqlite").close()  # the run has created its database, no row yet
        for fmt in ("table", "csv", "json"):
            started = runner.invoke(main, ["results", "--out", str(out), "--format", fmt])
            line = _one_line_error(started, "in progress", "no experiment has finished yet", "try again")
            assert "Empty DataFrame" not in line
    finished = CliRunner().invoke(main, ["results", "--out", str(out)])
    _one_line_error(finished, str(out / "results.sqlite"), "holds no finished experiment", "bdbench run")
    _one_line_error(CliRunner().invoke(main, ["results", "--out", str(tmp_path / "never")]),
                    str(tmp_path / "never" / "results.sqlite"), "no results yet", "bdbench run")


def test_a_read_only_folder_with_rows_still_in_the_wal_loses_none(tmp_path, monkeypatch):
    """A run killed with kill -9 leaves rows in results.sqlite-wal. Where the folder is read-only SQLite cannot
    open the database read-only (it needs to create the -shm file), and `immutable` would skip the WAL's rows:
    every committed row must still be listed."""
    out = tmp_path / "out"
    out.mkdir()
    writer = "\n".join([
        "import os", "from bdbench.store import ResultStore", f"store = ResultStore({str(out / 'results.sqlite')!r})",
        "for i in range(5):",
        "    store.write({'experiment_id': f'e{i}', 'status': 'ok', 'attack': 'none', 'defense': 'none'})",
        "os._exit(0)"])  # no close, no checkpoint: the rows stay in the WAL
    subprocess.run([sys.executable, "-c", writer], check=True)
    assert (out / "results.sqlite-wal").stat().st_size > 0
    real_connect = sqlite3.connect

    def read_only_folder(database, *args, **kwargs):
        if "mode=ro" in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_folder)
    assert load_results(out).experiment_id.tolist() == [f"e{i}" for i in range(5)]
