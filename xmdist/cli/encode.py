"""Encode a shard split with a trained run into a retrieval index (see xmdist/tools/index.py).

    # the test split's images (what a text query searches), 2 processes
    torchrun --nproc_per_node=2 launch/encode.py --run-dir runs/demo --shards shards/synthetic \
        --split test --out indexes/demo-test
    # plus an index of the split's captions (what an image query searches)
    torchrun ... launch/encode.py ... --out indexes/demo-test --captions indexes/demo-test-captions
    # sign bits instead of float16 vectors (Hamming / asymmetric search)
    python launch/encode.py ... --codes
    # an approximate faiss index (pip install -e ".[search]"): IVF trained on 200,000 sampled rows
    torchrun ... launch/encode.py ... --index-type ivf --train-sample 200000 --nprobe 32

``--run-dir`` and ``--run`` are the same option; under torchrun only ``--run-dir`` works (torchrun's
own parser reads ``--run`` as an abbreviation of its ``--run-path``). Every rank encodes its share
of the split's shards (xmdist.eval.encode.encode_split), the rows are gathered on rank 0 ordered
by sample id (the index is the same whatever the number of processes), and rank 0 builds and
writes the index: the arrays and, with faiss installed, the faiss index of ``--index-type``
(auto: flat below 100,000 embeddings / 1,000,000 codes, else ivf; flat, ivf, hnsw; the parameters
and their defaults are in xmdist/tools/index.py), IVF trained on ``--train-sample`` rows drawn at
random (seed 0), rows added with a progress bar. ``--codes`` stores the sign bits (>= 0) of the
retrieval embedding: K = embedding dim bits.
Exit codes: 0 done, 2 bad input (missing run, checkpoint, shards; the message says which), 1 other.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from xmdist.cli import HelpFormatter, run_launcher
from xmdist.config import ConfigError
from xmdist.data.info import ShardError
from xmdist.data.webset import describe, open_shards
from xmdist.data.splits import read_split_captions
from xmdist.dist import DistEnv, init_distributed, on_main
from xmdist.eval.encode import encode_split
from xmdist.tools.index import IndexFormatError, check_index_type, check_target, resolve_type, save_index
from xmdist.tools.runs import RunError, load_run
from xmdist.train.logger import setup_console

log = logging.getLogger("xmdist.encode")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="run directory written by launch/train.py (under torchrun spell it --run-dir: torchrun "
                        "takes --run for an abbreviation of its own --run-path)")
    p.add_argument("--checkpoint", default="best", help="best (default), latest or step_XXXXXXXX")
    p.add_argument("--shards", help="shard set directory (default: the run's data.shards)")
    p.add_argument("--split", default="test", help="split to encode (default: test)")
    p.add_argument("--out", required=True, help="index directory of the split's images")
    p.add_argument("--captions", metavar="DIR", help="also write an index of the split's captions to DIR")
    p.add_argument("--codes", action="store_true", help="store packed sign bits instead of float16 vectors")
    p.add_argument("--index-type", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                   help="faiss index (auto: flat below 100,000 embeddings / 1,000,000 codes, else ivf)")
    p.add_argument("--nlist", type=int, default=0, help="ivf: lists (default: the power of two nearest sqrt(N))")
    p.add_argument("--nprobe", type=int, default=0, help="ivf: lists scanned per query, stored (default nlist/16, codes nlist/8)")
    p.add_argument("--hnsw-m", type=int, default=0, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=0, help="hnsw: build breadth (default 80)")
    p.add_argument("--ef-search", type=int, default=0, help="hnsw: search breadth, stored (default 128)")
    p.add_argument("--train-sample", type=int, default=100_000, help="ivf: rows k-means is trained on (default 100000)")
    p.add_argument("--batch-size", type=int, default=0, help="images per rank per step (default: eval.batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def write_indexes(args, loaded, shards, split, img, cap, encoded_ids, seconds: float) -> None:
    by_id = read_split_captions(split)
    ids = encoded_ids.tolist()  # row i is sample ids[i]: a damaged sample is in neither
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RunError(f"split '{split.name}': {len(missing)} encoded image(s) without readable captions, first "
                       f"id {missing[0]}")
    captions = [by_id[i] for i in ids]
    kind = "codes" if args.codes else "embedding"
    build = {"index_type": args.index_type, "params": search_params(args), "train_sample": args.train_sample,
             "progress": True}
    source = {"run": str(Path(args.run).resolve()), "checkpoint": loaded.checkpoint, "step": loaded.step,
              "method": loaded.config.method, "shards": describe(shards), "split": split.name}
    t0 = time.time()
    save_index(args.out, ids, img.numpy(), captions, kind, {"items": "images", "source": source}, **build)
    log.info("%d images (%s, %d-d, %s) of %s/%s encoded in %.1fs -> %s (%s; built in %.1fs)", len(ids), kind,
             img.shape[1], loaded.checkpoint, shards.root, split.name, seconds, args.out,
             describe_index(args.out), time.time() - t0)
    if args.captions:
        cap_ids = [i for i, caps in zip(ids, captions) for _ in caps]
        cap_text = [[c] for caps in captions for c in caps]
        if len(cap_ids) != len(cap):
            raise RunError(f"split '{split.name}': {len(cap)} captions encoded but {len(cap_ids)} readable")
        save_index(args.captions, cap_ids, cap.numpy(), cap_text, kind, {"items": "captions", "source": source},
                   **build)
        log.info("%d captions -> %s (%s)", len(cap_ids), args.captions, describe_index(args.captions))


def search_params(args) -> dict:
    return {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.hnsw_m, "ef_construction": args.ef_construction,
            "ef_search": args.ef_search}


def describe_index(path) -> str:
    """The search type and parameters index.json records, e.g. ``ivf nlist=1024 nprobe=64``."""
    search = json.loads((Path(path) / "index.json").read_text())["search"]
    return " ".join([search["type"], *(f"{k}={v}" for k, v in search["params"].items())]) + \
        ("" if search["file"] else ", no faiss file: numpy search")


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        env = DistEnv.from_environ(device=args.device)
        setup_console(env)
        loaded = load_run(args.run, args.checkpoint, env.device)  # every rank checks before any collective
        if not loaded.method.query_inputs:  # an index nobody can query
            raise RunError(f"{args.run} is a {loaded.config.method} run, whose method encodes no queries: "
                           f"score it with launch/eval.py; encode.py serves caption models")
        cfg = loaded.config
        shards = open_shards(cfg.data, args.shards)
        split = shards.split(args.split)
        for target in filter(None, (args.out, args.captions)):
            check_target(target)
        check_index_type(args.index_type)  # an approximate type without faiss: refused before encoding
        resolve_type("codes" if args.codes else "embedding", 1 << 30, args.index_type, train_sample=args.train_sample,
                     **search_params(args))  # negative parameters
        init_distributed(env, cfg.train.dist_timeout_s)
        t0 = time.time()
        out = encode_split(loaded.method, loaded.model, split, loaded.decoder, env,
                           args.batch_size or cfg.eval.batch_size, min(cfg.data.num_workers, 2), 0, loaded.autocast)
        img, cap = out["image"], out["text"]
        # rank 0 writes; a failure there stops every rank with the same error
        on_main(lambda: write_indexes(args, loaded, shards, split, img, cap, out["image_ids"], time.time() - t0), env)
        return 0

    return run_launcher(body, (ConfigError, ShardError, RunError, IndexFormatError, FileNotFoundError, OSError))


if __name__ == "__main__":
    sys.exit(main())
