"""Results in SQLite (one row per experiment) and trained models as safetensors + JSON spec.

The database runs in WAL mode and commits each row as it arrives, so an interrupted grid loses
at most the experiment in flight. Artifacts are written to a temporary file and renamed, so a
crash never leaves a half-written model under a valid name. Model files are never unpickled.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bdbench.errors import ArtifactError

# Column name -> SQLite type. New columns are added to older databases when they are opened.
COLUMNS: dict[str, str] = {
    "experiment_id": "TEXT PRIMARY KEY",
    "dataset": "TEXT",
    "model": "TEXT",
    "attack": "TEXT",
    "attack_params": "TEXT",
    "attack_variant": "TEXT",
    "poison_rate": "REAL",
    "target_label": "INTEGER",
    "defense": "TEXT",
    "defense_params": "TEXT",
    "defense_variant": "TEXT",
    "defense_kind": "TEXT",
    "precision": "TEXT",
    "precision_order": "TEXT",
    "quantized_layers": "TEXT",
    "proxy": "TEXT",
    "seed": "INTEGER",
    "status": "TEXT",
    "error": "TEXT",
    "clean_acc": "REAL",
    "asr": "REAL",
    "robust_acc": "REAL",
    "der": "REAL",
    "clean_acc_before": "REAL",
    "asr_before": "REAL",
    "robust_acc_before": "REAL",
    "psnr": "REAL",
    "ssim": "REAL",
    "detected": "INTEGER",
    "anomaly_index": "REAL",
    "suspected_targets": "TEXT",
    "det_tpr": "REAL",
    "det_fpr": "REAL",
    "det_auroc": "REAL",
    "det_threshold": "REAL",
    "clean_budget": "INTEGER",
    "victim_cached": "INTEGER",
    "victim_train_s": "REAL",
    "wall_s": "REAL",
    "defense_s": "REAL",
    "peak_rss_mb": "REAL",
    "device": "TEXT",
    "torch_threads": "INTEGER",
    "train_dtype": "TEXT",
    "victim_key": "TEXT",
    "spec": "TEXT",
    "finished_at": "TEXT",
}
_BOOL_COLUMNS = ("detected", "victim_cached")
_JSON_COLUMNS = ("attack_params", "defense_params", "suspected_targets")


class ResultStore:
    """The results database of one output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS experiments ({', '.join(f'{c} {t}' for c, t in COLUMNS.items())})"
            )
            have = {row[1] for row in self._db.execute("PRAGMA table_info(experiments)")}
            for column, sql_type in COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE experiments ADD COLUMN {column} {sql_type}")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise ArtifactError(f"{self.path}: not a bdbench results database ({exc}); move it away or pick another --out") from None

    def write(self, row: dict[str, Any]) -> None:
        """Insert or replace one experiment's row and commit it at once."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        names = list(row)
        self._db.execute(
            f"INSERT OR REPLACE INTO experiments ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [_to_sql(row[n]) for n in names],
        )
        self._db.commit()

    def statuses(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT experiment_id, status FROM experiments"))

    def dataframe(self, experiment_ids: Iterable[str] | None = None) -> pd.DataFrame:
        df = pd.read_sql_query("SELECT * FROM experiments ORDER BY rowid", self._db)
        if experiment_ids is not None:
            df = df[df["experiment_id"].isin(set(experiment_ids))].reset_index(drop=True)
        for column in _BOOL_COLUMNS:
            df[column] = df[column].map(lambda v: None if pd.isna(v) else bool(v)).astype(object)
        for column in _JSON_COLUMNS:
            # NULL reads back as None or NaN, depending on the column's other values and the pandas version.
            df[column] = df[column].map(lambda v: json.loads(v) if isinstance(v, str) else None).astype(object)
        return with_variants(df)

    def close(self) -> None:
        self._db.close()


def _to_sql(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


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
                      (registry.variant(n, p if isinstance(p, dict) else _json_dict(p)) if isinstance(n, str) else None)
                      for v, n, p in zip(known, df[kind], params)]
    return df


def _json_dict(value: Any) -> dict:
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def load_results(out: str | Path = "bdbench-out") -> pd.DataFrame:
    """All result rows of an output folder as a pandas DataFrame."""
    path = Path(out) / "results.sqlite"
    if not path.is_file():
        raise ArtifactError(f"{path}: no results yet; run `bdbench run CONFIG --out {out}` first")
    store = ResultStore(path)
    try:
        return store.dataframe()
    finally:
        store.close()


class ArtifactCache:
    """Content-addressed tensor files: `<kind>/<key>.safetensors` beside `<key>.json` (what produced it).

    Models are stored as their state dict; attacks store what they learned (a trigger, a generator).
    """

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


class MemoryCache(ArtifactCache):
    """Artifacts held in memory, for a worker that cannot see the output folder (a Ray node).

    It starts with the artifacts the driver sends (`entries`: (kind, key) -> (tensors, info));
    what the worker saves lands in `produced` too, for the driver to store in the output folder.
    """

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


__all__ = ["COLUMNS", "ArtifactCache", "MemoryCache", "ResultStore", "load_results", "with_variants"]
