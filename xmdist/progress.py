"""Progress reports from inside long phases (evaluation batches, a rank waiting for rank 0's
scoring) to whoever watches the process: the training watchdog (xmdist/train/watchdog.py).

Nothing listens outside training, so calling these costs nothing in the tools.
"""
from __future__ import annotations

import contextlib
import sys
import time
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


def bar(iterable, total: int | None = None, desc: str = "", unit: str = "it", every_s: float = 30.0):
    """``iterable`` with a progress bar on a terminal (tqdm, stderr), or a log line every
    ``every_s`` seconds and one at the end when stderr is a file or a pipe (SLURM logs, CI), where
    a bar's carriage returns pile up into one unreadable line."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)
        return
    t0 = last = time.monotonic()
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            _line(f"{desc}: {n}{f'/{total}' if total else ''} {unit} ({n / (now - t0):.0f} {unit}/s)")
    _line(f"{desc}: {n} {unit} in {time.monotonic() - t0:.1f} s")


def _line(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)
