"""Results in SQLite (one row per experiment) and trained models as safetensors + JSON spec.

The database runs in WAL mode and commits each row as it arrives, so an interrupted grid loses
at most the experiment in flight. Artifacts are written to a temporary file and renamed, so a
crash never leaves a half-written model under a valid name. Model files are never unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bdbench.errors import ArtifactError
from bdbench.schema import BOOL_COLUMNS, JSON_COLUMNS, ResultRow, check_columns, sql_columns, to_sql

log = logging.getLogger(__name__)

# Column name -> SQLite type, from the one result schema. New columns are added to older databases when they are
# opened.
COLUMNS: dict[str, str] = sql_columns()
# A federated experiment's per-round curve, one row per experiment and evaluated round (the `round_metrics` column
# of its row, normalised), written in the same transaction as the row; the table is made with the first such row.
ROUND_COLUMNS: dict[str, str] = {"experiment_id": "TEXT NOT NULL", "round": "INTEGER NOT NULL", "clean_acc": "REAL",
                                 "asr": "REAL", "robust_acc": "REAL", "bytes_up": "REAL", "bytes_down": "REAL",
                                 "server_defense_s": "REAL"}


class ResultStore:
    """The results database of one output folder.

    `read_only=True` (what `load_results`, `bdbench results` and `bdbench report` use) never asks SQLite to
    write: it works on a read-only folder, leaves an empty or older database as it is, and fills columns an
    older database lacks in the returned frame instead. Every SQLite failure is a one-line `ArtifactError`
    that says whether the file is damaged, not a database, or not writable, and what to do.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        try:
            if read_only:
                self._db = _connect_read_only(self.path)
                self._check()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._check()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS experiments ({', '.join(f'{c} {t}' for c, t in COLUMNS.items())})"
            )
            have = self._columns()
            for column, sql_type in COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE experiments ADD COLUMN {column} {sql_type}")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None
        except OSError as exc:
            raise ArtifactError(f"cannot create {self.path.parent} ({exc.strerror or exc}): make its parent "
                                "writable for this user, or pick another --out") from None

    def _check(self) -> None:
        """A damaged page fails here, before any experiment runs, rather than when its row is read."""
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            # SQLite's report may span lines ("*** in database main ***\nPage 5: ..."): the error is one line.
            raise sqlite3.DatabaseError(f"database disk image is malformed: {' '.join(str(problems[0]).split())}")

    def _columns(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(experiments)")}

    def write(self, row: ResultRow | dict[str, Any]) -> None:
        """Insert or replace one experiment's row and commit it at once. A column the schema lacks is a
        `TypeError` before the database is touched."""
        if isinstance(row, ResultRow):
            row = row.as_dict()
        check_columns(row)
        names = list(row)
        try:
            self._db.execute(
                f"INSERT OR REPLACE INTO experiments ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [to_sql(row[n]) for n in names],
            )
            curve = row.get("round_metrics")
            if curve:  # the table exists from the first federated row on: centralized databases keep their layout
                self._db.execute(f"CREATE TABLE IF NOT EXISTS federated_rounds "
                                 f"({', '.join(f'{c} {t}' for c, t in ROUND_COLUMNS.items())}, "
                                 "PRIMARY KEY (experiment_id, round))")
                self._db.execute("DELETE FROM federated_rounds WHERE experiment_id = ?", (row["experiment_id"],))
                self._db.executemany(
                    f"INSERT INTO federated_rounds ({', '.join(ROUND_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(ROUND_COLUMNS))})",
                    [[row["experiment_id"], *(point.get(c) for c in list(ROUND_COLUMNS)[1:])] for point in curve])
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None

    def statuses(self) -> dict[str, str]:
        try:
            return dict(self._db.execute("SELECT experiment_id, status FROM experiments"))
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None

    def settings(self) -> dict[str, dict[str, Any]]:
        """Experiment id -> the settings its row ran with, for rows that recorded them (rows written before the
        `settings` column existed did not)."""
        try:
            found = self._db.execute("SELECT experiment_id, settings FROM experiments WHERE settings IS NOT NULL")
            return {experiment_id: json.loads(text) for experiment_id, text in found}
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None

    def dataframe(self, experiment_ids: Iterable[str] | None = None) -> pd.DataFrame:
        try:
            if "experiment_id" not in self._columns():  # an empty file, read without creating the table
                df = pd.DataFrame(columns=list(COLUMNS))
            else:
                df = pd.read_sql_query("SELECT * FROM experiments ORDER BY rowid", self._db)
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None
        for column in COLUMNS:  # an older database read without altering it
            if column not in df:
                df[column] = None
        # Rows stored before `dataset_loader` existed named the loader in `dataset`.
        df["dataset_loader"] = df["dataset_loader"].where(df["dataset_loader"].notna(), df["dataset"])
        if experiment_ids is not None:
            df = df[df["experiment_id"].isin(set(experiment_ids))].reset_index(drop=True)
        for column in BOOL_COLUMNS:
            df[column] = df[column].map(lambda v: None if pd.isna(v) else bool(v)).astype(object)
        for column in JSON_COLUMNS:
            # NULL reads back as None or NaN, depending on the column's other values and the pandas version.
            df[column] = df[column].map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
        return with_variants(df)

    def rounds(self) -> pd.DataFrame:
        """The per-round curves of the federated experiments, one row per experiment and evaluated round."""
        try:
            have = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "federated_rounds" not in have:
                return pd.DataFrame(columns=list(ROUND_COLUMNS))
            return pd.read_sql_query("SELECT * FROM federated_rounds ORDER BY experiment_id, round", self._db)
        except sqlite3.DatabaseError as exc:
            raise database_fault(self.path, exc) from None

    def close(self) -> None:
        self._db.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open without write access. SQLite reads a WAL database through its -shm file, which it cannot create in
    a folder this user may not write: then the database and its -wal (rows committed but not yet folded in) are
    copied aside and read from memory, so that no committed row is missed."""
    db = None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as exc:
        if db is not None:
            db.close()
        if "unable to open" not in str(exc) and "readonly" not in str(exc):
            raise
    memory = sqlite3.connect(":memory:")
    with tempfile.TemporaryDirectory(prefix="bdbench-read-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        wal = path.with_name(f"{path.name}-wal")
        if wal.is_file():
            shutil.copyfile(wal, copy.with_name(f"{copy.name}-wal"))
        disk = sqlite3.connect(copy)
        try:
            disk.backup(memory)
        finally:
            disk.close()
    return memory


def database_fault(path: Path, exc: sqlite3.DatabaseError) -> ArtifactError:
    """One line for a SQLite failure on a results database: what is wrong with the file, and the way out."""
    text = str(exc)
    low = text.lower()
    if "malformed" in low or "corrupt" in low:
        # Dumped first: the sqlite3 tool folds a -wal left by a killed run into the file as it closes it.
        damaged, dump = (path.with_name(f"{path.stem}.damaged{path.suffix}"), path.with_name(f"{path.stem}.sql"))
        return ArtifactError(
            f"{path} is damaged ({text}); keep the rows it still holds with `sqlite3 {path} .dump | sed "
            f"'s/^ROLLBACK;.*/COMMIT;/' > {dump} && mv {path} {damaged} && sqlite3 {path} < {dump}` (a run then "
            "skips them), or pick another --out")
    if "not a database" in low or "encrypted" in low:
        return ArtifactError(f"{path} is not a SQLite database ({text}); move it away or pick another --out")
    if any(word in low for word in ("readonly", "read-only", "unable to open", "permission", "disk i/o", "full")):
        return ArtifactError(f"cannot write {path} ({text}); make {path.parent} and the files in it writable for "
                             "this user (and check the disk has room), or pick another --out")
    if "locked" in low or "busy" in low:
        return ArtifactError(f"{path} is locked by another process ({text}); wait for it, or pick another --out")
    return ArtifactError(f"{path}: not a bdbench results database ({text}); move it away or pick another --out")


def with_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Fill `attack_variant` and `defense_variant` where a row lacks them (rows stored before they existed, or
    a frame built by hand) from the name and parameters: `badnets(patch_size=4)`, or the bare name."""
    from bdbench.attacks import ATTACKS
    from bdbench.defenses import DEFENSES

    df = df.copy()
    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES)):
        column = f"{kind}_variant"
        if kind not in df:
            continue
        params = df[f"{kind}_params"] if f"{kind}_params" in df else pd.Series([None] * len(df), index=df.index)
        known = df[column] if column in df else pd.Series([None] * len(df), index=df.index)
        df[column] = [v if isinstance(v, str) and v else
                      (registry.variant(n, params_dict(p)) if isinstance(n, str) else None)
                      for v, n, p in zip(known, df[kind], params)]
    return df


def params_dict(value: Any) -> dict:
    """A parameters column's value as a mapping: as it is where it is one, parsed where it is JSON text, else empty."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _read(out: str | Path, read: Callable[[ResultStore], pd.DataFrame]) -> pd.DataFrame:
    """`read` of an output folder's results database, opened read-only (a one-line error if it has none)."""
    path = Path(out) / "results.sqlite"
    if not path.is_file():
        raise no_rows_error(out)
    store = ResultStore(path, read_only=True)
    try:
        return read(store)
    finally:
        store.close()


def load_results(out: str | Path = "bdbench-out") -> pd.DataFrame:
    """All result rows of an output folder as a pandas DataFrame."""
    return _read(out, ResultStore.dataframe)


def export_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` (as `load_results` gives them) ready for a file format without nested values: each JSON
    column (`JSON_COLUMNS`: parameters, suspected targets, per-round curves) as JSON text, None kept
    as a missing value; every other column as it is. `json.loads` on those columns gives back
    exactly what `load_results` holds (see `read_exported`)."""
    exported = rows.copy()
    for column in JSON_COLUMNS:
        if column in exported:
            exported[column] = exported[column].map(lambda v: None if v is None else json.dumps(v, sort_keys=True))
    return exported


def read_exported(path: str | Path) -> pd.DataFrame:
    """A `bdbench results --format csv|parquet` file read back into the values `load_results` gives:
    pandas reads the file, then the JSON columns are parsed and the boolean columns made bool/None."""
    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for column in JSON_COLUMNS:
        if column in df:
            df[column] = df[column].map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
    for column in BOOL_COLUMNS:
        if column in df:
            df[column] = df[column].map(lambda v: None if pd.isna(v) else bool(v)).astype(object)
    for column, kind in sql_columns().items() if path.suffix != ".parquet" else ():
        if kind == "TEXT" and column in df and column not in JSON_COLUMNS:  # a CSV's empty text reads as NaN
            df[column] = df[column].map(lambda v: None if not isinstance(v, str) and pd.isna(v) else v).astype(object)
    return df


def load_rounds(out: str | Path = "bdbench-out") -> pd.DataFrame:
    """The per-round curves of an output folder's federated experiments (join them to `load_results` on
    `experiment_id`)."""
    return _read(out, ResultStore.rounds)


def running_pid(out: str | Path) -> str | None:
    """The pid of the `bdbench run` that holds the output folder's lock now, or None when none does. Only reads
    the lock file, so it works on a folder this user cannot write."""
    import fcntl

    try:
        handle = open(Path(out) / ".lock")  # noqa: SIM115 - a missing lock file is not an error
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def no_rows_error(out: str | Path) -> ArtifactError:
    """One line for an output folder that holds no finished experiment: a run still at its first one, an empty
    (0-byte) database, or none at all."""
    path = Path(out) / "results.sqlite"
    pid = running_pid(out)
    if pid is not None:
        return ArtifactError(f"{out}: a bdbench run is in progress (pid {pid}) and no experiment has finished yet; "
                             "try again once the first one has")
    if not path.is_file():
        return ArtifactError(f"{path}: no results yet; run `bdbench run CONFIG --out {out}` first")
    empty = " (an empty, 0-byte file)" if path.stat().st_size == 0 else ""
    return ArtifactError(f"{path} holds no finished experiment{empty}; "
                         f"run `bdbench run CONFIG --out {out}` to add some")


class ArtifactCache:
    """Content-addressed tensor files: `<kind>/<key>.safetensors` beside `<key>.json` (what produced it).

    Models are stored as their state dict; attacks store what they learned (a trigger, a generator).
    """

    durable = True  # on disk: it outlives the process, so a checkpoint (training, federation) in it is worth saving

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        folder = self.root / kind
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def save_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        weights, meta = self._paths(kind, key)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
        _atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=2, sort_keys=True)))

    def load_info(self, kind: str, key: str) -> dict[str, Any] | None:
        """The JSON stored beside an artifact (what produced it), or None when not cached."""
        meta = self._paths(kind, key)[1]
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return None

    def keys(self, kind: str) -> list[str]:
        """The keys of every complete artifact of one kind."""
        folder = self.root / kind
        return sorted(p.stem for p in folder.glob("*.safetensors") if p.with_suffix(".json").is_file())

    def lock(self, kind: str, key: str) -> ContextManager[None]:
        """Hold an exclusive lock on one artifact while loading or building it, so that workers
        of one machine that need the same artifact at the same time build it once: the first
        builds and saves, the others wait and then load."""
        return _file_lock(self.root / kind / f".{key}.lock")

    def load_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None when not cached; a corrupt file is an `ArtifactError`."""
        weights, meta = self._paths(kind, key)
        if not (weights.is_file() and meta.is_file()):
            return None
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{weights}: unreadable or mismatched model file ({str(exc).splitlines()[0]})") from None

    def save(self, kind: str, key: str, model: nn.Module, info: dict[str, Any]) -> None:
        self.save_tensors(kind, key, model.state_dict(), info)

    def load(self, kind: str, key: str, model: nn.Module) -> bool:
        """Load cached weights into `model`; False when not cached. A corrupt or mismatched
        file is an `ArtifactError`."""
        state = self.load_tensors(kind, key)
        if state is None:
            return False
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            weights = self._paths(kind, key)[0]
            raise ArtifactError(f"{weights}: unreadable or mismatched model file ({str(exc).splitlines()[0]})") from None
        return True

    def discard(self, kind: str, key: str) -> None:
        for path in self._paths(kind, key):
            path.unlink(missing_ok=True)


class StoredCheckpoint:
    """A checkpoint (`training.Checkpoint`, and `training.TrainingCheckpoint` with its `every_s`) kept in an
    artifact cache under `kind`/`key`: a victim's training state (`training/<victim key>`) or a federation's
    (`federated/<victim key>`), in torch's own format as one byte tensor, read back with `weights_only`
    (tensors, numbers and containers; no code) onto the CPU, so that a state saved on a GPU resumes on any
    machine (the trainer and the federation move it to their device). The JSON beside it records the state's
    counters (its top-level integers: epochs done, a federation's round), the wall and CPU seconds spent up to
    it (`earlier_s`, `earlier_cpu_s` after `load`), so that a victim's recorded training time is that of all
    its epochs or rounds, not only of those after the resume, and the `settings` it was made with (every
    parameter, defaults filled in: a default changed since, under the same key, makes it another computation). An unreadable
    checkpoint, one of other settings or that records none (an older format's, such as the federated
    checkpoints saved before this class kept them), or one that does not fit (`reject`), is discarded with a
    warning, its seconds not counted, and the computation starts again (`start_over` says how, in the
    warning)."""

    every_s = 60.0  # at most one save a minute: a victim trained in seconds saves none, one trained in hours ~one an epoch

    def __init__(self, cache: ArtifactCache, kind: str, key: str, settings: dict[str, Any] | None = None,
                 start_over: str = "training from the first epoch") -> None:
        self.cache, self.kind, self.key, self.start_over = cache, kind, key, start_over
        self.settings = json.loads(json.dumps(settings, sort_keys=True))  # as the JSON beside it reads back
        self.earlier_s = self.earlier_cpu_s = 0.0
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def __str__(self) -> str:
        return f"{self.kind}/{self.key}"  # what the warnings of a resume name: the victim's key

    def load(self) -> dict[str, Any] | None:
        info = self.cache.load_info(self.kind, self.key) or {}
        if info and info.get("settings") != self.settings:
            why = "was made with other settings" if "settings" in info else "records no settings (an older format)"
            log.warning("checkpoint %s %s; %s", self, why, self.start_over)
            self.discard()
            return None
        try:
            tensors = self.cache.load_tensors(self.kind, self.key)
            if tensors is None:
                return None
            state = torch.load(io.BytesIO(tensors["state"].numpy().tobytes()), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a saved state")
        except (ArtifactError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("checkpoint %s is unreadable (%s); %s", self,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self.start_over)
            self.discard()
            return None
        self.earlier_s, self.earlier_cpu_s = float(info.get("train_s", 0.0)), float(info.get("train_cpu_s", 0.0))
        return state

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        self.cache.save_tensors(self.kind, self.key, {"state": blob}, {
            **_counters(state), "settings": self.settings,
            "train_s": round(self.earlier_s + time.perf_counter() - self._start, 3),
            "train_cpu_s": round(self.earlier_cpu_s + time.process_time() - self._cpu_start, 3)})

    def reject(self) -> None:
        """The state `load` returned does not fit the computation (another model, schedule or federation):
        discard it, and the seconds it carried, which were spent on another computation."""
        self.earlier_s = self.earlier_cpu_s = 0.0
        self.discard()

    def discard(self) -> None:
        self.cache.discard(self.kind, self.key)


def _counters(state: dict[str, Any]) -> dict[str, int]:
    """A saved state's top-level integers (a one-element integer tensor counts): where it stands, readable in
    the JSON beside it without loading it."""
    counters = {}
    for name, value in state.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
                and not value.is_floating_point() and not value.is_complex()):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            counters[name] = value
    return counters


class MemoryCache(ArtifactCache):
    """Artifacts held in memory, for a worker that cannot see the output folder (a Ray node).

    It starts with the artifacts the driver sends (`entries`: (kind, key) -> (tensors, info));
    what the worker saves lands in `produced` too, for the driver to store in the output folder.
    It is not `durable`: a checkpoint (a victim's training or federation) would die with the worker, so none is kept.
    """

    durable = False

    def __init__(self, entries: dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> None:
        super().__init__("<memory>")
        self.entries = dict(entries or {})
        self.produced: dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def save_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        entry = ({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, info)
        self.entries[(kind, key)] = self.produced[(kind, key)] = entry

    def load_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        entry = self.entries.get((kind, key))
        return None if entry is None else dict(entry[0])

    def lock(self, kind: str, key: str) -> ContextManager[None]:
        return nullcontext()  # one worker owns this cache

    def discard(self, kind: str, key: str) -> None:
        self.entries.pop((kind, key), None)
        self.produced.pop((kind, key), None)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if the holder dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, write) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["COLUMNS", "ROUND_COLUMNS", "ArtifactCache", "MemoryCache", "ResultStore", "StoredCheckpoint", "load_results",
           "load_rounds", "no_rows_error", "params_dict", "running_pid", "with_variants"]
