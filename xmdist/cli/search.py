"""Search an index written by launch/encode.py with a caption or an image.

    # text -> images: search the image index
    python launch/search.py --run-dir runs/demo --index indexes/demo-test --text "a red circle" -k 5
    # image -> captions: search the caption index (encode.py --captions); an image index also
    # works and returns the nearest images
    python launch/search.py --run-dir runs/demo --index indexes/demo-test-captions --image photo.jpg

The query is encoded with the run's model (by default the checkpoint the index was encoded
with) and the run's evaluation transform / vocabulary. Prints the top-k sample ids, scores and
the stored captions. Codes indexes: ``--mode hamming`` (the query's sign bits, the default) or
``asymmetric`` (the real-valued query against the ±1 codes); both are distances (lower is better).
Exit codes: 0 done, 2 bad input (missing run, checkpoint, index, wrong index kind), 1 other.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xmdist.cli import HelpFormatter
from xmdist.config import ConfigError
from xmdist.data.vocab import tokenize
from xmdist.methods.base import QueryError
from xmdist.tools.index import IndexFormatError, load_index, search_rows
from xmdist.tools.query import encode_captions, encode_images, unknown_words
from xmdist.tools.runs import RunError, load_run

METRICS = {"dot": "dot product, higher is better", "hamming": "Hamming distance, lower is better",
           "asymmetric": "asymmetric distance (K - q.b)/2, lower is better"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run-dir", "--run", dest="run", required=True, help="run directory whose model encodes the query")
    p.add_argument("--index", required=True, help="index directory written by launch/encode.py")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a caption: searches an image index")
    q.add_argument("--image", help="an image file: searches a caption index (or an image index)")
    p.add_argument("-k", type=int, default=5, help="results to print (default 5)")
    p.add_argument("--checkpoint", help="best, latest or step_X (default: the one the index was encoded with)")
    p.add_argument("--mode", default="hamming", choices=["hamming", "asymmetric"], help="codes indexes only")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.k < 1:
            raise RunError(f"-k must be >= 1, got {args.k}")
        if args.text is not None and not tokenize(args.text):
            raise QueryError(f"the text query {args.text!r} has no words")
        index = load_index(args.index)
        if len(index) == 0:
            raise IndexFormatError(f"{args.index} holds no items: encode a split with launch/encode.py")
        items = index.meta.get("items", "images")
        source = index.meta.get("source", {})
        if args.text is not None and items != "images":
            raise IndexFormatError(f"{args.index} is an index of {items}; a --text query searches an image index "
                                   f"(launch/encode.py --out)")
        loaded = load_run(args.run, args.checkpoint or source.get("checkpoint", "best"), args.device)
        wanted = "text" if args.text is not None else "image"
        if wanted not in loaded.method.query_inputs:
            raise RunError(f"{args.run} is a {loaded.config.method} run, whose method encodes no {wanted} "
                           f"queries: score it with launch/eval.py; search.py serves caption models")
        if source.get("run") and Path(source["run"]) != Path(args.run).resolve():
            print(f"warning: the index was encoded by {source['run']}, the query by {Path(args.run).resolve()}",
                  file=sys.stderr)
        elif source.get("checkpoint") and source["checkpoint"] != loaded.checkpoint:
            print(f"warning: the index was encoded with {source['checkpoint']}, the query with "
                  f"{loaded.checkpoint}", file=sys.stderr)
        t0 = time.perf_counter()
        if args.text is not None:
            unknown = unknown_words(loaded, args.text)
            if unknown and set(tokenize(args.text)) <= set(unknown):
                raise QueryError(f"no word of {args.text!r} is known to the run ({', '.join(unknown)} are not in its "
                                 f"vocabulary): the query would encode nothing but <unk>")
            if unknown:
                print(f"note: not in the vocabulary (encoded as <unk>): {', '.join(unknown)}", file=sys.stderr)
            query, what = encode_captions(loaded, args.text)[0], f'text "{args.text}" -> images'
        else:
            query = encode_images(loaded, [args.image])[0]
            what = f"image {args.image} -> " + ("captions" if items == "captions" else
                                                 "images (an image index: nearest images, not captions)")
        mode = "dot" if index.kind == "embedding" else args.mode
        rows, scores = search_rows(index, query.numpy(), args.k, mode="auto" if mode == "dot" else mode)
        ms = (time.perf_counter() - t0) * 1000
    except (ConfigError, RunError, IndexFormatError, QueryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = f"d={index.dim}" if index.kind == "embedding" else f"K={index.bits} bits"
    print(f"query: {what}")
    print(f"index: {args.index} ({len(index)} {items}, {index.kind} {size}, split "
          f"{source.get('split', '?')}); model {loaded.run_dir} {loaded.checkpoint}")
    print(f"score: {METRICS[mode]} (query encoded and searched in {ms:.0f} ms)")
    for rank, (row, score) in enumerate(zip(rows.tolist(), scores), 1):
        shown = f"{score:.4f}" if mode in ("dot", "asymmetric") else f"{int(score)}"
        print(f"{rank:3d}. id {int(index.ids[row])}  score {shown}")
        for c in index.captions[row]:
            print(f"       {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
