"""Load a trained run for inference: its config, method, decoder and retrieval model.

    loaded = load_run("runs/demo", checkpoint="best")       # or "latest", "step_00001200"
    q = encode_captions(loaded, ["a red circle"])          # xmdist.tools.query: (1, d)

A run directory is what ``launch/train.py --out`` writes: ``config.yaml``, what the method
prepared (``vocab.json`` for caption methods) and ``checkpoints/{step_*/shared.pt, latest,
best}``. The method is built exactly as training built it (``prepare`` with ``train=False``,
then ``make_decoder`` and ``build``), so a query is encoded as the evaluation encodes the
split. Problems with the run raise :class:`RunError` (the launchers print it and exit 2).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmdist.config import Config
from xmdist.data.info import ShardSet
from xmdist.data.webset import open_shards
from xmdist.dist import DistEnv
from xmdist.methods import Method, get_method, load_config
from xmdist.train.backends import DTYPES
from xmdist.train.checkpoint import load_file, model_state

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run directory or checkpoint is missing, incomplete or does not fit its config."""


@dataclass
class Loaded:
    run_dir: Path
    config: Config
    method: Method
    model: nn.Module  # the retrieval model, eval mode, on ``device``
    checkpoint: str  # resolved name, e.g. "step_00000040"
    step: int
    device: torch.device
    decoder: Any  # the method's sample decoder (evaluation views of images, texts)

    def autocast(self):
        """The precision the run evaluated in (DDP: autocast; DeepSpeed: low-precision weights, see load_run)."""
        dtype = DTYPES[self.config.train.precision]
        if dtype is None or self.config.train.backend == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


class _LazyShards:
    """The shard set a run reads, opened on first use: methods that need nothing from it for
    inference (caption methods) then run without it."""

    def __init__(self, data, path: str | Path | None):
        self.data, self.path = data, path

    @cached_property
    def _shards(self) -> ShardSet:
        return open_shards(self.data, self.path)

    def __getattr__(self, name: str):
        return getattr(self._shards, name)


def resolve_checkpoint(run_dir: Path, checkpoint: str = "best") -> str:
    """``best`` / ``latest`` / ``step_X`` (``step_40`` and ``40`` work too) -> an existing directory name."""
    ckdir = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckdir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not steps:
        raise RunError(f"no checkpoint in {ckdir}: training has not written one yet")
    if checkpoint in ("best", "latest"):
        pointer = ckdir / checkpoint
        if checkpoint == "best" and not pointer.is_file():
            log.warning("%s has no 'best' pointer (never validated): using 'latest'", ckdir)
            pointer = ckdir / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else steps[-1]
        if name not in steps:
            raise RunError(f"{pointer} names {name}, which is not in {ckdir} (has: {', '.join(steps)})")
        return name
    m = re.fullmatch(r"(?:step_)?(\d+)", checkpoint)
    name = f"step_{int(m.group(1)):08d}" if m else checkpoint
    if name not in steps:
        raise RunError(f"checkpoint {checkpoint!r} not in {ckdir} (has: best, latest, {', '.join(steps)})")
    return name


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu",
             method: str | None = None, shards: str | Path | None = None) -> Loaded:
    """Config, method, decoder and the retrieval model of ``checkpoint``, in eval mode on ``device``.

    ``method``: refuse a run of another method (e.g. a tool that needs hash codes). ``shards``:
    the data the run will read (default its ``data.shards``); methods that size their model from
    the data read it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir / 'config.yaml'} is missing: not a run directory written by launch/train.py")
    cfg = load_config(run_dir / "config.yaml")
    if method and cfg.method != method:
        raise RunError(f"{run_dir} is a {cfg.method} run; this needs method {method}")
    build_cfg = copy.deepcopy(cfg)
    if hasattr(build_cfg.model, "weights"):
        build_cfg.model.weights = None  # the checkpoint has the weights: never download pretrained ones
    impl = get_method(cfg.method)(build_cfg, DistEnv())
    data = _LazyShards(cfg.data, shards)
    try:
        impl.prepare(data, run_dir, train=False)
    except FileNotFoundError as e:
        raise RunError(str(e)) from None
    name = resolve_checkpoint(run_dir, checkpoint)
    path = run_dir / "checkpoints" / name / "shared.pt"
    try:
        shared = load_file(path)
        trainer = shared["trainer"]
        state = model_state(shared)
    except Exception as e:  # missing, truncated or not an xmdist checkpoint
        raise RunError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from None
    if trainer["method"] != cfg.method:
        raise RunError(f"checkpoint {path} was trained with method {trainer['method']}, but "
                       f"{run_dir / 'config.yaml'} says {cfg.method}")
    model = impl.build()["model"].module
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"checkpoint {path} does not fit the model of {run_dir / 'config.yaml'}: {e}") from None
    dtype = DTYPES[cfg.train.precision]
    if dtype is not None and cfg.train.backend == "deepspeed":
        model.to(dtype)  # as the engine held it: low-precision parameters and buffers
    device = torch.device(device)
    model.to(device).eval()
    return Loaded(run_dir, cfg, impl, model, name, int(trainer["step"]), device, impl.make_decoder(data))
