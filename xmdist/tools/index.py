"""On-disk retrieval index of an encoded split, and exact brute-force search.

An index is a directory::

    index.json     {"format": "xmdist-index", "version": 1, "kind": "embedding" | "codes",
                    "items": "images" | "captions", "count": N, "dim": d (embedding) or "bits": K (codes),
                    "source": {"run", "checkpoint", "step", "method", "shards", "split"}}
    ids.npy        int64 (N,): sample id of each row (for a caption index: the id of the caption's image)
    vectors.npy    kind embedding: float16 (N, d)
    codes.npy      kind codes: uint8 (N, ceil(K/8)) = np.packbits(vector >= 0, axis=1), bit order big
    captions.json  [[caption, ...], ...]: per row, the image's captions (one caption for a caption index)

Arrays are written and read with ``allow_pickle=False``. ``search(index, query, k)`` returns
``(ids, scores)`` of the k best rows, best first, ties broken by row order:

* embedding: ``scores`` = dot product, computed in float32 (higher is better);
* codes, binary query (packed uint8, bool, or a ±1 vector; any real query with ``mode="hamming"``,
  binarised by ``>= 0`` as the stored codes): Hamming distance by XOR and a 256-entry popcount
  table (lower is better);
* codes, real query (``mode="asymmetric"``, the default for a non-±1 float query): the
  asymmetric distance ``(K - q . b) / 2`` with b in {-1, +1}^K (lower is better); for a ±1 query it
  equals the Hamming distance.

Search is exact and vectorised: rows are processed in chunks small enough to stay in cache.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT, VERSION = "xmdist-index", 1
KINDS = ("embedding", "codes")
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # bits set per byte value
CHUNK_BYTES = 256 * 1024  # float32 working set per chunk: stays in L2


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

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.bits if self.kind == "codes" else int(self.data.shape[1])


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
               meta: dict | None = None) -> Path:
    """Write an index directory (replacing an earlier index there, never any other directory)."""
    path = Path(path)
    if kind not in KINDS:
        raise IndexFormatError(f"index kind must be one of {KINDS}, got {kind!r}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids) or len(captions) != len(ids):
        raise IndexFormatError(f"need ids (N,), vectors (N, d) and N caption lists; got {ids.shape}, "
                               f"{vectors.shape}, {len(captions)}")
    check_target(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = {"dim" if kind == "embedding" else "bits": int(vectors.shape[1])}
    info = {"format": FORMAT, "version": VERSION, "kind": kind, "count": len(ids), **size, **(meta or {})}
    np.save(tmp / "ids.npy", ids, allow_pickle=False)
    if kind == "embedding":
        np.save(tmp / "vectors.npy", vectors.astype(np.float16), allow_pickle=False)
    else:
        np.save(tmp / "codes.npy", pack_codes(vectors), allow_pickle=False)
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
    if kind and info["kind"] != kind:
        raise IndexFormatError(f"{path} is an index of kind {info['kind']}; {kind} expected")
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
    return Index(info["kind"], ids, data, captions, info, bits)


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


def search(index: Index, query, k: int = 5, mode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows for one query -> (sample ids int64 (k,), scores (k,)); see the module doc.

    ``mode`` (codes only): ``auto`` (Hamming for a packed, bool or ±1 query, else asymmetric),
    ``hamming`` or ``asymmetric``.
    """
    rows, scores = search_rows(index, query, k, mode)
    return index.ids[rows], scores


def query_metric(index: Index, query, mode: str = "auto") -> str:
    """Which score ``search`` computes for this query: ``dot``, ``hamming`` or ``asymmetric``."""
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


def search_rows(index: Index, query, k: int = 5, mode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`search` but returns row numbers instead of sample ids."""
    q = np.asarray(query.detach().cpu().numpy() if hasattr(query, "detach") else query).reshape(-1)
    metric = query_metric(index, q, mode)
    if metric == "dot":
        if q.shape != (index.dim,):
            raise IndexFormatError(f"query has {q.size} values; the index has dim {index.dim}")
        scores = dot_scores(index.data, q)
        rows = top_k(scores, k, largest=True)
        return rows, scores[rows]
    nbytes = index.data.shape[1]
    if metric == "hamming":
        if q.dtype == np.uint8 and q.shape == (nbytes,) and index.bits != nbytes:
            packed = q  # already packed
        elif q.shape == (index.bits,):  # bits (bool or 0/1 uint8) or real values binarised like the codes
            packed = np.packbits((q > 0) if q.dtype in (np.bool_, np.uint8) else (q >= 0))
        else:
            raise IndexFormatError(f"query has {q.size} values; the index has {index.bits} bits "
                                   f"({nbytes} packed bytes)")
        scores = hamming_distances(index.data, packed)
    else:
        if q.shape != (index.bits,):
            raise IndexFormatError(f"query has {q.size} values; the index has {index.bits} bits")
        scores = asymmetric_distances(index.data, q, index.bits)
    rows = top_k(scores, k, largest=False)
    return rows, scores[rows]
