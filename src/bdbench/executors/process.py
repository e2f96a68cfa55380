"""`process`: N worker processes on this machine, torch threads divided among them.

Workers are started with `spawn`, not `fork`: a forked child of a process that has already run
parallel torch code hangs in its first parallel region (libgomp keeps the parent's dead thread
pool). The price is that each worker imports bdbench afresh: installed plugins (entry points) and
the grid's `plugins:` modules are loaded there again, but attacks or defenses registered at run
time in the driver (not by importing a module) are unknown to the workers, and a Python script
that calls `run_grid(..., executor="process")` needs the usual `if __name__ == "__main__":`
guard (spawned workers import the script).

A worker logs as the driver does: where the driver's root logger has a handler (`bdbench run` sets INFO, message
only, on stderr), each worker sets the same level and format on its own stderr, which is the driver's, so a
defense's info lines (a repair's halving, CETF's search) show under `--executor process` as under `local`.

Each worker dies with the driver (Linux PR_SET_PDEATHSIG), so a driver killed with -9 leaves no
orphan still training; a worker that dies on its own (out of memory, a signal) gives an `error`
row for each experiment it took down, and the grid goes on with fresh workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Generator, Sequence

import torch

from bdbench.executors.base import EXECUTORS, Resources, lost_row, run_staged
from bdbench.experiment import run_experiment
from bdbench.grid import ExperimentSpec
from bdbench.plugins import import_modules
from bdbench.store import ArtifactCache

_WORKER: dict = {}


def _die_with(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the driver died before the signal was armed
        os._exit(1)


def _driver_logging() -> tuple[int, str] | None:
    """The driver's root level and its first handler's format, or None where the driver configured no logging
    (a library caller who did not ask for log lines gets none from the workers either)."""
    root = logging.getLogger()
    if not root.handlers:
        return None
    formatter = root.handlers[0].formatter
    return root.level, formatter._fmt if formatter is not None and formatter._fmt else logging.BASIC_FORMAT


def _start_worker(parent: int, out: str, threads: int, driver_logging: tuple[int, str] | None) -> None:
    _die_with(parent)
    if driver_logging is not None:
        level, fmt = driver_logging
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    torch.set_num_threads(threads)
    _WORKER.update(cache=ArtifactCache(Path(out) / "cache"), log_dir=Path(out) / "logs")


def _run_in_worker(spec: ExperimentSpec) -> dict:
    # Installed plugins register themselves on the first lookup; the grid's plugin modules are imported here.
    import_modules(spec.plugins, where="in a process worker")
    return run_experiment(spec, _WORKER["cache"], log_dir=_WORKER["log_dir"])


class _Pool:
    """A process pool that replaces itself when a worker dies (which breaks a ProcessPoolExecutor)."""

    def __init__(self, out: Path, resources: Resources) -> None:
        self._args = (os.getpid(), str(out), resources.threads_per_experiment, _driver_logging())
        self._workers = resources.workers
        self._pool = self._new()
        self.specs: dict[Future, ExperimentSpec] = {}

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=self._args)

    def submit(self, spec: ExperimentSpec, shared: None) -> Future:
        try:
            future = self._pool.submit(_run_in_worker, spec)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new()
            future = self._pool.submit(_run_in_worker, spec)
        self.specs[future] = spec
        return future

    @staticmethod
    def finished(futures: list[Future]) -> list[Future]:
        return list(wait(futures, return_when=FIRST_COMPLETED).done)

    def collect(self, future: Future) -> tuple[dict, None]:
        spec = self.specs.pop(future)
        try:
            return future.result(), None
        except BrokenProcessPool:
            return lost_row(spec, "worker process died while running this experiment (out of memory, killed, or a "
                                  "Python script calling run_grid without an `if __name__ == '__main__':` guard); "
                                  "run again with --retry-errors"), None

    def close(self, interrupted: bool) -> None:
        """Let idle workers exit; when interrupted, drop queued experiments and kill running ones."""
        processes = list((getattr(self._pool, "_processes", None) or {}).values())  # no public handle before 3.14
        self._pool.shutdown(wait=not interrupted, cancel_futures=True)
        if interrupted:
            for process in processes:
                process.kill()


@EXECUTORS.register("process")
def run_process(specs: Sequence[ExperimentSpec], out: Path, resources: Resources) -> Generator[dict, None, None]:
    """N worker processes on this machine; a victim's experiments start after it is trained."""
    pool = _Pool(out, resources)
    interrupted = True
    try:
        yield from run_staged(specs, pool.submit, pool.finished, pool.collect, max_in_flight=resources.workers)
        interrupted = False
    finally:
        pool.close(interrupted)
