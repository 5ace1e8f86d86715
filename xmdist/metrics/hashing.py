"""Cross-modal hashing metrics: Hamming-ranking mAP (mAP@all, two mAP@k conventions), P@K, PR curves.

Inputs
    ``q_codes`` (n_q, K), ``db_codes`` (n_db, K): codes in {-1, +1}, float or integer (not bool);
    ``to_codes(h)`` is ``sign`` with 0 -> +1. {0, 1} bits are not accepted (use ``2 * b - 1``):
    database codes that are not all +-1 raise ValueError. ``q_labels`` (n_q, C), ``db_labels``
    (n_db, C): multi-hot, entries in {0, 1}. numpy arrays or torch tensors; numpy inputs follow the
    device of the torch ones, torch inputs must share one device (CPU or CUDA); work happens there.

Conventions (those of the DJSRH/DCMH and AGAH/DGCPN evaluation code, stated exactly)
    Hamming distance ``dist = 0.5 * (K - q . b)``; relevant = shares >= 1 label. Each query ranks
    the database by ascending distance, ties by database index (stable: lower index first);
    positions are 1-based. Means are over ALL queries: one with no relevant item counts as 0.

    * mAP@all and the two mAP@k conventions, DJSRH/DCMH "window" and AGAH/DGCPN
      "first_relevant": see ``hamming_map``. Say which one a reported mAP@k uses.
    * P@K: precision of each query's top k; for k > n_db the divisor is n_db
      (``total = min(k, n_db)`` as in the DJSRH-family ``p_topK``).
    * PR curve over Hamming radius r = 0..K, a query retrieving the items with ``dist <= r``.
      Precision at r: mean of retrieved-relevant / retrieved over the queries that retrieve >= 1
      item at r -- queries retrieving nothing are EXCLUDED at that radius (NaN if none retrieves
      anything). Recall at r: mean of retrieved-relevant / relevant over the queries with >= 1
      relevant item. (The DJSRH-family ``pr_curve`` averages both over the queries with non-zero
      precision instead; that is not what is computed here.)

Asymmetric (real-valued) queries
    ``q_codes`` may be any finite real values while ``db_codes`` stay +-1, as in CMFAH's
    ``score(q, x) = z_q . B_x`` (higher is closer). The same definitions apply with
    ``dist = 0.5 * (K - q . b)``, i.e. ranking by descending score ``q . b``, ties by index. The
    score is computed in float64 and sorted as ``-score`` (the same order as the distance, without
    rounding ``K - score``); the PR radius test ``dist <= r`` is ``q . b >= K - 2r``. Queries that
    are all +-1 take the integer-distance path, which ranks identically.

Implementation
    Query chunks of ``chunk_size`` rows (default ``CHUNK_ELEMENTS // n_db``: a few hundred MB of
    (rows, n_db) buffers whatever the database size, reused from chunk to chunk), no Python loop
    per query. Per chunk one matmul yields the exact integer distances (uint8 for K <= 255), a
    stable argsort orders each row, the relevance is taken in that order, and AP needs only the
    relevant items' positions and ordinals. The PR curve sorts nothing: per-query histograms of
    the distances of all and of relevant items, accumulated over the radius.

    CUDA: all torch (``torch.sort(stable=True)``, gather, dense running count). CPU: the matmuls
    stay in torch; the argsort, the ranked relevance and the AP reduction run in numpy on zero-copy
    views, in work items of a few rows over ``torch.get_num_threads()`` threads: numpy's stable
    argsort of uint8 is a radix sort, ~10x faster than ``torch.sort(stable=True)`` on 193,734-item
    rows; for C <= 64 the ranked relevance is a gather of label bit masks and an AND.
    ``backend="torch"`` forces the torch path on CPU (tests compare the two).
"""
from __future__ import annotations

import operator
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

__all__ = ["to_codes", "hamming_ap", "hamming_map", "precision_at_k", "pr_curve", "pr_counts"]

CHUNK_ELEMENTS = 1 << 24  # (query rows) x (database items) per chunk
SUB_ELEMENTS = 1 << 21    # per numpy work item (CPU): rows x database items
MODES = ("window", "first_relevant")
BACKENDS = ("auto", "torch")


def to_codes(h: Array) -> Array:
    """``sign(h)`` with 0 -> +1, as float32 +-1 codes of the same kind (numpy / torch, same device)."""
    if isinstance(h, np.ndarray):
        if h.dtype.kind not in "iuf":
            raise TypeError(f"to_codes needs a real-valued array, got dtype {h.dtype}")
        if h.dtype.kind == "f" and np.isnan(h).any():
            raise ValueError("to_codes: input contains NaN")
        return np.where(h < 0, np.float32(-1), np.float32(1))
    if isinstance(h, torch.Tensor):
        if h.dtype == torch.bool or h.is_complex():
            raise TypeError(f"to_codes needs a real-valued tensor, got dtype {h.dtype}")
        if h.is_floating_point() and bool(h.isnan().any()):
            raise ValueError("to_codes: input contains NaN")
        return torch.where(h.detach() < 0, -1.0, 1.0).to(torch.float32)
    raise TypeError(f"to_codes needs a numpy array or torch tensor, got {type(h).__name__}")


# ----------------------------------------------------------------------------- inputs
class _Inputs(NamedTuple):
    q: torch.Tensor      # q @ db.T = Hamming distance (binary) or score q . b (real-valued, float64)
    db: torch.Tensor
    ql: torch.Tensor     # float32 multi-hot
    dl: torch.Tensor
    bits: int
    binary: bool         # integer distances (queries are +-1 too)


def _to_tensor(x: Array, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
            raise TypeError(f"{name} must be a real-valued array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
        return x.detach()
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _prepare(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array) -> _Inputs:
    raw = {"q_codes": q_codes, "db_codes": db_codes, "q_labels": q_labels, "db_labels": db_labels}
    ts = {k: _to_tensor(v, k) for k, v in raw.items()}
    devices = {t.device for k, t in ts.items() if isinstance(raw[k], torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    dev = devices.pop() if devices else torch.device("cpu")
    for k, t in ts.items():
        if t.dim() != 2:
            raise ValueError(f"{k} must be 2-D, got shape {tuple(t.shape)}")
        if 0 in t.shape:
            raise ValueError(f"{k} is empty: shape {tuple(t.shape)}")
    q, db, ql, dl = (ts[k] for k in raw)
    for (a, i), (b, j), what in ((("q_codes", 1), ("db_codes", 1), "code lengths K"),
                                 (("q_labels", 0), ("q_codes", 0), "query counts"),
                                 (("db_labels", 0), ("db_codes", 0), "database sizes"),
                                 (("q_labels", 1), ("db_labels", 1), "label counts C")):
        if ts[a].shape[i] != ts[b].shape[j]:
            raise ValueError(f"{what} differ: {a} {tuple(ts[a].shape)}, {b} {tuple(ts[b].shape)}")
    if q.dtype == torch.bool or db.dtype == torch.bool:
        raise ValueError("codes must be +-1, not bool bits (use to_codes or 2 * b - 1)")
    q, db, ql, dl = (t.to(dev) for t in (q, db, ql, dl))
    if not bool(((db == 1) | (db == -1)).all()):
        raise ValueError("db_codes must contain only -1 and +1 (use to_codes: sign with 0 -> +1)")
    for k, t in (("q_labels", ql), ("db_labels", dl)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{k} must be multi-hot with entries in {{0, 1}}")
    binary = bool(((q == 1) | (q == -1)).all())
    if not binary:
        if q.is_floating_point() and not bool(torch.isfinite(q).all()):
            raise ValueError("q_codes contains non-finite values")
        q, db = q.to(torch.float64), db.to(torch.float64)
    else:
        # [-q/2, 1, .., 1, 1/2] . [b, c_1, .., c_m, K % 2] with sum(c) = K // 2 and c_i <= 127 is
        # K/2 - q.b/2, the Hamming distance, straight out of the matmul. Every operand is exact in
        # fp32, tf32 and bf16, and the sums (halves <= K) are exact with fp32 accumulation.
        K = q.shape[1]
        c = [127.0] * (K // 2 // 127) + [float(K // 2 % 127), float(K % 2)]
        qc = torch.tensor([1.0] * (len(c) - 1) + [0.5], device=dev).expand(q.shape[0], len(c))
        q = torch.cat([q.to(torch.float32) * -0.5, qc], 1)
        db = torch.cat([db.to(torch.float32), torch.tensor(c, device=dev).expand(db.shape[0], len(c))], 1)
    return _Inputs(q.contiguous(), db.contiguous(), ql.to(torch.float32).contiguous(),
                   dl.to(torch.float32).contiguous(), int(ts["q_codes"].shape[1]), binary)


def _chunk_rows(inp: _Inputs, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // inp.db.shape[0])
    return _positive_int(chunk_size, "chunk_size")


def _positive_int(k, name: str) -> int:
    try:
        if isinstance(k, bool) or operator.index(k) < 1:
            raise TypeError
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {k!r}") from None
    return operator.index(k)


def _dist_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 255 else torch.int16 if bits <= 32767 else torch.int32


Buffers = Callable[[str, torch.dtype, int], torch.Tensor]


def _buffers(inp: _Inputs, rows: int) -> Buffers:
    """``get(name, dtype, b)``: the first b rows of a (rows, n_db) buffer kept for the whole call
    (a fresh multi-MB tensor per chunk would cost page faults every chunk)."""
    bufs: dict[str, torch.Tensor] = {}

    def get(name: str, dtype: torch.dtype, b: int) -> torch.Tensor:
        if name not in bufs:
            bufs[name] = torch.empty(rows, inp.db.shape[0], dtype=dtype, device=inp.db.device)
        return bufs[name][:b]
    return get


def _scores(inp: _Inputs, s: int, e: int, buf: Buffers) -> torch.Tensor:
    """(e - s, n_db): integer Hamming distances (binary) or float64 scores q . b (real-valued)."""
    sc = torch.matmul(inp.q[s:e], inp.db.T, out=buf("mm", inp.q.dtype, e - s))
    return buf("dist", _dist_dtype(inp.bits), e - s).copy_(sc) if inp.binary else sc


def _sort_keys(inp: _Inputs, s: int, e: int, buf: Buffers) -> torch.Tensor:
    """Keys whose ascending stable order is the ranking: distances, or -score for real queries."""
    sc = _scores(inp, s, e, buf)
    return sc if inp.binary else sc.neg_()


def _relevance(inp: _Inputs, s: int, e: int, buf: Buffers) -> torch.Tensor:
    shared = torch.matmul(inp.ql[s:e], inp.dl.T, out=buf("lab", torch.float32, e - s))
    return torch.gt(shared, 0, out=buf("rel", torch.bool, e - s))


def _label_masks(inp: _Inputs) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Labels as bit masks (one uint8..uint64 per item) when C <= 64: relevance = (a & b) != 0."""
    C = inp.ql.shape[1]
    if C > 64:
        return None
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= C)

    def pack(t: torch.Tensor) -> np.ndarray:
        b = np.packbits((t > 0).cpu().numpy(), axis=1, bitorder="little")
        out = np.zeros((b.shape[0], width), dtype=np.uint8)
        out[:, :b.shape[1]] = b
        return out.view(np.dtype(f"u{width}")).reshape(-1)  # same byte layout for both: & is exact

    return pack(inp.ql), pack(inp.dl)


def _use_numpy(inp: _Inputs, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend == "auto" and inp.q.device.type == "cpu"


def _ranked(inp: _Inputs, chunk_size: Optional[int], backend: str,
            stat_np: Callable[[np.ndarray], np.ndarray],
            stat_torch: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Apply a per-row statistic to the relevance in ranking order, (n_q, ...) numpy result.

    ``stat_*`` get a (rows, n_db) bool array/tensor: row r = relevance of query r's database in
    ranking order (ascending distance, ties by index)."""
    n_q, n_db = inp.q.shape[0], inp.db.shape[0]
    rows = min(_chunk_rows(inp, chunk_size), n_q)
    buf = _buffers(inp, rows)
    out: list[np.ndarray] = []
    if not _use_numpy(inp, backend):   # inputs are detached: no autograd graph is built
        for s in range(0, n_q, rows):
            e = min(s + rows, n_q)
            order = torch.sort(_sort_keys(inp, s, e, buf), dim=1, stable=True).indices
            out.append(stat_torch(_relevance(inp, s, e, buf).gather(1, order)).cpu().numpy())
            del order
        return np.concatenate(out, axis=0)

    # CPU: numpy work items of `sub` rows, small enough (<= 16 MB of int64 argsort output) for malloc
    # to recycle their memory instead of mapping fresh pages every time, spread over a thread pool
    sub = max(1, SUB_ELEMENTS // n_db)
    workers = max(1, min(torch.get_num_threads(), -(-rows // sub)))
    masks = _label_masks(inp)
    if masks is not None:
        qm, dm = masks
        lab_all = np.empty((rows, n_db), dtype=dm.dtype)   # ranked label masks
        rs_all = np.empty((rows, n_db), dtype=bool)         # ranked relevance

    def work(s: int, a: int, b: int, keys: np.ndarray, rel: Optional[np.ndarray]) -> np.ndarray:
        """Rows s+a .. s+b-1 of the queries (a, b: rows of the current chunk)."""
        order = np.argsort(keys[a:b], axis=1, kind="stable")   # radix sort for small integers
        if rel is not None:
            return stat_np(np.take_along_axis(rel[a:b], order, axis=1))
        lab = np.take(dm, order, out=lab_all[a:b], mode="clip")  # "raise" would buffer `out`
        del order
        np.bitwise_and(lab, qm[s + a:s + b, None], out=lab)
        return stat_np(np.not_equal(lab, 0, out=rs_all[a:b]))

    with ThreadPoolExecutor(workers) as pool:
        for s in range(0, n_q, rows):
            e = min(s + rows, n_q)
            keys = _sort_keys(inp, s, e, buf).numpy()
            rel = _relevance(inp, s, e, buf).numpy() if masks is None else None
            spans = range(0, e - s, sub)
            out.extend(pool.map(lambda a: work(s, a, min(a + sub, e - s), keys, rel), spans))
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- mAP
def _ap_numpy(rs: np.ndarray, mode: str, k: Optional[int]) -> np.ndarray:
    """Per-row AP from ranked relevance (rows, n): works on the relevant items only."""
    if k is not None and mode == "window" and k < rs.shape[1]:
        rs = rs[:, :k]
    b, n = rs.shape
    counts = rs.sum(1)                                          # relevant per row (int64)
    flat = np.flatnonzero(rs)                                   # row * n + col, row-major
    rank = np.arange(1, flat.size + 1, dtype=np.float64)        # ordinal among the row's relevant
    rank -= np.repeat((np.cumsum(counts) - counts).astype(np.float64), counts)
    pos = flat.astype(np.float64)                               # 1-based position in the row
    del flat
    pos -= np.repeat(np.arange(b, dtype=np.float64) * n - 1, counts)
    used = counts
    if k is not None and mode == "first_relevant" and k < n:
        keep = rank <= k                                        # first min(k, R) relevant items
        rank, pos, used = rank[keep], pos[keep], np.minimum(counts, k)
        del keep
    rank /= pos
    sums = np.zeros(b, dtype=np.float64)
    nonempty = used > 0
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(rank, (np.cumsum(used) - used)[nonempty])
    return np.where(nonempty, sums / np.maximum(used, 1), 0.0)


def _ap_torch(rs: torch.Tensor, mode: str, k: Optional[int]) -> torch.Tensor:
    """Per-row AP from ranked relevance (rows, n): dense running count (the CUDA path)."""
    if k is not None and mode == "window" and k < rs.shape[1]:
        rs = rs[:, :k]
    n = rs.shape[1]
    cs = rs.cumsum(1, dtype=torch.int32 if n < 2**31 else torch.int64)   # ordinal among relevant
    keep = rs & (cs <= k) if (k is not None and mode == "first_relevant") else rs
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=rs.device)
    sums = torch.where(keep, cs.double() / pos, 0.0).sum(1)
    used = keep.sum(1)
    return torch.where(used > 0, sums / used.clamp(min=1), 0.0)


def _check_map_args(topk, mode: str) -> Optional[int]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return None if topk is None else _positive_int(topk, "topk")


def hamming_ap(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array,
               topk: Optional[int] = None, mode: str = "window", *, chunk_size: Optional[int] = None,
               backend: str = "auto") -> np.ndarray:
    """Per-query AP, float64 array (n_q,), as ``hamming_map`` defines it (no relevant item: 0);
    the arguments are ``hamming_map``'s."""
    k = _check_map_args(topk, mode)
    inp = _prepare(q_codes, db_codes, q_labels, db_labels)
    return _ranked(inp, chunk_size, backend, lambda rs: _ap_numpy(rs, mode, k),
                   lambda rs: _ap_torch(rs, mode, k))


def hamming_map(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array,
                topk: Optional[int] = None, mode: str = "window", *, chunk_size: Optional[int] = None,
                backend: str = "auto") -> float:
    """Hamming-ranking mAP: the mean over ALL queries of the per-query AP (``hamming_ap``).

    For one query, R = its number of relevant items and pos_i = the 1-based position of its i-th
    relevant item in the ranking (ascending ``0.5 * (K - q . b)``, ties by database index).

    * ``topk=None``, mAP@all: ``AP = (1/R) sum_{i=1..R} i / pos_i`` (0 if R = 0).
    * ``topk=k, mode="window"``, the DJSRH / DCMH ``calc_map_k`` (``calculate_top_map``)
      convention: only positions 1..k count, normalised by the relevant items inside the window:
      ``AP = (1/R_k) sum_{i=1..R_k} i / pos_i`` with R_k = relevant in 1..k (0 if R_k = 0).
    * ``topk=k, mode="first_relevant"``, the AGAH / DGCPN ``calc_map_k`` convention: the first
      ``m = min(k, R)`` relevant items wherever they rank: ``AP = (1/m) sum_{i=1..m} i / pos_i``
      (0 if R = 0).

    Both mAP@k equal mAP@all for k >= n_db. (The original codebases use non-stable sorts; here
    ties always go by database index.)

    ``q_codes`` may be real-valued (asymmetric CMFAH-style ``z_q . B_x``, ranked by descending
    score). ``chunk_size``: query rows per chunk (default from the database size); ``backend``:
    "auto" (numpy sort/reduction on CPU, torch on CUDA) or "torch". Neither changes the result.
    """
    return float(np.mean(hamming_ap(q_codes, db_codes, q_labels, db_labels, topk, mode,
                                    chunk_size=chunk_size, backend=backend)))


# ----------------------------------------------------------------------------- P@K, PR
def precision_at_k(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array,
                   ks: Sequence[int], *, chunk_size: Optional[int] = None, backend: str = "auto") -> np.ndarray:
    """Mean over queries of the precision of the top-k Hamming ranking (ties by index), one value
    per k (float64 array, same order as ``ks``). ``k > n_db``: precision of the whole database
    (divided by ``n_db``). Queries with no relevant item count as 0. Real-valued queries allowed."""
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = [ks]
    ks = [_positive_int(k, "ks") for k in ks]
    if not ks:
        raise ValueError("ks must be a non-empty sequence of positive integers")
    inp = _prepare(q_codes, db_codes, q_labels, db_labels)
    n_db = inp.db.shape[0]
    eff = [min(k, n_db) for k in ks]
    kmax, cols = max(eff), [k - 1 for k in eff]

    def hits_np(rs: np.ndarray) -> np.ndarray:
        return np.cumsum(rs[:, :kmax], axis=1, dtype=np.int64)[:, cols]

    def hits_torch(rs: torch.Tensor) -> torch.Tensor:
        return rs[:, :kmax].cumsum(1, dtype=torch.int64)[:, cols]

    hits = _ranked(inp, chunk_size, backend, hits_np, hits_torch)         # (n_q, len(ks))
    return (hits / np.asarray(eff, dtype=np.float64)).mean(0)


def pr_curve(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array, *,
             chunk_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall), float64 arrays (K + 1,) over Hamming radius r = 0..K: a query retrieves
    ``dist <= r``. Precision at r: mean over the queries retrieving >= 1 item (the others are
    excluded; NaN if none); recall at r: mean over the queries with >= 1 relevant item (NaN if none).
    """
    retrieved, hits, n_rel = _radius_counts(_prepare(q_codes, db_codes, q_labels, db_labels), chunk_size)
    got, has = retrieved > 0, n_rel > 0
    with np.errstate(invalid="ignore", divide="ignore"):   # 0/0 -> NaN: nothing to average
        prec = np.where(got, hits / np.maximum(retrieved, 1), 0.0).sum(0) / got.sum(0)
        rec = (hits[has] / n_rel[has, None]).sum(0) / has.sum()
    return prec, rec


def pr_counts(q_codes: Array, db_codes: Array, q_labels: Array, db_labels: Array, *,
              chunk_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pair counts over Hamming radius r = 0..K, summed over all (query, item) pairs: (relevant
    pairs with ``dist <= r``, all pairs with ``dist <= r``, relevant pairs, pairs), int64. The
    micro-averaged PR curve (TensorBoard's PR curves) follows from them."""
    inp = _prepare(q_codes, db_codes, q_labels, db_labels)
    retrieved, hits, n_rel = _radius_counts(inp, chunk_size)
    return hits.sum(0), retrieved.sum(0), int(n_rel.sum()), inp.q.shape[0] * inp.db.shape[0]


def _radius_counts(inp: _Inputs, chunk_size: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: items retrieved and relevant items retrieved within radius r = 0..K ((n_q, K + 1)
    each), and its number of relevant items (n_q,)."""
    n_q, K, dev = inp.q.shape[0], inp.bits, inp.q.device
    rows = min(_chunk_rows(inp, chunk_size), n_q)
    buf = _buffers(inp, rows)
    nb = K + 2                                   # buckets 0..K, K+1 = never retrieved
    thresholds = torch.arange(-K, K + 1, 2, dtype=torch.float64, device=dev)  # K - 2r, ascending
    retrieved, hits = np.empty((n_q, K + 1), np.int64), np.empty((n_q, K + 1), np.int64)
    n_rel = np.empty(n_q, np.int64)
    kd = torch.int32 if rows * nb * 2 < 2**31 else torch.int64
    row_off = (torch.arange(rows, device=dev, dtype=kd) * nb)[:, None]
    for s in range(0, n_q, rows):
        e = min(s + rows, n_q)
        sc = _scores(inp, s, e, buf)
        if not inp.binary:   # smallest r with score >= K - 2r  =  #{thresholds > score}
            sc = (K + 1) - torch.searchsorted(thresholds, sc, right=True, out_int32=True)
        rel = _relevance(inp, s, e, buf)
        # one histogram over (query row, radius bucket, relevant): key = (row * nb + bucket) * 2 + rel
        key = torch.add(sc, row_off[:e - s], out=buf("key", kd, e - s)).mul_(2).add_(rel)
        h = torch.bincount(key.view(-1), minlength=(e - s) * nb * 2).view(e - s, nb, 2)
        h = h[:, :K + 1].cumsum(1).cpu().numpy()
        retrieved[s:e], hits[s:e], n_rel[s:e] = h.sum(2), h[:, :, 1], rel.sum(1).cpu().numpy()
    return retrieved, hits, n_rel
