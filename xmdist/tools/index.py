"""On-disk retrieval index of an encoded split, and its search: faiss indexes, exact or
approximate, with an exact numpy fallback.

An index is a directory::

    index.json     {"format": "xmdist-index", "version": 2, "kind": "embedding" | "codes",
                    "items": "images" | "captions", "count": N, "dim": d (embedding) or "bits": K (codes),
                    "search": {"type": "flat" | "ivf" | "hnsw", "params": {...}, "file": "faiss.index" | null},
                    "source": {"run", "checkpoint", "step", "method", "shards", "split"}}
    ids.npy        int64 (N,): sample id of each row (for a caption index: the id of the caption's image)
    vectors.npy    kind embedding: float16 (N, d)
    codes.npy      kind codes: uint8 (N, ceil(K/8)) = np.packbits(vector >= 0, axis=1), bit order big
    captions.json  [[caption, ...], ...]: per row, the image's captions (one caption for a caption index)
    faiss.index    (version 2, written where faiss is installed) the faiss index of the rows, in row
                   order (faiss ids are row numbers): faiss.write_index / write_index_binary

Version-1 indexes (no ``search`` entry, no faiss file) still load: they are searched exactly, by a
flat faiss index built in memory at the first search, or by numpy without faiss.

Index types (``save_index(..., index_type=)``, ``launch/encode.py --index-type``):

* ``flat``: exact. Embeddings: ``IndexFlatIP`` of the float16 vectors read as float32; codes:
  ``IndexBinaryFlat`` of the packed codes (K rounded up to a byte; the padding bits are 0 in rows
  and queries alike, so the Hamming distance is unchanged).
* ``ivf``: ``IndexIVFFlat`` (inner product) / ``IndexBinaryIVF``: k-means into ``nlist`` lists,
  trained on ``train_sample`` rows drawn at random (seed 0; all rows if fewer); a query scans the
  ``nprobe`` nearest lists. Default ``nlist`` = the power of two nearest sqrt(N), at most
  train_sample / 39 (faiss' minimum of training points per centroid); default ``nprobe`` =
  ``nlist / 16`` for embeddings, ``nlist / 8`` for codes (Hamming scans are cheap, and integer
  distances need more lists for the same recall), at least 1: recall@10 >= 0.95 on the benchmark's
  harder data (BENCHMARKS.md). Distances of the scanned rows are exact.
* ``hnsw``: ``IndexHNSWFlat`` (inner product) / ``IndexBinaryHNSW``: a graph with ``m`` links per
  node (default 32), built with ``ef_construction`` (default 80), searched with ``ef_search``
  (default 128; raised to k when k is larger).
* ``auto``: ``flat`` below AUTO_FLAT_BELOW rows (100,000 embeddings, 1,000,000 codes: there flat
  search takes a few ms per query on two cores), else ``ivf`` (cheaper to build and smaller than
  HNSW; BENCHMARKS.md). Without faiss ``auto`` is flat (numpy).

``nprobe`` and ``ef_search`` are stored in index.json and may be overridden per search
(``set_search_params``, ``launch/search.py --nprobe / --ef-search``).

``search(index, query, k)`` returns ``(ids, scores)`` of the k best rows, best first;
``search_batch(index, queries, k)`` the rows and scores of many queries at once:

* embedding: ``scores`` = dot product, computed in float32 (higher is better);
* codes, binary query (packed uint8, bool, or a ±1 vector; any real query with ``mode="hamming"``,
  binarised by ``>= 0`` as the stored codes): Hamming distance (lower is better);
* codes, real query (``mode="asymmetric"``, the default for a non-±1 float query): the
  asymmetric distance ``(K - q . b) / 2`` with b in {-1, +1}^K (lower is better); for a ±1 query it
  equals the Hamming distance. faiss has no kernel for it: it is always exact (one query: numpy,
  chunked matmul; a batch: torch, one matmul per chunk of rows for all queries and a running top k).

faiss searches a batch of fewer than 16 queries on one OpenMP thread (``few_queries_one_thread``):
for one query the threads cost more than they save, many times more on a loaded machine.

faiss is optional (``pip install -e ".[search]"``). Without it a flat index is searched by the
exact numpy code below (a one-line note on stderr, once per process); building an ``ivf`` or
``hnsw`` index needs faiss (a clear error says how to install it), and an approximate index on disk
is then searched exactly by numpy (its vectors / codes are stored beside it).

Ties: the numpy search breaks ties by row order (lower row first). faiss flat returns the same
scores, but where several rows tie at the k-th score it may keep other rows of that score (results
are re-sorted by (score, row) so the order within the returned set is deterministic). With no
ties the ids agree; float dot products agree to float32 rounding (summation order differs), and
exactly when the sums are exact in float32. Arrays are written and read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT, VERSION = "xmdist-index", 2
KINDS = ("embedding", "codes")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
FAISS_FILE = "faiss.index"
AUTO_FLAT_BELOW = {"embedding": 100_000, "codes": 1_000_000}  # auto: flat below this many rows, else ivf
DEFAULT_M, DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH = 32, 80, 128
TRAIN_SAMPLE = 100_000
ADD_CHUNK = 100_000  # rows added to a faiss index per step (one progress tick)
INSTALL = 'pip install -e ".[search]"'
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # bits set per byte value
CHUNK_BYTES = 256 * 1024  # float32 working set per chunk: stays in L2
SINGLE_THREAD_BELOW = 16  # faiss searches fewer queries than this on one thread
BATCH_BYTES = 64 << 20  # (rows x queries) float32 distance block of a batched asymmetric search


class IndexFormatError(ValueError):
    """An index directory is missing, malformed or of the wrong kind, or a query does not fit it."""


@dataclass
class Index:
    kind: str
    ids: np.ndarray  # int64 (N,)
    data: np.ndarray  # float16 (N, d) or packed uint8 (N, ceil(K/8))
    captions: list[list[str]]
    meta: dict = field(default_factory=dict)
    bits: int = 0  # K for codes
    index_type: str = "flat"  # flat | ivf | hnsw
    params: dict = field(default_factory=dict)  # nlist, nprobe, m, ef_construction, ef_search
    faiss: object = None  # the faiss index (loaded, built, or built in memory at the first search)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.bits if self.kind == "codes" else int(self.data.shape[1])


# ---------------------------------------------------------------- faiss, optional


def _load_faiss():
    """The faiss module, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


_FAISS: list = []  # [module or None] once looked up
_NOTED: list = []


def faiss_module(needed_for: str = ""):
    """faiss, or None (with a one-line note on stderr, once) where it is missing; ``needed_for``
    names what cannot be done without it, and then a missing faiss is an error."""
    if not _FAISS:
        _FAISS.append(_load_faiss())
    faiss = _FAISS[0]
    if faiss is None and needed_for:
        raise IndexFormatError(f"{needed_for} needs faiss, which is not installed: {INSTALL} "
                               f"(or pip install faiss-cpu)")
    if faiss is None and not _NOTED:
        _NOTED.append(True)
        print(f"note: faiss is not installed: exact numpy search ({INSTALL} for faiss and approximate indexes)",
              file=sys.stderr)
    return faiss


def _pow2_near(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def resolve_type(kind: str, n: int, index_type: str = "auto", nlist: int = 0, nprobe: int = 0, m: int = 0,
                 ef_construction: int = 0, ef_search: int = 0,
                 train_sample: int = TRAIN_SAMPLE) -> tuple[str, dict]:
    """``index_type`` (auto resolved by size) and its parameters, defaults filled in (module doc)."""
    if index_type not in INDEX_TYPES:
        raise IndexFormatError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    for name, v in (("nlist", nlist), ("nprobe", nprobe), ("m", m), ("ef_construction", ef_construction),
                    ("ef_search", ef_search), ("train_sample", train_sample)):
        if v < 0 or (name == "train_sample" and v < 1):
            raise IndexFormatError(f"--{name.replace('_', '-')} must be >= {int(name == 'train_sample')}, got {v}")
    if index_type == "auto":
        index_type = "flat" if n < AUTO_FLAT_BELOW[kind] or faiss_module() is None else "ivf"
    if index_type == "flat":
        return "flat", {}
    if index_type == "ivf":
        cap = max(1, 2 ** int(math.log2(max(1, min(n, train_sample) // 39)))) if n >= 39 else 1
        nlist = nlist or min(_pow2_near(math.sqrt(max(n, 1))), cap)
        if nlist > max(n, 1):
            raise IndexFormatError(f"--nlist {nlist} is more than the {n} rows to index")
        if nlist > train_sample:
            raise IndexFormatError(f"--nlist {nlist} needs at least {nlist} training rows: raise --train-sample "
                                   f"({train_sample}) or lower --nlist")
        share = 8 if kind == "codes" else 16
        return "ivf", {"nlist": nlist, "nprobe": min(nprobe or max(1, nlist // share), nlist)}
    return "hnsw", {"m": m or DEFAULT_M, "ef_construction": ef_construction or DEFAULT_EF_CONSTRUCTION,
                    "ef_search": ef_search or DEFAULT_EF_SEARCH}


def build_faiss(kind: str, data: np.ndarray, index_type: str, params: dict, train_sample: int = TRAIN_SAMPLE,
                progress: bool = False, seed: int = 0):
    """A faiss index of ``data`` (float (N, d) embeddings or packed uint8 (N, B) codes), rows in order."""
    faiss = faiss_module(f"a faiss index ({index_type})")
    if kind == "embedding":
        d = int(data.shape[1])
        spec = {"flat": "Flat", "ivf": f"IVF{params.get('nlist')},Flat", "hnsw": f"HNSW{params.get('m')},Flat"}
        index = faiss.IndexFlatIP(d) if index_type == "flat" else faiss.index_factory(
            d, spec[index_type], faiss.METRIC_INNER_PRODUCT)
    else:
        d = 8 * int(data.shape[1])
        spec = {"flat": "BFlat", "ivf": f"BIVF{params.get('nlist')}", "hnsw": f"BHNSW{params.get('m')}"}
        index = faiss.IndexBinaryFlat(d) if index_type == "flat" else faiss.index_binary_factory(d, spec[index_type])
    if index_type == "hnsw":
        index.hnsw.efConstruction = int(params["ef_construction"])

    def rows(s: int, e: int) -> np.ndarray:
        block = data[s:e]
        return np.ascontiguousarray(block, dtype=np.float32 if kind == "embedding" else np.uint8)

    if index_type == "ivf":
        n = len(data)
        pick = np.sort(np.random.default_rng(seed).choice(n, min(n, train_sample), replace=False))
        index.train(np.ascontiguousarray(data[pick], dtype=np.float32 if kind == "embedding" else np.uint8))
    starts = range(0, len(data), ADD_CHUNK)
    if progress:
        from xmdist import progress as prog

        starts = prog.bar(starts, total=len(starts), desc=f"faiss {index_type} index: adding rows",
                          unit=f"chunk(s) of {ADD_CHUNK}")
    for s in starts:
        index.add(rows(s, min(s + ADD_CHUNK, len(data))))
    set_search_params(index, index_type, params)
    return index


def set_search_params(target, index_type: str | None = None, params: dict | None = None, nprobe: int = 0,
                      ef_search: int = 0) -> None:
    """Apply ``nprobe`` / ``ef_search`` (from ``params``, overridden by the arguments) to a faiss index
    or to an :class:`Index` (whose ``params`` are updated)."""
    if isinstance(target, Index):
        if nprobe and target.index_type == "ivf":
            target.params["nprobe"] = min(nprobe, target.params["nlist"])
        if ef_search and target.index_type == "hnsw":
            target.params["ef_search"] = ef_search
        if target.faiss is not None:
            set_search_params(target.faiss, target.index_type, target.params)
        return
    params = {**(params or {}), **({"nprobe": nprobe} if nprobe else {}), **({"ef_search": ef_search} if ef_search else {})}
    if index_type == "ivf":
        faiss = faiss_module("an ivf index")
        ivf = target if hasattr(target, "nprobe") else faiss.extract_index_ivf(target)
        ivf.nprobe = int(params["nprobe"])
    elif index_type == "hnsw":
        target.hnsw.efSearch = int(params["ef_search"])


def check_index_type(index_type: str) -> None:
    """Refuse an approximate index type early where faiss is missing (before any encoding)."""
    if index_type not in INDEX_TYPES:
        raise IndexFormatError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    if index_type in ("ivf", "hnsw"):
        faiss_module(f"--index-type {index_type}")


def pack_codes(vectors) -> np.ndarray:
    """Real (N, K) -> packed sign bits (N, ceil(K/8)) uint8; bit 1 means ``value >= 0``."""
    v = np.asarray(vectors)
    return np.packbits(v >= 0, axis=-1)


def check_target(path: str | Path) -> None:
    """Refuse to write an index over anything but an earlier index or an empty directory."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / "index.json").is_file() or not any(path.iterdir()))):
        raise IndexFormatError(f"{path} exists and is not an index: choose another output directory")


def save_index(path: str | Path, ids, vectors, captions: list[list[str]], kind: str = "embedding",
               meta: dict | None = None, index_type: str = "auto", params: dict | None = None,
               train_sample: int = TRAIN_SAMPLE, progress: bool = False) -> Path:
    """Write an index directory (replacing an earlier index there, never any other directory).

    ``index_type`` / ``params`` (nlist, nprobe, m, ef_construction, ef_search; 0 or missing: the
    default) choose the faiss index written beside the arrays (module doc); without faiss a flat
    index is written without a faiss file, an approximate one is refused.
    """
    path = Path(path)
    if kind not in KINDS:
        raise IndexFormatError(f"index kind must be one of {KINDS}, got {kind!r}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids) or len(captions) != len(ids):
        raise IndexFormatError(f"need ids (N,), vectors (N, d) and N caption lists; got {ids.shape}, "
                               f"{vectors.shape}, {len(captions)}")
    check_target(path)
    check_index_type(index_type)
    index_type, params = resolve_type(kind, len(ids), index_type, train_sample=train_sample, **(params or {}))
    data = vectors.astype(np.float16) if kind == "embedding" else pack_codes(vectors)
    faiss = faiss_module() if index_type == "flat" else faiss_module(f"a {index_type} index")
    fidx = None
    if faiss is not None and len(ids):
        try:
            fidx = build_faiss(kind, data.astype(np.float32) if kind == "embedding" else data, index_type, params,
                               train_sample, progress)
        except RuntimeError as e:  # faiss' own checks (e.g. too few training rows)
            raise IndexFormatError(f"faiss could not build the {index_type} index {params}: "
                                   f"{str(e).strip().splitlines()[-1]}") from None
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = {"dim" if kind == "embedding" else "bits": int(vectors.shape[1])}
    search_info = {"type": index_type, "params": params, "file": FAISS_FILE if fidx is not None else None}
    info = {"format": FORMAT, "version": VERSION, "kind": kind, "count": len(ids), **size, **(meta or {}),
            "search": search_info}
    np.save(tmp / "ids.npy", ids, allow_pickle=False)
    np.save(tmp / ("vectors.npy" if kind == "embedding" else "codes.npy"), data, allow_pickle=False)
    if fidx is not None:
        (faiss.write_index if kind == "embedding" else faiss.write_index_binary)(fidx, str(tmp / FAISS_FILE))
    (tmp / "captions.json").write_text(json.dumps([list(map(str, c)) for c in captions]))
    (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_index(path: str | Path, kind: str | None = None) -> Index:
    """Read and check an index directory; ``kind`` refuses an index of the other kind."""
    path = Path(path)
    info_path = path / "index.json"
    if not info_path.is_file():
        raise IndexFormatError(f"{info_path} is missing: not an index written by launch/encode.py")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{info_path} is not valid JSON: {e}") from None
    if info.get("format") != FORMAT or info.get("kind") not in KINDS:
        raise IndexFormatError(f"{info_path}: not an xmdist index (format {info.get('format')!r}, "
                               f"kind {info.get('kind')!r})")
    if not isinstance(info.get("version"), int) or info["version"] > VERSION:
        raise IndexFormatError(f"{info_path}: index version {info.get('version')!r}; this xmdist reads versions "
                               f"1-{VERSION} (update xmdist or re-encode)")
    if kind and info["kind"] != kind:
        raise IndexFormatError(f"{path} is an index of kind {info['kind']}; {kind} expected")
    search_info = info.get("search") or {"type": "flat", "params": {}, "file": None}  # version 1: exact
    if search_info.get("type") not in ("flat", "ivf", "hnsw"):
        raise IndexFormatError(f"{info_path}: unknown search type {search_info.get('type')!r}")
    try:
        ids = np.load(path / "ids.npy", allow_pickle=False)
        data = np.load(path / ("vectors.npy" if info["kind"] == "embedding" else "codes.npy"), allow_pickle=False)
        captions = json.loads((path / "captions.json").read_text())
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"index {path} is damaged: {e}") from None
    n = int(info["count"])
    bits = int(info.get("bits", 0))
    want = (np.float16, (n, info.get("dim"))) if info["kind"] == "embedding" else (np.uint8, (n, (bits + 7) // 8))
    if ids.dtype != np.int64 or ids.shape != (n,) or data.dtype != want[0] or data.shape != want[1] \
            or len(captions) != n:
        raise IndexFormatError(f"index {path} is inconsistent: ids {ids.dtype}{ids.shape}, data "
                               f"{data.dtype}{data.shape}, {len(captions)} caption lists; index.json says {n} rows")
    index = Index(info["kind"], ids, data, captions, info, bits, search_info["type"],
                  dict(search_info.get("params") or {}))
    if search_info.get("file"):
        faiss = faiss_module()
        if faiss is not None:
            try:
                read = faiss.read_index if index.kind == "embedding" else faiss.read_index_binary
                index.faiss = read(str(path / search_info["file"]))
            except RuntimeError as e:
                raise IndexFormatError(f"index {path}: the faiss file {search_info['file']} is damaged "
                                       f"({str(e).strip().splitlines()[-1]}): re-encode with launch/encode.py") from None
            if index.faiss.ntotal != n:
                raise IndexFormatError(f"index {path} is inconsistent: the faiss file holds {index.faiss.ntotal} "
                                       f"rows, index.json says {n}")
            set_search_params(index.faiss, index.index_type, index.params)
    return index


def searcher(index: Index):
    """The faiss index that searches ``index``: the one loaded or built, a flat one built in memory
    for an index without a faiss file (version 1), or None without faiss (numpy search)."""
    if index.faiss is None and len(index) and index.index_type == "flat" and faiss_module() is not None:
        index.faiss = build_faiss(index.kind, index.data.astype(np.float32) if index.kind == "embedding"
                                  else index.data, "flat", {})
    return index.faiss


def exact_searcher(index: Index):
    """A flat faiss index of ``index`` (itself where it is flat; built in memory and kept otherwise),
    or None without faiss: the reference of :func:`recall_at_k`."""
    if index.index_type == "flat":
        return searcher(index)
    cached = index.meta.get("_exact")
    if cached is None and faiss_module() is not None:
        cached = index.meta["_exact"] = build_faiss(
            index.kind, index.data.astype(np.float32) if index.kind == "embedding" else index.data, "flat", {})
    return cached


# ---------------------------------------------------------------- distances


def _chunks(n: int, row_bytes: int):
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for s in range(0, n, step):
        yield s, min(s + step, n)


def dot_scores(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors`` (N, d) float16 . ``query`` (d,) -> (N,) float32, converted to float32 chunk by chunk."""
    q = np.asarray(query, dtype=np.float32)
    out = np.empty(len(vectors), dtype=np.float32)
    buf = np.empty((max(1, CHUNK_BYTES // (4 * vectors.shape[1])), vectors.shape[1]), dtype=np.float32)
    for s, e in _chunks(len(vectors), 4 * vectors.shape[1]):
        b = buf[: e - s]
        b[...] = vectors[s:e]
        np.matmul(b, q, out=out[s:e])
    return out


def hamming_distances(codes: np.ndarray, packed_query: np.ndarray) -> np.ndarray:
    """Packed codes (N, B) vs one packed query (B,) -> (N,) int32: popcount of the XOR by table lookup."""
    q = np.asarray(packed_query, dtype=np.uint8)
    out = np.empty(len(codes), dtype=np.int32)
    for s, e in _chunks(len(codes), 4 * codes.shape[1]):
        out[s:e] = POPCOUNT[np.bitwise_xor(codes[s:e], q)].sum(axis=1, dtype=np.int32)
    return out


def asymmetric_distances(codes: np.ndarray, query: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes (N, B) vs a real query (K,) -> (N,) float32 ``(K - q . b) / 2``, b = ±1 unpacked."""
    q = np.asarray(query, dtype=np.float32)
    out = np.empty(len(codes), dtype=np.float32)
    buf = np.empty((max(1, CHUNK_BYTES // (4 * bits)), bits), dtype=np.float32)
    for s, e in _chunks(len(codes), 4 * bits):
        b = buf[: e - s]
        b[...] = np.unpackbits(codes[s:e], axis=1, count=bits)  # {0, 1}
        b *= 2
        b -= 1  # {-1, +1}
        np.matmul(b, q, out=out[s:e])
    return (bits - out) / 2


def top_k(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Rows of the k best scores, best first; ties go to the lower row (deterministic)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    key = -scores if largest else scores
    if k < n:
        kth = np.partition(key, k - 1)[k - 1]
        better = np.flatnonzero(key < kth)
        tied = np.flatnonzero(key == kth)[: k - len(better)]  # the lowest rows among the ties
        rows = np.concatenate([better, tied])
    else:
        rows = np.arange(n)
    return rows[np.lexsort((rows, key[rows]))]


def asymmetric_batch(codes: np.ndarray, queries: np.ndarray, bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes (N, B) vs real queries (Q, K) -> the k smallest ``(K - q . b) / 2`` per query:
    rows (Q, k), distances (Q, k). One matmul per chunk of rows for all queries and a running top k
    (torch); ties at a chunk's k-th distance are kept arbitrarily (real-valued distances rarely tie)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (Q, K)
    n, nq = len(codes), q.shape[0]
    k = min(k, n)
    best_d = torch.zeros((nq, 0))
    best_r = torch.zeros((nq, 0), dtype=torch.int64)
    step = max(k, BATCH_BYTES // (4 * max(nq, bits)))
    for s in range(0, n, step):
        e = min(s + step, n)
        b = torch.from_numpy(np.unpackbits(codes[s:e], axis=1, count=bits)).float().mul_(2).sub_(1)
        d = (bits - q @ b.T) / 2  # (Q, rows)
        vals, idx = torch.topk(d, min(k, e - s), dim=1, largest=False, sorted=False)
        best_d, best_r = torch.cat([best_d, vals], 1), torch.cat([best_r, idx + s], 1)
        if best_d.shape[1] > k:
            best_d, keep = torch.topk(best_d, k, dim=1, largest=False, sorted=False)
            best_r = torch.gather(best_r, 1, keep)
    rows, dist = best_r.numpy(), best_d.numpy()
    order = np.lexsort((rows, dist), axis=-1)
    return np.take_along_axis(rows, order, 1), np.take_along_axis(dist, order, 1)


def query_metric(index: Index, query, mode: str = "auto") -> str:
    """Which score ``search`` computes for this query (or batch): ``dot``, ``hamming`` or ``asymmetric``."""
    if index.kind == "embedding":
        return "dot"
    if mode in ("hamming", "asymmetric"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be auto, hamming or asymmetric, got {mode!r}")
    q = np.asarray(query)
    if q.dtype in (np.uint8, np.bool_) or np.all(np.abs(q) == 1):
        return "hamming"
    return "asymmetric"


def _numpy(query) -> np.ndarray:
    return np.asarray(query.detach().cpu().numpy() if hasattr(query, "detach") else query)


def prepare_queries(index: Index, queries, mode: str = "auto") -> tuple[str, np.ndarray]:
    """One query (1-d) or a batch (Q, ...) -> (metric, (Q, ...) array in the form the metric searches:
    float32 for dot and asymmetric, packed uint8 for Hamming)."""
    q = _numpy(queries)
    q = q.reshape(1, -1) if q.ndim <= 1 else q
    if q.ndim != 2:
        raise IndexFormatError(f"queries must be one vector or a (queries, values) array, got shape {q.shape}")
    metric = query_metric(index, q, mode)
    if metric == "dot":
        if q.shape[1] != index.dim:
            raise IndexFormatError(f"query has {q.shape[1]} values; the index has dim {index.dim}")
        return metric, np.ascontiguousarray(q, dtype=np.float32)
    nbytes = index.data.shape[1]
    if metric == "hamming":
        if q.dtype == np.uint8 and q.shape[1] == nbytes and index.bits != nbytes:
            return metric, np.ascontiguousarray(q)  # already packed
        if q.shape[1] == index.bits:  # bits (bool or 0/1 uint8) or real values binarised like the codes
            return metric, np.packbits((q > 0) if q.dtype in (np.bool_, np.uint8) else (q >= 0), axis=1)
        raise IndexFormatError(f"query has {q.shape[1]} values; the index has {index.bits} bits "
                               f"({nbytes} packed bytes)")
    if q.shape[1] != index.bits:
        raise IndexFormatError(f"query has {q.shape[1]} values; the index has {index.bits} bits")
    return metric, np.ascontiguousarray(q, dtype=np.float32)


def _numpy_search(index: Index, metric: str, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact numpy search, query by query (asymmetric: batched), ties by row."""
    if metric == "asymmetric" and len(q) > 1:
        return asymmetric_batch(index.data, q, index.bits, k)
    rows, scores = [], []
    for one in q:
        if metric == "dot":
            s = dot_scores(index.data, one)
        elif metric == "hamming":
            s = hamming_distances(index.data, one)
        else:
            s = asymmetric_distances(index.data, one, index.bits)
        r = top_k(s, k, largest=metric == "dot")
        rows.append(r)
        scores.append(s[r])
    return np.stack(rows), np.stack(scores)


def few_queries_one_thread(nq: int):
    """A context: faiss on one OpenMP thread for fewer than SINGLE_THREAD_BELOW queries. Threads
    for one query cost more than they save, 7-20x more on a loaded machine (BENCHMARKS.md)."""
    import contextlib

    faiss = faiss_module()
    threads = faiss.omp_get_max_threads() if faiss is not None else 1
    if nq >= SINGLE_THREAD_BELOW or threads == 1:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def one():
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(threads)

    return one()


def _faiss_search(fidx, index_type: str, params: dict, metric: str, q: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    if index_type == "hnsw" and k > fidx.hnsw.efSearch:  # HNSW returns at most efSearch rows
        fidx.hnsw.efSearch = k
    try:
        with few_queries_one_thread(len(q)):
            scores, rows = fidx.search(q, k)
    finally:
        if index_type == "hnsw":
            fidx.hnsw.efSearch = int(params.get("ef_search", DEFAULT_EF_SEARCH))
    rows = rows.astype(np.int64)
    key = -scores.astype(np.float64) if metric == "dot" else scores.astype(np.float64)
    key[rows < 0] = np.inf  # rows not found (approximate indexes) last
    order = np.lexsort((rows, key), axis=-1)  # deterministic order within the returned set
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def search_batch(index: Index, queries, k: int = 5, mode: str = "auto", backend: str = "auto",
                 exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of every query -> rows int64 (Q, min(k, N)), scores (Q, min(k, N)), best first.

    ``backend``: ``auto`` (faiss where installed, else numpy), ``faiss`` or ``numpy`` (the exact
    numpy code). ``exact``: search a flat faiss index even where the index is approximate. An
    approximate index may find fewer than k rows for a query: those places hold row -1.
    Asymmetric distances are always computed by numpy (exact).
    """
    if backend not in ("auto", "faiss", "numpy"):
        raise ValueError(f"backend must be auto, faiss or numpy, got {backend!r}")
    if k < 1:
        raise IndexFormatError(f"k must be >= 1, got {k}")
    metric, q = prepare_queries(index, queries, mode)
    k = min(k, len(index))
    if k == 0:
        return np.zeros((len(q), 0), dtype=np.int64), np.zeros((len(q), 0), dtype=np.float32)
    if metric != "asymmetric" and backend != "numpy":
        if backend == "faiss":
            faiss_module("backend='faiss'")
        fidx = exact_searcher(index) if exact else searcher(index)
        if fidx is not None:
            flat = exact or index.index_type == "flat"
            return _faiss_search(fidx, "flat" if flat else index.index_type, index.params, metric, q, k)
    return _numpy_search(index, metric, q, k)


def search(index: Index, query, k: int = 5, mode: str = "auto", backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows for one query -> (sample ids int64 (k,), scores (k,)); see the module doc.

    ``mode`` (codes only): ``auto`` (Hamming for a packed, bool or ±1 query, else asymmetric),
    ``hamming`` or ``asymmetric``.
    """
    rows, scores = search_rows(index, query, k, mode, backend)
    return index.ids[rows], scores


def search_rows(index: Index, query, k: int = 5, mode: str = "auto",
                backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`search` but returns row numbers instead of sample ids."""
    q = _numpy(query).reshape(-1)
    rows, scores = search_batch(index, q, k, mode, backend)
    found = rows[0] >= 0
    return rows[0][found], scores[0][found]


def recall_at_k(found_rows: np.ndarray, found_scores: np.ndarray, exact_scores: np.ndarray, metric: str) -> float:
    """Recall@k of an approximate search against the exact one (both (Q, k), best first): the share
    of the k places whose row scores at least as well as the exact k-th best. Rows tied with the
    exact k-th score count as hits (with ties, which of them exact search keeps is arbitrary); float
    scores are compared to 1e-5 relative (faiss sums in another order per index type). Without ties
    this is ``|approximate top k ∩ exact top k| / k``."""
    if exact_scores.shape[1] == 0:
        return 1.0
    kth = exact_scores[:, -1].astype(np.float64)[:, None]
    s = found_scores.astype(np.float64)
    if metric == "hamming":
        hit = s <= kth
    else:
        tol = 1e-5 * np.maximum(1.0, np.abs(kth))
        hit = s >= kth - tol if metric == "dot" else s <= kth + tol
    hit &= found_rows >= 0
    return float(hit[:, : exact_scores.shape[1]].sum() / exact_scores.size)
