"""One job per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``, held for the life of
the process that took it (rank 0 holds it on every rank's behalf).

The kernel releases a ``flock`` when its holder exits in any way (kill -9 included), so a dead
job never blocks the next one and no stale-lock clean-up exists. The file holds the holder's host,
pid and start time, which a refused job prints. A ``flock`` belongs to the open file, which a
``fork`` shares: forked children (DataLoader workers) close their copy at once, so a killed
holder's orphaned workers, still winding down, do not keep the directory locked. Local file
systems and NFSv4 (where Linux maps ``flock`` to byte-range locks the server arbitrates) enforce
it across machines; on file systems without working locks (some FUSE mounts, NFSv3 without
lockd) it only guards jobs on one host.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # this process's lock descriptors, closed in every forked child


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLocked(RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLocked` naming its holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another job ({holder}): wait for it to end or stop "
                            f"it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode() + b"\n")
        os.fsync(fd)
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown: its lock file is being written"
