"""Train a retrieval model.

    # one process
    python launch/train.py --config configs/demo_vsepp_synthetic.yaml --out runs/demo
    # 8 GPUs on one node (CPU: gloo, GPU: nccl)
    torchrun --nproc_per_node=8 launch/train.py --config configs/vsepp_coco.yaml --out runs/coco
    # overrides and resume
    torchrun ... launch/train.py --config ... --out runs/coco --set optim.lr=1e-4 --resume auto
    # a new run from another run's weights (fine-tuning)
    torchrun ... launch/train.py --config ... --out runs/f30k --init-from runs/coco

SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-emption warning) stop every rank after the current step
with a checkpoint; rerunning the same command resumes there.

Exit codes: 0 done, 2 bad configuration or input (the message names the key or file), 3 no
progress for train.watchdog_s (every thread's stack is printed), 4 diverged (train.max_nonfinite
non-finite steps in a row), 128 + N stopped by signal N after checkpointing, 1 other errors.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import sys
from pathlib import Path

from xmdist.cli import HelpFormatter, run_launcher
from xmdist.config import ConfigError
from xmdist.data.info import ShardError
from xmdist.dist import DistEnv, init_distributed
from xmdist.methods import load_config
from xmdist.train.checkpoint import CheckpointWriteError
from xmdist.train.logger import setup_console
from xmdist.train.trainer import NonFiniteError, Stopped, Trainer

log = logging.getLogger("xmdist.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults apply where it is silent")
    p.add_argument("--out", help="run directory: config, vocab, checkpoints, tb/, eval.json (required unless "
                                 "--print-config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", default="auto", type=resume_choice,
                   help="auto: continue from the newest valid checkpoint in --out if any, else start; "
                        "latest: the same, but refuse to start without one; none: start fresh; "
                        "step_XXXXXXXX or best: that checkpoint of --out")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from another run's weights: its run directory (best checkpoint, else latest) or "
                        "one checkpoint directory RUN/checkpoints/step_XXXXXXXX; weights only (optimizer, "
                        "schedule and data position start fresh), its vocabulary is copied; ignored when --out "
                        "already holds checkpoints (the run resumes)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    if not args.out and not args.print_config:
        p.error("the following arguments are required: --out")
    return args


def resume_choice(value: str) -> str:
    """``--resume``: auto | latest | none (any case) or a checkpoint name of the run directory."""
    if value.lower() in ("auto", "latest", "none", "best"):
        return value.lower()
    if "/" in value or "\\" in value or value in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{value!r} is a path: --resume takes a checkpoint name of --out (step_XXXXXXXX, best, latest, "
            f"auto or none); to continue another run, pass its directory as --out; to start a new run "
            f"from its weights, use --init-from {value}")
    if not re.fullmatch(r"step_\d{8}", value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto, latest, none, best or step_XXXXXXXX "
                                         f"(a directory name under --out/checkpoints)")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)  # every rank validates before any work
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        env = DistEnv.from_environ(device=cfg.train.device)
        setup_console(env)
        init_distributed(env, cfg.train.dist_timeout_s)
        new_dir = env.is_main and not Path(args.out).exists()
        try:
            trainer = Trainer(cfg, env, args.out, args.resume, args.init_from)
        except BaseException:
            if new_dir:  # a refused start leaves no run directory behind (only what it had just written)
                shutil.rmtree(args.out, ignore_errors=True)
            raise
        try:
            trainer.fit()
        except Stopped as stop:
            log.warning("stopped by %s at step %d; the checkpoint is in %s: rerun the same command to resume",
                        signal.Signals(stop.signum).name, stop.step, args.out)
            return stop.code
        except NonFiniteError as e:
            log.error("%s", e)
            return 4
        finally:
            trainer.close()
        return 0

    return run_launcher(body, (ConfigError, ShardError, FileNotFoundError, CheckpointWriteError))


if __name__ == "__main__":
    sys.exit(main())
