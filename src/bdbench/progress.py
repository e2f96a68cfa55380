"""Progress inside an experiment's long steps, for the run's progress display: a victim's or a
defense's training epochs, Neural Cleanse's and MM-BD's optimisation steps, ANP's and I-BAU's rounds.

A long loop iterates over `steps("training epoch", epochs)` instead of `range(epochs)`; whoever shows
progress installs a listener with `listening(callback)`, which hears `(what, number, total)` as each
step starts. Without a listener a step costs one context-variable read. The local executor runs
experiments in the runner's own thread, so `bdbench run` shows these steps beside its bar; `process`
and `ray` workers run elsewhere and report whole experiments only.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

Listener = Callable[[str, int, int], None]
_LISTENER: ContextVar[Listener | None] = ContextVar("bdbench_progress_listener", default=None)


def steps(what: str, total: int, start: int = 0) -> Iterator[int]:
    """`range(start, total)`, telling the listener (if any) as each step starts."""
    for index in range(start, total):
        listener = _LISTENER.get()
        if listener is not None:
            listener(what, index + 1, total)
        yield index


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send the steps of the code run inside this block to `listener`."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
