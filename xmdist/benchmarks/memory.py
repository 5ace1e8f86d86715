"""Peak memory of a block of work, for the benchmarks that run each configuration in a fresh
process (:func:`in_fresh_process`).

On CPU: the peak resident-set increase over the block. The kernel's high-water mark (``VmHWM``)
is reset to the current RSS by writing 5 to ``/proc/self/clear_refs`` just before the block, and
``ru_maxrss`` after it minus the RSS before it is the exact peak (no sampling). Where the reset
is refused, ``ru_maxrss`` minus RSS includes earlier peaks (``"peak_exact": false``). On CUDA:
``torch.cuda.max_memory_allocated`` over the block minus the memory allocated before it.
"""
from __future__ import annotations

import os
import resource
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable

import torch

GB = 2**30


def rss() -> int:
    """This process's resident set, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``, then ``peak.gb`` and ``peak.exact``."""

    def __init__(self, device: torch.device):
        self.device, self.gb, self.exact = device, 0.0, True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.exact = False
            self.base = rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.gb = peak / GB


def in_fresh_process(fn: Callable, *args) -> dict:
    """``fn(*args)`` (a module-level function returning a dict) in a spawned process; an error
    (e.g. the process killed for memory) is reported as ``{"error": ...}``."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
            return {"error": f"{type(e).__name__}: {e}"}
