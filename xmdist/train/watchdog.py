"""A hang detector: no progress for ``timeout_s`` dumps every thread's stack and ends the process.

A rank stuck in a collective (a peer died or hangs) would otherwise wait for the process-group
timeout, which is long by design. Each rank runs its own watchdog, so every rank of a hung job
prints where it is before it exits with status :data:`EXIT_CODE`; torchrun (``--max-restarts``)
or the scheduler then restarts the job from its last checkpoint.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

from xmdist import progress

log = logging.getLogger(__name__)

EXIT_CODE = 3


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.what = "start"
        self._last = time.monotonic()
        self._held: str | None = None  # waiting for another rank, which watches itself
        self._done = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="xmdist-watchdog", daemon=True)
            self._thread.start()
            progress.listen(self.beat, self.hold)  # evaluation batches and waits report through it

    def beat(self, what: str) -> None:
        """Progress: ``what`` was reached (named in the report if nothing follows)."""
        self._last, self.what = time.monotonic(), what

    def hold(self, what: str | None) -> None:
        """``what``: this rank waits for another one (rank 0 scoring an evaluation), which has a
        watchdog of its own; no timeout while held. None: the wait is over."""
        self._held = what
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s and self._held is None:
                log.error("watchdog: rank %d made no progress for %.0f s after %s (train.watchdog_s=%g); "
                          "stacks of every thread follow, then exit %d", self.rank, idle, self.what,
                          self.timeout_s, EXIT_CODE)
                for h in logging.getLogger().handlers:
                    h.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                # The other ranks went idle at about the same time; their watchdogs fire within
                # one check interval. Exiting at once would let the launcher kill them first.
                time.sleep(min(30.0, self.timeout_s / 2))
                os._exit(EXIT_CODE)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            progress.listen(None)
