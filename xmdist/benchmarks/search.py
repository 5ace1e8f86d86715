"""Search benchmark: the exact numpy search, xmdist.tools.index on faiss (flat, IVF, HNSW) and faiss
called directly, on packed codes and on embeddings (see launch/bench.py).

    python launch/bench.py search                  # 10,000,000 64-bit codes, 1,000,000 256-d embeddings
    python launch/bench.py search --small          # 200,000 codes, 50,000 embeddings: a minute

Data (seed 0), structured so that neighbours exist and approximate recall means something:

* codes: ``--clusters`` random 64-bit centres; each row is a centre with every bit flipped with
  probability ``--flip`` (0.1); queries are fresh draws of the same mixture (not rows of the index);
  searched by Hamming distance (packed uint8 rows, as launch/encode.py --codes writes them);
* embeddings: a Gaussian mixture of ``--clusters`` unit-norm centres plus isotropic noise of norm
  about ``--noise`` (0.7), rows normalised; queries fresh draws; dot product (float16 rows, as
  encode.py writes them).

Per index: build time (training included), memory (RSS after the build minus before, i.e. what
the index keeps), ms per query for ``--single`` queries one at a time and for ``--queries``
queries in one call (flat: ``--exact-queries``), and recall@k against the exact top k on the first
``--exact-queries`` queries (xmdist.tools.index
.recall_at_k: rows tied with the exact k-th score count as hits; Hamming distances tie often).
``numpy`` is the exact numpy code of xmdist.tools.index (the search before faiss), timed on
``--numpy-queries`` queries one at a time (it has no batched form); ``xmdist flat`` is
search_batch on the flat faiss index, ``faiss flat`` the same faiss index searched directly
(index.search, single queries on one thread as xmdist runs them), so the two differ only by
xmdist's overhead (both batched on the first ``--direct-queries``; the two alternate
``--flat-repeats`` times and the medians are reported). Each row is printed to stderr as soon as it is measured. For IVF every ``--nprobe`` value and
for HNSW every ``--ef-search`` value is a row (the build is shared). The asymmetric distance (real
query against the codes; always exact, numpy) is timed on ``--asym-queries`` queries. Threads:
faiss uses ``--threads`` OpenMP threads (default: all cores).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import platform
import time

import numpy as np

from xmdist.benchmarks.memory import GB, rss
from xmdist.tools import index as ix


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", action="store_true", help="200,000 codes, 50,000 embeddings, 200 queries")
    p.add_argument("--codes", type=int, default=10_000_000, help="rows of the codes index (0: skip)")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--embeddings", type=int, default=1_000_000, help="rows of the embedding index (0: skip)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000, help="mixture components of both data sets")
    p.add_argument("--flip", type=float, default=0.1, help="codes: probability of flipping a centre's bit")
    p.add_argument("--noise", type=float, default=0.7, help="embeddings: norm of the noise around a centre")
    p.add_argument("--queries", type=int, default=1000, help="queries of the batched searches and of recall")
    p.add_argument("--single", type=int, default=50, help="queries searched one at a time")
    p.add_argument("--numpy-queries", type=int, default=10, help="queries of the numpy search (one at a time)")
    p.add_argument("--exact-queries", type=int, default=1000,
                   help="queries of the exact (flat) batched search, the reference of recall (the first of --queries)")
    p.add_argument("--direct-queries", type=int, default=1000,
                   help="queries of faiss flat called directly, batched (the first of --queries)")
    p.add_argument("--asym-queries", type=int, default=100, help="queries of the asymmetric (exact) search")
    p.add_argument("--flat-repeats", type=int, default=3,
                   help="alternating passes of xmdist flat and faiss direct (medians reported)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--nlist", type=int, default=0, help="ivf lists (default: xmdist's, by size)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=ix.DEFAULT_EF_CONSTRUCTION)
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--hnsw-rows", type=int, default=0,
                   help="build HNSW on the first this many rows only (0: all; HNSW builds slowly on few cores)")
    p.add_argument("--train-sample", type=int, default=ix.TRAIN_SAMPLE)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)


def code_data(n: int, nq: int, bits: int, clusters: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed (n, bits/8) rows and (nq, bits) ±1 float queries of a flipped-centre mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.random((clusters, bits)) < 0.5

    def draw(m: int) -> np.ndarray:
        return centres[rng.integers(0, clusters, m)] ^ (rng.random((m, bits), dtype=np.float32) < flip)

    rows = np.concatenate([np.packbits(draw(min(500_000, n - s)), axis=1) for s in range(0, n, 500_000)])
    queries = np.where(draw(nq), 1.0, -1.0).astype(np.float32)
    return rows, queries


def embedding_data(n: int, nq: int, dim: int, clusters: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 (n, dim) rows and float32 (nq, dim) queries of a Gaussian mixture, unit norm."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, clusters, m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows = np.concatenate([draw(min(200_000, n - s)).astype(np.float16) for s in range(0, n, 200_000)])
    return rows, draw(nq)


def _ms_each(fn, queries) -> float:
    t0 = time.perf_counter()
    for q in queries:
        fn(q)
    return (time.perf_counter() - t0) * 1000 / max(len(queries), 1)


def _ms_batch(fn, queries):
    t0 = time.perf_counter()
    out = fn(queries)
    return (time.perf_counter() - t0) * 1000 / max(len(queries), 1), out


def _built(build):
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    obj = build()
    seconds = time.perf_counter() - t0
    gc.collect()
    return obj, seconds, (rss() - before) / GB


class _Rows(list):
    """The result rows, each printed to stderr when added (a long run killed midway keeps its numbers)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def append(self, row: dict) -> None:
        super().append(row)
        print(f"search {self.kind}: " + json.dumps(row), file=sys.stderr, flush=True)


def bench_kind(kind: str, data: np.ndarray, queries: np.ndarray, bits: int, args) -> list[dict]:
    k, rows_out = args.k, _Rows(kind)
    index = ix.Index(kind, np.arange(len(data), dtype=np.int64), data, _NoCaptions(len(data)), bits=bits)
    mode = "hamming" if kind == "codes" else "auto"
    metric, q = ix.prepare_queries(index, queries, mode)
    single = q[: args.single]

    # numpy: the exact search before faiss, one query at a time
    nq = q[: args.numpy_queries]
    t0 = time.perf_counter()
    np_rows, np_scores = ix._numpy_search(index, metric, nq, k)  # query by query
    ms = (time.perf_counter() - t0) * 1000 / len(nq)
    rows_out.append({"index": "numpy (exact, before faiss)", "build_s": 0.0, "memory_gb": data.nbytes / GB,
                     "ms_single": ms, "ms_batched": ms, "recall": 1.0, "queries": len(nq)})

    # xmdist flat (faiss) and the same faiss index called directly
    fidx, sec, mem = _built(lambda: ix.build_faiss(kind, data.astype(np.float32) if kind == "embedding" else data,
                                                   "flat", {}))
    index.faiss = fidx
    _, (ex_rows, exact) = _ms_batch(lambda qq: ix.search_batch(index, qq, k, mode), q[: args.exact_queries])

    def direct_one(one):
        with ix.few_queries_one_thread(1):  # as xmdist does for one query
            return fidx.search(one[None], k)

    # xmdist and faiss direct alternate, --flat-repeats times; the medians are reported (the
    # first pass over a large index is slower for whichever side comes first)
    times: dict[str, list[float]] = {"x1": [], "xb": [], "d1": [], "db": []}
    batch = q[: args.direct_queries]
    for _ in range(args.flat_repeats):
        times["x1"].append(_ms_each(lambda one: ix.search_batch(index, one[None], k, mode), single))
        times["d1"].append(_ms_each(direct_one, single))
        times["xb"].append(_ms_batch(lambda qq: ix.search_batch(index, qq, k, mode), batch)[0])
        times["db"].append(_ms_batch(lambda qq: fidx.search(qq, k), batch)[0])
    med = {key: float(np.median(v)) for key, v in times.items()}
    rows_out.append({"index": "xmdist flat (faiss)", "build_s": sec, "memory_gb": mem, "ms_single": med["x1"],
                     "ms_batched": med["xb"], "recall": 1.0, "batched_queries": len(batch),
                     "runs_single": times["x1"], "runs_batched": times["xb"],
                     "max_score_diff_vs_numpy": float(np.abs(exact[: len(nq)].astype(np.float64) - np_scores).max()),
                     "same_ids_as_numpy": float(np.mean([(a == b).all() for a, b in zip(ex_rows, np_rows)]))})
    rows_out.append({"index": "faiss flat, called directly", "build_s": sec, "memory_gb": mem, "ms_single": med["d1"],
                     "ms_batched": med["db"], "recall": 1.0, "batched_queries": len(batch),
                     "runs_single": times["d1"], "runs_batched": times["db"],
                     "xmdist_over_direct_single": med["x1"] / med["d1"], "xmdist_over_direct_batched": med["xb"] / med["db"]})
    if kind == "codes" and args.asym_queries:
        real = queries[: args.asym_queries] * np.random.default_rng(1).uniform(0.2, 1.0, (args.asym_queries, bits))
        real = real.astype(np.float32)
        ms1 = _ms_each(lambda one: ix.search_batch(index, one, k, "asymmetric"), real[: args.numpy_queries])
        msb, _ = _ms_batch(lambda qq: ix.search_batch(index, qq, k, "asymmetric"), real)
        rows_out.append({"index": "asymmetric (K - q.b)/2, numpy exact", "build_s": 0.0, "memory_gb": 0.0,
                         "ms_single": ms1, "ms_batched": msb, "recall": 1.0, "queries": len(real)})
    del fidx
    index.faiss = None
    gc.collect()

    for index_type in [t for t in args.types if t != "flat"]:
        n_rows = min(len(data), args.hnsw_rows) if index_type == "hnsw" and args.hnsw_rows else len(data)
        part = data[:n_rows]
        ref = exact
        if n_rows < len(data):  # exact answers on the subset
            sub = ix.Index(kind, index.ids[:n_rows], part, _NoCaptions(n_rows), bits=bits)
            ref = ix.search_batch(sub, q[: args.exact_queries], k, mode)[1]
            del sub
        _, params = ix.resolve_type(kind, n_rows, index_type, nlist=args.nlist, m=args.hnsw_m,
                                    ef_construction=args.ef_construction, train_sample=args.train_sample)
        fidx, sec, mem = _built(lambda: ix.build_faiss(kind, part.astype(np.float32) if kind == "embedding" else part,
                                                       index_type, params, args.train_sample))
        sweep = ("nprobe", args.nprobe) if index_type == "ivf" else ("ef_search", args.ef_search)
        approx = ix.Index(kind, index.ids[:n_rows], part, _NoCaptions(n_rows), bits=bits, index_type=index_type,
                          params=dict(params), faiss=fidx)
        for value in sweep[1]:
            if index_type == "ivf" and value > params["nlist"]:
                continue
            ix.set_search_params(approx, **{sweep[0]: value})
            ms1 = _ms_each(lambda one: ix.search_batch(approx, one[None], k, mode), single)
            msb, (r, s) = _ms_batch(lambda qq: ix.search_batch(approx, qq, k, mode), q)
            shown = {kk: v for kk, v in approx.params.items()}
            rows_out.append({"index": f"xmdist {index_type}", "params": shown, "rows": n_rows, "build_s": sec,
                             "memory_gb": mem, "ms_single": ms1, "ms_batched": msb,
                             "recall": ix.recall_at_k(r[: len(ref)], s[: len(ref)], ref, metric)})
        del fidx, approx
        gc.collect()
    return list(rows_out)


class _NoCaptions:
    """Stands in for the caption lists of a benchmark index (never read by the search)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def run(args) -> dict:
    if args.small:
        args.codes, args.embeddings = min(args.codes, 200_000), min(args.embeddings, 50_000)
        args.queries, args.single = min(args.queries, 200), min(args.single, 50)
    faiss = ix.faiss_module("the search benchmark")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    out = {"benchmark": "search", "machine": platform.node(), "cpus": os.cpu_count(),
           "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "k": args.k,
           "queries": args.queries, "single": args.single, "clusters": args.clusters}
    if args.codes:
        t0 = time.perf_counter()
        data, queries = code_data(args.codes, args.queries, args.bits, args.clusters, args.flip, args.seed)
        out["codes"] = {"rows": args.codes, "bits": args.bits, "flip": args.flip,
                        "data_s": time.perf_counter() - t0,
                        "results": bench_kind("codes", data, queries, args.bits, args)}
        del data
    if args.embeddings:
        t0 = time.perf_counter()
        data, queries = embedding_data(args.embeddings, args.queries, args.dim, args.clusters, args.noise, args.seed)
        out["embeddings"] = {"rows": args.embeddings, "dim": args.dim, "noise": args.noise,
                             "data_s": time.perf_counter() - t0,
                             "results": bench_kind("embedding", data, queries, 0, args)}
    return out
