"""Fault injection for the reliability tests: ``XMDIST_FAULT`` makes a run fail on purpose.

    XMDIST_FAULT="KIND@STEP[:RANK][,KIND@STEP[:RANK]...]"

A fault fires once, at training step STEP (1-based, the step being computed), on rank RANK or
on every rank when RANK is left out. Kinds:

* ``nan``: the step's loss becomes NaN (the non-finite guard must skip the step on every rank);
* ``pause``: after the step, wait up to 120 s for a stop signal (lets a test send SIGTERM or a
  scheduler's pre-emption warning at a known step);
* ``sigterm`` / ``sigint`` / ``sigusr1``: after the step, the process signals itself;
* ``kill``: after the step, the process dies at once (SIGKILL: no handler, no checkpoint);
* ``hang``: after the step, the rank sleeps for an hour (the watchdog must end the run);
* ``enospc``: writing the checkpoint of that step fails on the rank as on a full disk.

Faults fire only on a first attempt, not in a process restarted by torchrun
(``TORCHELASTIC_RESTART_COUNT``) or a job requeued by SLURM (``SLURM_RESTART_COUNT``), so a
restarted run can show that it recovers.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

KINDS = ("nan", "pause", "sigterm", "sigint", "sigusr1", "kill", "hang", "enospc")
AFTER_STEP = ("pause", "sigterm", "sigint", "sigusr1", "kill", "hang")
ENV = "XMDIST_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, _, where = item.partition("@")
            step, _, rank = where.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{ENV}: cannot read {item!r}; expected KIND@STEP[:RANK]") from None
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        faults.append(fault)
    return faults


def _restarted() -> bool:
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


class FaultInjector:
    """The faults of ``XMDIST_FAULT`` that concern this rank (none in a restarted process)."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [] if _restarted() else [f for f in parse(spec) if f.rank in (None, rank)]
        if self.faults:
            log.warning("fault injection: %s", ", ".join(f"{f.kind}@{f.step}" for f in self.faults))

    def _due(self, step: int, kinds: tuple[str, ...]) -> list[Fault]:
        return [f for f in self.faults if f.step == step and f.kind in kinds]

    def corrupt_loss(self, step: int) -> bool:
        """True when the loss of ``step`` must become NaN."""
        return bool(self._due(step, ("nan",)))

    def disk_full(self, step: int) -> bool:
        """True when the checkpoint of ``step`` must fail as if the disk were full."""
        return bool(self._due(step, ("enospc",)))

    def after_step(self, step: int, stop_requested: Callable[[], bool]) -> None:
        for f in self._due(step, AFTER_STEP):
            log.warning("fault: %s after step %d", f.kind, step)
            if f.kind == "pause":
                log.warning("fault: pausing after step %d until a signal arrives", step)
                deadline = time.time() + 120
                while not stop_requested() and time.time() < deadline:
                    time.sleep(0.05)
            elif f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "hang":
                time.sleep(3600)
            else:
                os.kill(os.getpid(), getattr(signal, f.kind.upper()))
