"""``--init-from``: start a new run from another run's weights.

Only the weights of each network are taken (no optimizer, schedule, step, random state or data
position: the new run starts at step 1). The files of the source run that its weights are tied
to (``Method.run_files``: a vocabulary, word vectors) are copied into the new run first, so
token ids mean what they meant in training; a copy already in the new run must be identical.

    torchrun ... launch/train.py --config ... --out runs/finetune --init-from runs/pretrain
    torchrun ... launch/train.py ... --init-from runs/pretrain/checkpoints/step_00001200
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xmdist.config import ConfigError
from xmdist.dist import DistEnv, on_main
from xmdist.models.backbones import state_mismatches
from xmdist.train.checkpoint import load_file, model_state, read_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitSource:
    run_dir: Path  # the source run (config.yaml, run files)
    checkpoint: Path  # the checkpoint directory whose shared.pt holds the weights


def resolve(path: str | Path, out: str | Path) -> InitSource:
    """A run directory (its best checkpoint, else its latest) or one checkpoint directory of it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--init-from {p}: no such run or checkpoint directory")
    if (p / "shared.pt").is_file():
        run_dir, ckpt = p.parent.parent, p
    elif (p / "checkpoints").is_dir():
        run_dir, ckpts = p, p / "checkpoints"
        names = (read_pointer(ckpts, "best"), read_pointer(ckpts, "latest"))
        found = [ckpts / n for n in names if n and (ckpts / n / "shared.pt").is_file()]
        if not found:
            raise FileNotFoundError(f"--init-from {p}: the run holds no complete checkpoint (checkpoints/best or "
                                    f"checkpoints/latest naming a directory with shared.pt)")
        ckpt = found[0]
    else:
        raise FileNotFoundError(f"--init-from {p}: neither a run directory (with checkpoints/) nor a checkpoint "
                                f"directory (with shared.pt)")
    if Path(out).resolve() == run_dir.resolve():
        raise ConfigError(f"--init-from {p} is a checkpoint of --out itself: use --resume {ckpt.name} to continue it")
    return InitSource(run_dir, ckpt)


def check_method(source: InitSource, method: str) -> None:
    from xmdist.methods import load_config

    cfg_path = source.run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--init-from: {cfg_path} is missing: not a run directory written by launch/train.py")
    other = load_config(cfg_path).method
    if other != method:
        raise ConfigError(f"--init-from {source.checkpoint}: trained with method {other}, this run is {method}")


def inherit_files(names: tuple[str, ...], source: InitSource, run_dir: Path, env: DistEnv) -> None:
    """Copy the source run's ``names`` into ``run_dir`` (rank 0); one already there must be identical."""
    def copy() -> None:
        for name in names:
            src, dst = source.run_dir / name, Path(run_dir) / name
            if not src.is_file():
                raise FileNotFoundError(f"--init-from: {src} is missing: the weights of {source.checkpoint} "
                                        f"cannot be used without it")
            if dst.is_file():
                if dst.read_bytes() != src.read_bytes():
                    raise ConfigError(f"--init-from: {dst} differs from {src}: the weights of {source.checkpoint} "
                                      f"were trained with the latter; use a new --out")
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            log.info("--init-from: %s -> %s", src, dst)

    on_main(copy, env)


def load_weights(modules: dict[str, nn.Module], source: InitSource) -> None:
    """Every network's weights from the source checkpoint (read on each rank, never unpickled)."""
    shared = load_file(source.checkpoint / "shared.pt")
    nets = shared.get("nets", {})
    absent = [name for name in modules if name not in nets]
    if absent:
        raise ConfigError(f"--init-from {source.checkpoint}: holds networks {', '.join(sorted(nets))}, this run "
                          f"also trains {', '.join(absent)}")
    for name, module in modules.items():
        state = model_state(shared, name)
        own = module.state_dict()
        missing, unexpected, shaped = state_mismatches(own, state)
        bad = [*(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in shaped),
               *(f"{k} (missing)" for k in missing),
               *(f"{k} (not in this model)" for k in unexpected)]
        if bad:
            raise ConfigError(f"--init-from {source.checkpoint}: network {name} does not match this config's "
                              f"({len(bad)} tensor(s); first: {'; '.join(bad[:3])}): change model.* back to the "
                              f"source run's (its config.yaml)")
        with torch.no_grad():
            module.load_state_dict(state)
    step = shared.get("trainer", {}).get("step", "?")
    log.info("initialised %s from %s (step %s of %s); optimizer, schedule and data position start fresh",
             ", ".join(modules), source.checkpoint, step, source.run_dir)
