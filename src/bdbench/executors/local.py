"""`local`: experiments one after another in this process, in grid order (which keeps a victim's
experiments adjacent, so each victim is trained once and then loaded from the cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Generator, Sequence

import torch

from bdbench.errors import ConfigError
from bdbench.executors.base import EXECUTORS, Resources
from bdbench.experiment import run_experiment
from bdbench.grid import ExperimentSpec
from bdbench.store import ArtifactCache


@EXECUTORS.register("local")
def run_local(specs: Sequence[ExperimentSpec], out: Path, resources: Resources) -> Generator[dict, None, None]:
    """In this process, one experiment after another."""
    if resources.workers != 1:
        raise ConfigError(f"the local executor runs one experiment at a time; for --workers {resources.workers} "
                          "use --executor process (this machine) or --executor ray (a cluster)")
    cache = ArtifactCache(out / "cache")
    before = torch.get_num_threads()
    torch.set_num_threads(resources.threads_per_experiment)
    try:
        for spec in specs:
            yield run_experiment(spec, cache, log_dir=out / "logs")
    finally:
        torch.set_num_threads(before)
