"""Effect checks: a number an effect test measured, held against its bar, and recorded.

Tiny models trained for seconds land near their bars, and PyTorch's kernels differ per instruction
set (AVX-512, AVX2) and thread count, so the same test measures slightly different numbers on
different CPUs. Every effect test states its measurements through the `effect` fixture; a test that
uses it carries the `effect` marker (`pytest -m effect` selects them), and with
`BDBENCH_EFFECT_LOG=FILE` each measurement is appended to FILE as a JSON line, so that
`tools/effect_spread.py` can tabulate every value across kernels, threads and seeds with its margin.

`BDBENCH_TEST_SEED` (default 0) moves the seeds of the shared training helpers, and
`BDBENCH_TEST_THREADS` sets torch's thread count for the session.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path

import torch

LOG_ENV = "BDBENCH_EFFECT_LOG"
SEED_ENV = "BDBENCH_TEST_SEED"
THREADS_ENV = "BDBENCH_TEST_THREADS"

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def test_seed(offset: int = 0) -> int:
    """The seed of this test session's shared training helpers, plus `offset`."""
    return int(os.environ.get(SEED_ENV, "0")) + offset


test_seed.__test__ = False  # a helper, not a test


class Effect:
    """The measurements of one test. `check("asr", 0.93, ">", 0.8)` records, then asserts."""

    def __init__(self, test_id: str):
        self.test_id = test_id

    def check(self, what: str, value: float, op: str, bar: float) -> None:
        value = float(value)
        log = os.environ.get(LOG_ENV)
        if log:
            record = {"test": self.test_id, "what": what, "value": value, "op": op, "bar": bar,
                      "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "seed": test_seed()}
            with Path(log).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        assert _OPS[op](value, bar), f"{what} = {value:.4f}, the bar is {op} {bar}"
