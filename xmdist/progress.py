"""Progress reports from inside long phases (evaluation batches, a rank waiting for rank 0's
scoring) to whoever watches the process: the training watchdog (xmdist/train/watchdog.py).

Nothing listens outside training, so calling these costs nothing in the tools.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

_beat: Callable[[str], None] | None = None
_hold: Callable[[str | None], None] | None = None


def listen(beat: Callable[[str], None] | None, hold: Callable[[str | None], None] | None = None) -> None:
    """Install (or, with None, remove) the process's listener."""
    global _beat, _hold
    _beat, _hold = beat, hold


def report(what: str) -> None:
    """``what`` was reached: the process is making progress."""
    if _beat is not None:
        _beat(what)


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """A wait for another rank (which reports its own progress): not a hang of this one."""
    if _hold is not None:
        _hold(what)
    try:
        yield
    finally:
        if _hold is not None:
            _hold(None)
        report(f"after {what}")
