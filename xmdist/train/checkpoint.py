"""Checkpoints: a directory per step, written atomically by all ranks together.

Layout under ``RUN/checkpoints/``::

    step_00001200/shared.pt      model, optimizer, scheduler, scaler, step, data position (rank 0)
    step_00001200/rank_00003.pt  per-rank state: RNGs, ZeRO optimizer partition
    latest                       text: name of the newest complete checkpoint
    best                         text: name of the checkpoint with the best validation score

A checkpoint is written into ``step_X.tmp/`` and renamed only when every rank has finished,
so a killed job never leaves a half-written ``step_X``. Files load with ``weights_only=True``.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from xmdist.config import ConfigError
from xmdist.io import write_text_atomic
from xmdist.dist import DistEnv, all_reduce_sum, barrier, gather_objects

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); nothing partial is left."""


def _safe_globals() -> list:
    """Classes besides tensors that DeepSpeed's optimizer states contain (allow-listed, nothing else)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path) -> dict:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": list(random.getstate()[1]),
            "numpy": {"keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pack_state(nets: dict, trainer: dict) -> tuple[dict, dict]:
    """(shared, rank) state of a run: every network's backend state, the trainer's counters,
    and this rank's random generators."""
    shared = {"nets": {k: b.shared_state() for k, b in nets.items()}, "trainer": trainer}
    rank = {"nets": {k: b.rank_state() for k, b in nets.items()}, "rng": rng_state()}
    return shared, rank


def unpack_state(nets: dict, shared: dict, rank: dict) -> dict:
    """Load :func:`pack_state`'s output into ``nets`` and the random generators; returns the
    trainer's counters."""
    for k, b in nets.items():
        b.load(shared["nets"][k], rank["nets"][k])
    set_rng_state(rank["rng"])
    return shared["trainer"]


def model_state(shared: dict, network: str = "model") -> dict:
    """The weights of ``network`` in a checkpoint's ``shared.pt`` (layout: ``nets/NAME/model``,
    ``NAME/`` holding the backend's :meth:`shared_state`)."""
    return shared["nets"][network]["model"]


def complete_steps(ckpt_dir: str | Path) -> list[str]:
    """Names of the complete checkpoints in ``ckpt_dir`` (``step_*``, not ``.tmp``), oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step_*") if not p.name.endswith(".tmp"))


def read_pointer(ckpt_dir: str | Path, name: str) -> str | None:
    """The checkpoint a pointer file (``latest``, ``best``) names, or None without one."""
    p = Path(ckpt_dir) / name
    return p.read_text().strip() if p.is_file() else None


class CheckpointManager:
    def __init__(self, run_dir: str | Path, env: DistEnv, keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.env, self.keep_last = env, keep_last
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        barrier()

    def _pointer(self, name: str) -> str | None:
        return read_pointer(self.dir, name)

    def save(self, step: int, shared: dict, rank: dict, best: bool = False,
             fail: bool = False) -> Path:
        """Collective: every rank writes its part, rank 0 publishes the directory. A write that
        fails on any rank (disk full, quota, I/O error) removes the partial directory on every
        rank's behalf and raises :class:`CheckpointWriteError` on all of them; ``latest`` still
        names the previous checkpoint. ``fail``: this rank's write raises ENOSPC (fault injection)."""
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        error = ""
        try:
            if fail:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            torch.save(rank, tmp / f"rank_{self.env.rank:05d}.pt")
            if self.env.is_main:
                torch.save(shared, tmp / "shared.pt")
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError (iostream error)
            error = f"rank {self.env.rank}: {type(e).__name__}: {e}"
        errors = [e for e in gather_objects(error) if e]
        if errors:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            free = shutil.disk_usage(self.dir).free / 2**20
            previous = self._pointer("latest") or "none"
            raise CheckpointWriteError(
                f"could not write checkpoint {tmp} ({'; '.join(errors)}); {free:,.0f} MiB free on its file system. "
                f"The partial checkpoint was removed; the latest complete one is {previous}. Free space (or "
                f"lower train.keep_last), then rerun the command to resume from it")
        barrier()
        if self.env.is_main:
            if final.exists():  # the same step saved again (e.g. after a final evaluation)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.dir / "latest", name)
            if best:
                write_text_atomic(self.dir / "best", name)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        keep = {self._pointer("best"), self._pointer("latest")}
        steps = complete_steps(self.dir)
        for name in steps[: max(0, len(steps) - self.keep_last)]:
            if name not in keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def candidates(self) -> list[str]:
        """Complete checkpoints, newest first, ``latest`` first of all."""
        steps = complete_steps(self.dir)[::-1]
        latest = self._pointer("latest")
        return ([latest] if latest in steps else []) + [s for s in steps if s != latest]

    def _check_world(self, name: str) -> None:
        """A complete checkpoint holds rank_00000.pt .. rank_{W-1}.pt: one written by another number
        of ranks is refused (not skipped as unreadable, which would start the run over)."""
        found = (re.fullmatch(r"rank_(\d+)", p.stem) for p in (self.dir / name).glob("rank_*.pt"))
        ranks = sorted(int(m.group(1)) for m in found if m)
        if ranks and ranks == list(range(len(ranks))) and len(ranks) != self.env.world_size:
            raise ConfigError(f"checkpoint {name} in {self.dir} was written by {len(ranks)} rank(s), this run has "
                              f"{self.env.world_size}: resume with as many (the global batch and the data order "
                              f"depend on it), or use a new --out")

    def load(self, name: str | None = None) -> tuple[str, dict, dict] | None:
        """Collective: load ``name`` (default: newest valid) -> (name, shared, rank state).

        A checkpoint that any rank cannot read (truncated, or needing to unpickle more than
        tensors) is skipped with a warning, on all ranks alike. None: there is no checkpoint;
        checkpoints that all fail to load are an error, never a silent start from step 0.
        """
        names = [name] if name else self.candidates()
        for cand in names:
            self._check_world(cand)
            try:
                shared = load_file(self.dir / cand / "shared.pt")
                rank = load_file(self.dir / cand / f"rank_{self.env.rank:05d}.pt")
                ok = 1
            except pickle.UnpicklingError as e:  # weights_only refused a global: never unpickled
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                what = found.group(1) if found else str(e).splitlines()[0]
                log.warning("checkpoint %s refused on rank %d: it needs unpickling %s, which is neither a tensor "
                            "nor an allow-listed class (files load with torch.load(weights_only=True); nothing "
                            "was unpickled)", cand, self.env.rank, what)
                ok = 0
            except Exception as e:  # truncated or missing file
                log.warning("checkpoint %s unreadable on rank %d: %s", cand, self.env.rank, e)
                ok = 0
            if int(all_reduce_sum(torch.tensor([ok], device=self.env.device)).item()) == self.env.world_size:
                return cand, shared, rank
        if name:
            raise FileNotFoundError(f"checkpoint {self.dir / name} could not be loaded on every rank")
        if names:
            raise FileNotFoundError(f"none of the {len(names)} checkpoint(s) in {self.dir} could be loaded on every "
                                    f"rank (see the warnings above): move them away or pass --resume none to start "
                                    f"over, or use a new --out")
        return None

    def best_name(self) -> str | None:
        return self._pointer("best")

    def latest_name(self) -> str | None:
        return self._pointer("latest")
