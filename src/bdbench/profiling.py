"""Cost measurement: wall time, this process's CPU time and peak resident memory of a block of code."""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE_MB = resource.getpagesize() / 2**20


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux), or the lifetime peak where /proc is absent."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE_MB
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class Cost:
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, all its threads: what other processes on a core cannot inflate
    peak_rss_mb: float = 0.0


class measure:
    """`with measure() as cost: ...` fills `cost.seconds`, `cost.cpu_seconds` and `cost.peak_rss_mb` (sampled
    every 10 ms)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.cost = Cost()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.cost.peak_rss_mb = max(self.cost.peak_rss_mb, current_rss_mb())

    def __enter__(self) -> Cost:
        self.cost.peak_rss_mb = current_rss_mb()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        self._thread.start()
        return self.cost

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cost.seconds = time.perf_counter() - self._start
        self.cost.cpu_seconds = time.process_time() - self._cpu_start
        self.cost.peak_rss_mb = round(max(self.cost.peak_rss_mb, current_rss_mb()), 1)
