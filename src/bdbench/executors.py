"""Executors run experiment specs and yield their rows as they finish.

`local` runs them one after another in this process, in the order given (the grid keeps
experiments that share a victim adjacent, so each victim is trained once and then reused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from bdbench.experiment import run_experiment
from bdbench.grid import ExperimentSpec
from bdbench.registry import Registry
from bdbench.store import ArtifactCache

Executor = Callable[[Iterable[ExperimentSpec], Path], Iterator[dict]]
EXECUTORS: Registry[Executor] = Registry("executor")


@EXECUTORS.register("local")
def run_local(specs: Iterable[ExperimentSpec], out: Path) -> Iterator[dict]:
    """In this process, one experiment after another."""
    cache = ArtifactCache(out / "cache")
    for spec in specs:
        yield run_experiment(spec, cache, log_dir=out / "logs")
