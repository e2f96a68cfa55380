"""Run a grid into an output folder: validate, skip what is already stored, run the rest, store each row.

The output folder holds `results.sqlite`, `cache/` (trained victims) and `logs/` (tracebacks
of failed experiments). One run at a time may write to a folder: a second one is refused.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd
from tqdm import tqdm

from bdbench.data import load_dataset
from bdbench.errors import BdbenchError, ConfigError
from bdbench.executors import EXECUTORS, Resources
from bdbench.grid import ExperimentSpec, expand, load_grid, settings_changes
from bdbench.preflight import bfloat16_warning, check_grid
from bdbench.progress import listening
from bdbench.store import ResultStore

log = logging.getLogger("bdbench")


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the output folder's lock; refuse at once when another run holds it."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BdbenchError(f"cannot create the output folder {out} ({exc.strerror or exc}); make its parent "
                           "writable for this user, or pick another --out") from None
    try:
        handle = open(out / ".lock", "a+")  # noqa: SIM115 - opened apart so that its failure has its own message
    except OSError as exc:
        raise BdbenchError(f"cannot write in the output folder {out} ({exc.strerror or exc} on {out / '.lock'}); "
                           "make it writable for this user, or pick another --out (`bdbench results` and "
                           "`bdbench report -o FILE` still read it)") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BdbenchError(f"{out} is in use by a running bdbench (pid {holder}); wait for it to finish or pick another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _summary(spec: ExperimentSpec, row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{spec.describe()}: {row['status']}: {row.get('error')}"
    parts = [f"CA {row['clean_acc']:.3f}"]
    if row.get("asr") is not None:
        parts.append(f"ASR {row['asr']:.3f}")
    if row.get("der") is not None:
        parts.append(f"DER {row['der']:.3f}")
    cached = " (victim cached)" if row.get("victim_cached") else ""
    return f"{spec.describe()}: ok {' '.join(parts)} in {row['wall_s']:.1f}s{cached}"


def changed_settings(specs: Iterable[ExperimentSpec], ran_with: Mapping[str, dict[str, Any]]) -> set[str]:
    """The ids of stored rows that ran with other settings than the code's current defaults give their spec
    (a default changed since), each named in a warning: they run again and their rows are replaced."""
    stale = set()
    for spec in specs:
        changes = settings_changes(ran_with[spec.experiment_id], spec.settings()) if spec.experiment_id in ran_with else []
        if changes:
            stale.add(spec.experiment_id)
            log.warning("%s ran with other defaults than the code's now (%s): running it again",
                        spec.describe(), "; ".join(changes))
    return stale


def run_grid(config: str | Path | dict[str, Any], out: str | Path = "bdbench-out",
             overrides: Iterable[str] | Mapping[str, Any] = (),
             executor: str = "local", retry_errors: bool = False, progress: bool = True, workers: int = 1,
             threads: int | None = None, ray_address: str | None = None) -> pd.DataFrame:
    """Run every experiment of a grid that the output folder does not hold yet; return the grid's rows
    in grid order.

    `config` is a YAML path, a built-in grid name or a mapping; `overrides` are `KEY=VALUE` strings
    (VALUE is YAML) or a mapping such as `{"training.epochs": 5, "attacks.1.alpha": 0.1}`.
    Rows with status `error` are kept as results; `retry_errors=True` runs them again. `executor`
    is `local`, `process` or `ray`, running `workers` experiments at once with `threads` torch
    threads each (default: the cores divided among the workers); `ray_address` joins a cluster.
    """
    grid = load_grid(config, overrides)
    specs = expand(grid)
    run = EXECUTORS.get(executor)
    resources = Resources(workers, threads, ray_address)
    if ray_address and executor != "ray":
        raise ConfigError(f"--ray-address joins a Ray cluster; it needs --executor ray, not {executor}")
    out = Path(out)
    # A missing data file, or a grid its data cannot take, fails here, before any work.
    check_grid(grid, load_dataset(grid.dataset.name, **grid.dataset.params))
    if warning := bfloat16_warning(grid):
        log.warning(warning)
    with exclusive(out):
        store = ResultStore(out / "results.sqlite")
        try:
            stored = store.statuses()
            stale = changed_settings(specs, store.settings())
            todo = [s for s in specs if s.experiment_id not in stored or s.experiment_id in stale
                    or (retry_errors and stored[s.experiment_id] == "error")]
            log.info("grid %s: %d experiments, %d stored, %d to run on %s (%d worker%s, %d torch thread%s each), "
                     "output in %s", grid.name, len(specs), len(specs) - len(todo), len(todo), executor,
                     resources.workers, "s"[:resources.workers != 1], resources.threads_per_experiment,
                     "s"[:resources.threads_per_experiment != 1], out)
            by_id = {s.experiment_id: s for s in todo}
            with tqdm(total=len(todo), desc=grid.name, unit="exp", disable=not progress or None,
                      file=sys.stderr, dynamic_ncols=True) as bar:
                if todo:  # (a Ray cluster is not started for nothing)
                    # closing(): an interrupt stops the executor's workers at once, not when collected.
                    # Steps inside an experiment (epochs, a defense's rounds) show beside the bar.
                    with closing(run(todo, out, resources)) as finished, \
                            listening(lambda what, number, total: bar.set_postfix_str(f"{what} {number}/{total}")):
                        for done, row in enumerate(finished, start=1):
                            store.write(row)
                            bar.write(f"[{done}/{len(todo)}] " + _summary(by_id[row["experiment_id"]], row),
                                      file=sys.stderr)
                            bar.update(1)
            position = {s.experiment_id: i for i, s in enumerate(specs)}
            rows = store.dataframe(position)
            return rows.iloc[rows.experiment_id.map(position).argsort()].reset_index(drop=True)
        finally:
            store.close()
