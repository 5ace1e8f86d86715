"""The run-directory lock (xmdist/train/lock.py): refused while held, free as soon as its holder
dies, even while the holder's forked children (DataLoader workers) live on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from xmdist.train.lock import RunLock, RunLocked

HOLDER = textwrap.dedent("""
    import os, sys, time
    from xmdist.train.lock import RunLock
    RunLock(sys.argv[1]).acquire()
    child = os.fork()
    if child == 0:          # like a DataLoader worker: forked after the lock was taken, outlives its parent
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
""")


def test_a_held_directory_is_refused_naming_its_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLocked, match=rf"in use by another job \(host .*, pid {os.getpid()}, started "):
        RunLock(tmp_path).acquire()
    first.release()
    again = RunLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_a_killed_holder_frees_the_directory_while_its_forked_children_live(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(RunLocked):
            RunLock(tmp_path).acquire()
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=30)
        os.kill(child, 0)  # the forked child is still alive ...
        lock = RunLock(tmp_path)
        lock.acquire()  # ... and does not hold the directory
        lock.release()
    finally:
        proc.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
