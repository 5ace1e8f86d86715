"""Benchmarks. Each prints one JSON object (rank 0); results go in BENCHMARKS.md with the machine named.

    # training step: loader samples/s, training samples/s, and the split of Trainer.train_step
    # into data, forward, loss (gathers included), backward and optimizer time, per phase too
    torchrun --standalone --nproc_per_node=2 launch/bench.py train --config configs/demo_vsepp_synthetic.yaml
    # loader: xmdist's shard stream against a per-file PIL Dataset on the same JPEGs
    python launch/bench.py loader --data /tmp/xm_loader_bench --num 20000 --workers 2
    python launch/bench.py metrics --queries 2100 --db 193734 --bits 64 --labels 21 --loop-queries 200
    # CMFAH's global-batch triplets: sorted prefix sums against the (n, N, N) form, time and peak memory
    python launch/bench.py triplet --global-batch 1024 4096 16384 65536 --local 256
    # search: the exact numpy search, xmdist on faiss (flat, IVF, HNSW) and faiss called directly,
    # 10,000,000 64-bit codes and 1,000,000 256-d embeddings (--small: a minute)
    python launch/bench.py search --small
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xmdist.cli import HelpFormatter
from xmdist.benchmarks import graph, loader, metrics, search, train, triplet

BENCHMARKS = {"train": train, "loader": loader, "metrics": metrics, "graph": graph, "triplet": triplet,
              "search": search}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        sp = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_args(sp)
        sp.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = BENCHMARKS[args.bench].run(args)
    if result is not None:
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
