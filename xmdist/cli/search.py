"""Search an index written by launch/encode.py with a caption, an image, or a file of queries.

    # text -> images: search the image index
    python launch/search.py --run-dir runs/demo --index indexes/demo-test --text "a red circle" -k 5
    # image -> captions: search the caption index (encode.py --captions); an image index also
    # works and returns the nearest images
    python launch/search.py --run-dir runs/demo --index indexes/demo-test-captions --image photo.jpg
    # many queries, one a line (an existing file is an image query, any other line a caption),
    # encoded and searched in batches; one JSON object a line to --out (default stdout)
    python launch/search.py --run-dir runs/demo --index indexes/demo-test --queries queries.txt --out hits.jsonl
    # recall@k of an approximate (ivf / hnsw) index against exact search, on 1000 of its own rows
    python launch/search.py --index indexes/big --check-recall 1000 -k 10 --nprobe 32

The query is encoded with the run's model (by default the checkpoint the index was encoded
with) and the run's evaluation transform / vocabulary. Prints the top-k sample ids, scores and
the stored captions. Codes indexes: ``--mode hamming`` (the query's sign bits, the default) or
``asymmetric`` (the real-valued query against the ±1 codes, always exact); both are distances
(lower is better). ``--nprobe`` (ivf) and ``--ef-search`` (hnsw) override the index's search
parameters; ``--exact`` searches exhaustively whatever the index type.

``--queries`` output, one line per query in file order: ``{"query": LINE, "kind": "text" |
"image", "results": [{"id", "score", "captions"}, ...]}``; a query that cannot be encoded (no
known word, an unreadable image) gets ``"error": "..."`` and no results, and the others go on.
``--check-recall N`` needs no run when it samples N rows of the index itself (seed 0; with
``--queries`` the first N queries are used, encoded by the run); it prints recall@k (module doc of
xmdist.tools.index: rows tied with the exact k-th score count as hits) and both searches' times,
and no results.
Exit codes: 0 done, 2 bad input (missing run, checkpoint, index, wrong index kind), 1 other.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from xmdist.cli import HelpFormatter
from xmdist.config import ConfigError
from xmdist.data.vocab import tokenize
from xmdist.methods.base import QueryError
from xmdist.tools.index import (IndexFormatError, load_index, prepare_queries, recall_at_k, search_batch,
                                search_rows, set_search_params)
from xmdist.tools.query import encode_captions, encode_images, image_tensor, unknown_words
from xmdist.tools.runs import RunError, load_run

METRICS = {"dot": "dot product, higher is better", "hamming": "Hamming distance, lower is better",
           "asymmetric": "asymmetric distance (K - q.b)/2, lower is better"}
BATCH = 256  # queries of a --queries file read, encoded and searched together


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run-dir", "--run", dest="run",
                   help="run directory whose model encodes the queries (not needed by --check-recall alone)")
    p.add_argument("--index", required=True, help="index directory written by launch/encode.py")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--text", help="a caption: searches an image index")
    q.add_argument("--image", help="an image file: searches a caption index (or an image index)")
    q.add_argument("--queries", metavar="FILE",
                   help="one query a line: an existing image file path, else a caption; JSONL results")
    p.add_argument("--out", metavar="FILE", help="--queries: write the JSONL here (default stdout)")
    p.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--checkpoint", help="best, latest or step_X (default: the one the index was encoded with)")
    p.add_argument("--mode", default="hamming", choices=["hamming", "asymmetric"], help="codes indexes only")
    p.add_argument("--nprobe", type=int, default=0, help="ivf index: lists scanned per query (default: the index's)")
    p.add_argument("--ef-search", type=int, default=0, help="hnsw index: search breadth (default: the index's)")
    p.add_argument("--exact", action="store_true", help="exhaustive search even where the index is approximate")
    p.add_argument("--check-recall", type=int, metavar="N",
                   help="print recall@k of the index against exact search on N queries (rows of the index, "
                        "or the first N of --queries)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.k < 1:
        raise RunError(f"-k must be >= 1, got {args.k}")
    if args.nprobe < 0 or args.ef_search < 0:
        raise RunError(f"--nprobe and --ef-search must be >= 1 (got {args.nprobe}, {args.ef_search})")
    if args.check_recall is not None and args.check_recall < 1:
        raise RunError(f"--check-recall must be >= 1 (queries to compare), got {args.check_recall}")
    if args.check_recall and (args.text is not None or args.image or args.out):
        raise RunError("--check-recall takes its queries from the index's rows or from --queries and prints "
                       "only the recall: drop --text / --image / --out")
    if args.out and not args.queries:
        raise RunError("--out writes the results of --queries FILE: give --queries")
    if not (args.text is not None or args.image or args.queries or args.check_recall):
        raise RunError("nothing to search: give --text, --image, --queries FILE or --check-recall N")
    if (args.text is not None or args.image or args.queries) and not args.run:
        raise RunError("--run-dir is needed to encode the queries (only --check-recall on the index's own rows "
                       "works without a run)")
    if args.text is not None and not tokenize(args.text):
        raise QueryError(f"the text query {args.text!r} has no words")


def open_index(args):
    index = load_index(args.index)
    if len(index) == 0:
        raise IndexFormatError(f"{args.index} holds no items: encode a split with launch/encode.py")
    set_search_params(index, nprobe=args.nprobe, ef_search=args.ef_search)
    return index


def open_run(args, index, wanted: set[str]):
    source = index.meta.get("source", {})
    items = index.meta.get("items", "images")
    if "text" in wanted and items != "images":
        raise IndexFormatError(f"{args.index} is an index of {items}; a --text query searches an image index "
                               f"(launch/encode.py --out)")
    loaded = load_run(args.run, args.checkpoint or source.get("checkpoint", "best"), args.device)
    for kind in sorted(wanted):
        if kind not in loaded.method.query_inputs:
            raise RunError(f"{args.run} is a {loaded.config.method} run, whose method encodes no {kind} "
                           f"queries: score it with launch/eval.py; search.py serves caption models")
    if source.get("run") and Path(source["run"]) != Path(args.run).resolve():
        print(f"warning: the index was encoded by {source['run']}, the query by {Path(args.run).resolve()}",
              file=sys.stderr)
    elif source.get("checkpoint") and source["checkpoint"] != loaded.checkpoint:
        print(f"warning: the index was encoded with {source['checkpoint']}, the query with "
              f"{loaded.checkpoint}", file=sys.stderr)
    return loaded


def search_mode(index, args) -> tuple[str, str]:
    """(what the score is, the mode to pass to the search)."""
    if index.kind == "embedding":
        return "dot", "auto"
    return args.mode, args.mode


def read_queries(path: str) -> list[tuple[str, str]]:
    """The non-empty lines of ``path`` as (line, "image" | "text")."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise RunError(f"--queries {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read --queries {path}: {e}") from None
    queries = [(line, "image" if Path(line).is_file() else "text") for line in lines if line]
    if not queries:
        raise RunError(f"--queries {path} holds no query (one caption or image path a line)")
    return queries


def encode_lines(loaded, lines: list[tuple[str, str]]) -> tuple[list, list[str | None]]:
    """Encode one batch of query lines -> (vector or None per line, error or None per line)."""
    errors: list[str | None] = [None] * len(lines)
    vectors: list = [None] * len(lines)
    texts, images = [], []
    for i, (line, kind) in enumerate(lines):
        if kind == "image":
            try:
                images.append((i, image_tensor(loaded, line)))
            except (RunError, FileNotFoundError, OSError) as e:
                errors[i] = str(e)
            continue
        unknown = unknown_words(loaded, line) if tokenize(line) else []
        if not tokenize(line):
            errors[i] = "the caption has no words"
        elif set(tokenize(line)) <= set(unknown):
            errors[i] = f"no word is known to the run ({', '.join(unknown)} are not in its vocabulary)"
        else:
            texts.append(i)
    if texts:
        for i, v in zip(texts, encode_captions(loaded, [lines[i][0] for i in texts])):
            vectors[i] = v.numpy()
    if images:
        for (i, _), v in zip(images, encode_images(loaded, [t for _, t in images])):
            vectors[i] = v.numpy()
    return vectors, errors


def run_queries(args, index, loaded, out) -> tuple[int, int, float]:
    """Search every line of --queries in batches, one JSON object a line -> (queries, errors, seconds)."""
    queries = read_queries(args.queries)
    _, mode = search_mode(index, args)
    integer = index.kind == "codes" and mode == "hamming"
    n_err, t0 = 0, time.perf_counter()
    for s in range(0, len(queries), BATCH):
        batch = queries[s:s + BATCH]
        vectors, errors = encode_lines(loaded, batch)
        ok = [i for i, v in enumerate(vectors) if v is not None]
        rows = scores = None
        if ok:
            rows, scores = search_batch(index, np.stack([vectors[i] for i in ok]), args.k, mode, exact=args.exact)
        place = {i: j for j, i in enumerate(ok)}
        for i, (line, kind) in enumerate(batch):
            record = {"query": line, "kind": kind, "results": []}
            if errors[i]:
                record["error"] = errors[i]
                n_err += 1
            else:
                j = place[i]
                for r, sc in zip(rows[j].tolist(), scores[j].tolist()):
                    if r >= 0:
                        record["results"].append({"id": int(index.ids[r]), "score": int(sc) if integer else
                                                  round(float(sc), 6), "captions": index.captions[r]})
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(queries), n_err, time.perf_counter() - t0


def check_recall(args, index, loaded) -> None:
    """Print recall@k of the index's own search against exact search on N queries."""
    metric, mode = search_mode(index, args)
    if loaded is not None:
        lines = read_queries(args.queries)[: args.check_recall]
        vectors, _ = encode_lines(loaded, lines)
        q = np.stack([v for v in vectors if v is not None]) if any(v is not None for v in vectors) else None
        if q is None:
            raise QueryError(f"none of the first {len(lines)} queries of {args.queries} could be encoded")
        where = f"{len(q)} queries of {args.queries}"
    else:
        rows = np.sort(np.random.default_rng(0).choice(len(index), min(args.check_recall, len(index)), replace=False))
        q = index.data[rows].astype(np.float32)
        if index.kind == "codes":  # an index row as a ±1 query (its own bits)
            q = np.unpackbits(index.data[rows], axis=1, count=index.bits).astype(np.float32) * 2 - 1
        where = f"{len(q)} queries (rows of the index)"
    if metric == "asymmetric" or index.index_type == "flat":
        why = "asymmetric search is always exact" if metric == "asymmetric" else "a flat index is exact"
        print(f"recall@{args.k}: 1.0 ({why}; nothing to check)")
        return
    metric, q = prepare_queries(index, q, mode)
    t0 = time.perf_counter()
    rows, scores = search_batch(index, q, args.k, mode)
    t1 = time.perf_counter()
    _, exact = search_batch(index, q, args.k, mode, exact=True)
    t2 = time.perf_counter()
    recall = recall_at_k(rows, scores, exact, metric)
    params = ", ".join(f"{k}={v}" for k, v in index.params.items() if k in ("nlist", "nprobe", "m", "ef_search"))
    print(f"recall@{args.k} of {index.index_type} ({params}) against exact search, {where}: {recall:.4f} "
          f"({(t1 - t0) * 1000 / len(q):.3f} ms per query against {(t2 - t1) * 1000 / len(q):.3f} ms exact, "
          f"batched)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        index = open_index(args)
        items = index.meta.get("items", "images")
        source = index.meta.get("source", {})
        if args.check_recall:
            loaded = open_run(args, index, {"text", "image"} & {k for _, k in read_queries(args.queries)}) \
                if args.queries else None
            check_recall(args, index, loaded)
            return 0
        if args.queries:
            kinds = {k for _, k in read_queries(args.queries)}
            loaded = open_run(args, index, kinds)
            if args.out:
                with open(args.out, "w", encoding="utf-8") as out:
                    n, n_err, sec = run_queries(args, index, loaded, out)
            else:
                n, n_err, sec = run_queries(args, index, loaded, sys.stdout)
            print(f"{n} queries ({n_err} not encodable) searched in {sec:.1f} s"
                  + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
            return 0
        loaded = open_run(args, index, {"text" if args.text is not None else "image"})
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
        metric, mode = search_mode(index, args)
        if args.exact:
            rows, scores = search_batch(index, query.numpy(), args.k, mode, exact=True)
            rows, scores = rows[0], scores[0]
        else:
            rows, scores = search_rows(index, query.numpy(), args.k, mode=mode)
        ms = (time.perf_counter() - t0) * 1000
    except (ConfigError, RunError, IndexFormatError, QueryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = f"d={index.dim}" if index.kind == "embedding" else f"K={index.bits} bits"
    kind = index.index_type + "".join(f" {k}={v}" for k, v in index.params.items() if k in ("nprobe", "ef_search"))
    print(f"query: {what}")
    print(f"index: {args.index} ({len(index)} {items}, {index.kind} {size}, {kind}, split "
          f"{source.get('split', '?')}); model {loaded.run_dir} {loaded.checkpoint}")
    print(f"score: {METRICS[metric]} (query encoded and searched in {ms:.0f} ms)")
    for rank, (row, score) in enumerate(zip(rows.tolist(), scores), 1):
        shown = f"{score:.4f}" if metric in ("dot", "asymmetric") else f"{int(score)}"
        print(f"{rank:3d}. id {int(index.ids[row])}  score {shown}")
        for c in index.captions[row]:
            print(f"       {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
