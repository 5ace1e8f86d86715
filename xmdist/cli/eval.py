"""Evaluate a checkpoint of a run: metrics to JSON, metrics and retrieval examples to TensorBoard.

    # the best validation checkpoint on the test split, 2 processes (same numbers as the run's eval.json)
    torchrun --nproc_per_node=2 launch/eval.py --run-dir runs/demo --split test --out results.json
    # another checkpoint, COCO-1K protocol, another TensorBoard directory
    torchrun ... launch/eval.py --run-dir runs/coco --checkpoint step_00012000 --folds 5 \
        --out coco1k.json --tb runs/coco/tb_eval_1k

    # a hashing run (DJSRH, SGRN): test queries against the training set as database
    torchrun ... launch/eval.py --run-dir runs/sgrn64 --split query --database retrieval --out sgrn64.json

``--mode`` is the run's evaluation protocol (``xmdist.eval``): ``common`` (common-space
R@1/5/10, medr, meanr, rsum) or ``hamming`` (sign codes of the query split against the database
split: mAP@all, mAP@K in both conventions, P@K, the PR curve over Hamming radius and the chance
level). Every rank encodes its share once. TensorBoard (``--tb``, default RUN/tb_eval; ``--tb
none`` skips it) gets the metrics as scalars ``SPLIT/...``, the curves drawn as images and
retrieval examples over the whole split (``xmdist/eval/report.py``), at the checkpoint's step.
Exit codes: 0 done, 2 bad input (missing run, checkpoint, shards; the message says which), 1 other.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from xmdist.cli import HelpFormatter, run_launcher
from xmdist.config import ConfigError
from xmdist.data.info import ShardError
from xmdist.data.webset import describe, open_shards
from xmdist.dist import DistEnv, init_distributed
from xmdist.eval import EvalRequest, get_protocol, known_protocols
from xmdist.tools.runs import RunError, load_run
from xmdist.train.logger import setup_console

log = logging.getLogger("xmdist.eval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run-dir", "--run", dest="run",
                   help="run directory written by launch/train.py (under torchrun spell it --run-dir: torchrun "
                        "takes --run for an abbreviation of its own --run-path)")
    p.add_argument("--checkpoint", help="best, latest or step_XXXXXXXX of the run (default: best)")
    p.add_argument("--which", help=argparse.SUPPRESS)  # the earlier name of --checkpoint
    p.add_argument("--shards", help="shard set directory (default: the run's data.shards)")
    p.add_argument("--split", help="split to evaluate (default: the run's data.test_split)")
    p.add_argument("--folds", type=int, help="1: whole split; 5: COCO-1K (default: the run's eval.folds)")
    p.add_argument("--mode", choices=known_protocols(), help="evaluation protocol (default: the method's)")
    p.add_argument("--database", help="hamming: the retrieval split (default: eval.database_split or the "
                                      "training split)")
    p.add_argument("--topk", type=int, default=50, help="hamming: K of mAP@K (default 50)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--tb", help="TensorBoard directory (default RUN_DIR/tb_eval; 'none': no TensorBoard)")
    p.add_argument("--examples", type=int, default=4, help="query images and captions shown (default 4)")
    p.add_argument("--batch-size", type=int, default=0, help="images per rank per step (default: eval.batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.run is None and args.checkpoint and Path(args.checkpoint).is_dir():
        # the earlier spelling: --checkpoint RUN_DIR [--which NAME]
        print("note: --checkpoint RUN_DIR is now --run RUN_DIR (--checkpoint names the checkpoint)", file=sys.stderr)
        args.run, args.checkpoint = args.checkpoint, None
    if args.run is None:
        p.error("the following arguments are required: --run")
    args.checkpoint = args.checkpoint or args.which or "best"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        env = DistEnv.from_environ(device=args.device)
        setup_console(env)
        loaded = load_run(args.run, args.checkpoint, env.device, shards=args.shards)  # checked before collectives
        cfg, method = loaded.config, loaded.method
        args.mode = args.mode or method.protocol
        if args.mode != method.protocol:
            raise RunError(f"--mode {args.mode}: {args.run} is a {cfg.method} run, evaluated with "
                           f"--mode {method.protocol}")
        shards = open_shards(cfg.data, args.shards)
        split = shards.split(args.split or cfg.data.test_split)
        args.folds = cfg.eval.folds if args.folds is None else args.folds
        if args.folds < 1 or args.examples < 1:
            raise RunError(f"--folds and --examples must be >= 1 (got --folds {args.folds}, --examples {args.examples})")
        if args.folds > split.num_samples:
            raise RunError(f"--folds {args.folds}: split '{split.name}' has {split.num_samples} images, fewer than "
                           f"one per fold (5 folds of 1,000 is the COCO-1K protocol; 1: the whole split)")
        tb = None if args.tb == "none" else (args.tb or str(Path(args.run) / "tb_eval"))
        init_distributed(env, cfg.train.dist_timeout_s)
        protocol = get_protocol(args.mode)
        req = EvalRequest(method, loaded.model, loaded.decoder, shards, split, env,
                          args.batch_size or cfg.eval.batch_size, cfg.data.num_workers, loaded.autocast,
                          folds=args.folds, database=args.database or "", topk=args.topk, curves=True)
        metrics, encoded = protocol.run(req)
        if env.is_main:
            result = {"run": str(Path(args.run).resolve()), "split": split.name,
                      "checkpoint": loaded.checkpoint, "step": loaded.step, "folds": args.folds, "mode": args.mode,
                      "shards": describe(shards), **metrics}
            if tb:
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(tb) as writer:
                    result.update(protocol.report(req, metrics, encoded, writer, loaded.step, loaded.checkpoint,
                                                  args.examples))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            log.info("%s of %s (%s) -> %s%s", args.mode, split.name, loaded.checkpoint, args.out,
                     f", TensorBoard {tb}" if tb else "")
        return 0

    return run_launcher(body, (ConfigError, ShardError, RunError, FileNotFoundError))
