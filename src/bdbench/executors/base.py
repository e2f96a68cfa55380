"""What every executor shares: the resources a run may use, the registry, and the victim stage.

The victim stage: experiments that share a victim (same data, model, training, attack, poison
rate, seed) form a group. Each group's first experiment (its lead) trains the victim and stores
it; the rest of the group is handed out only when the lead has finished, so they load the victim
instead of racing to train it. Leads of different groups run side by side, which keeps every
worker busy early on while followers (a defense and a few evaluations each) fill the tail.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Generator, Hashable, Iterable, Sequence, TypeVar

from bdbench.errors import ConfigError
from bdbench.experiment import base_row
from bdbench.grid import ExperimentSpec
from bdbench.registry import Registry


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Resources:
    """How much a run may use: `workers` experiments at once, `threads` torch threads each
    (default: this machine's cores divided among the workers), and a Ray cluster address."""

    workers: int = 1
    threads: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, not {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {self.threads}")

    @property
    def threads_per_experiment(self) -> int:
        return self.threads or max(1, available_cpus() // self.workers)


# A generator, so that `closing()` can stop its workers at once on an interrupt.
Executor = Callable[[Sequence[ExperimentSpec], Path, Resources], Generator[dict, None, None]]
EXECUTORS: Registry[Executor] = Registry("executor")


def victim_groups(specs: Iterable[ExperimentSpec]) -> list[list[ExperimentSpec]]:
    """Specs grouped by victim, groups and members in their first-seen order."""
    groups: dict[str, list[ExperimentSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.victim_key, []).append(spec)
    return list(groups.values())


H = TypeVar("H", bound=Hashable)


def run_staged(specs: Sequence[ExperimentSpec], submit: Callable[[ExperimentSpec, Any], H],
               finished: Callable[[list[H]], list[H]], collect: Callable[[H], tuple[dict, Any]],
               max_in_flight: int) -> Generator[dict, None, None]:
    """Run specs through an asynchronous backend in victim stages, yielding rows as they finish.

    `submit(spec, shared)` starts one experiment and returns a handle; `shared` is what the
    group's lead handed on (None for a lead). `finished(handles)` blocks until at least one is
    done and returns those; `collect(handle)` returns (row, what the lead hands its followers).
    """
    ready: deque[tuple[ExperimentSpec, Any, list[ExperimentSpec]]] = deque(
        (group[0], None, group[1:]) for group in victim_groups(specs))
    running: dict[H, list[ExperimentSpec]] = {}
    while ready or running:
        while ready and len(running) < max_in_flight:
            spec, shared, followers = ready.popleft()
            running[submit(spec, shared)] = followers
        for handle in finished(list(running)):
            followers = running.pop(handle)
            row, shared = collect(handle)
            yield row
            ready.extend((spec, shared, []) for spec in followers)


def lost_row(spec: ExperimentSpec, message: str) -> dict[str, Any]:
    """The error row of an experiment whose worker died before it could report."""
    row = base_row(spec)
    row.status, row.error = "error", message
    row.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row.as_dict()
