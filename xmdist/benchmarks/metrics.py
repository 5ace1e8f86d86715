"""Metric benchmark: hashing mAP@all and COCO-5K R@K, xmdist against per-query loops (see launch/bench.py).

Hashing (NUS-WIDE scale by default: 2,100 queries x 193,734 database items, 64 bits, 21 labels):
random multi-hot labels and +-1 codes correlated with them (code = sign of the sum of the
item's label prototypes plus noise), so mAP is far from trivial. ``xmdist.metrics.hamming_map``
(mAP@all) over all queries against the straightforward per-query numpy loop (Hamming distance,
``np.argsort(kind="stable")``, cumulative precision). The loop is timed on the first
``--loop-queries`` queries and extrapolated linearly to all queries; its per-query APs are
compared with ``hamming_ap`` on the same queries.

COCO-5K (5,000 images, 25,000 captions, d=1024): random unit vectors rounded to a 2^-10 grid, so
every dot product is exact in float32 whatever the summation order and ranks can be compared
exactly (the grid also creates score ties, which exercises the tie rule). ``i2t_t2i_ranks`` +
``summarize_ranks`` (what ``recall_at_k`` runs for folds=1) against VSE++'s per-query loop with a
stable descending argsort, timed on ``--coco-loop-queries`` images and as many captions and
extrapolated per direction; ranks compared on those queries.

Memory: host peak RSS increase during the call, sampled every 5 ms from /proc/self/statm (an
under-estimate only for spikes shorter than that); numpy loop: tracemalloc peak;
GPU: ``torch.cuda.max_memory_allocated``. With CUDA the xmdist calls are timed on the GPU too.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import threading
import time
import tracemalloc

import numpy as np
import torch

from xmdist.metrics import hamming_ap, hamming_map, i2t_t2i_ranks, summarize_ranks, to_codes
from xmdist.metrics import hashing

GB = 2**30


class PeakRSS:
    """Peak increase of the process's resident set over a block, polled from /proc/self/statm."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.page = interval, os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def increase_gb(self) -> float:
        return (self.peak - self.base) / GB


def _sync(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


# ----------------------------------------------------------------------------- hashing
def hashing_data(n_q: int, n_db: int, bits: int, n_labels: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    n = n_q + n_db
    freq = rng.uniform(0.02, 0.25, n_labels)                       # uneven label frequencies
    labels = rng.random((n, n_labels), dtype=np.float32) < freq.astype(np.float32)
    empty = np.flatnonzero(~labels.any(1))
    labels[empty, rng.integers(0, n_labels, empty.size)] = True     # every item has a label
    proto = rng.standard_normal((n_labels, bits), dtype=np.float32)
    h = labels.astype(np.float32) @ proto
    h += noise * rng.standard_normal((n, bits), dtype=np.float32)
    codes = to_codes(h)
    labels = labels.astype(np.float32)
    return codes[:n_q], codes[n_q:], labels[:n_q], labels[n_q:]


def loop_ap(qB: np.ndarray, rB: np.ndarray, qL: np.ndarray, rL: np.ndarray) -> np.ndarray:
    """The straightforward per-query numpy mAP@all (DCMH calc_map with a stable sort)."""
    K = rB.shape[1]
    aps = np.zeros(len(qB))
    for i in range(len(qB)):
        hamm = 0.5 * (K - rB @ qB[i])
        gnd = (rL @ qL[i]) > 0
        gnd = gnd[np.argsort(hamm, kind="stable")]
        tsum = int(gnd.sum())
        if tsum == 0:
            continue
        count = np.arange(1, tsum + 1, dtype=np.float64)
        tindex = np.flatnonzero(gnd) + 1.0
        aps[i] = np.mean(count / tindex)
    return aps


def bench_hashing(args: argparse.Namespace) -> dict:
    qB, rB, qL, rL = hashing_data(args.queries, args.db, args.bits, args.labels, args.noise, args.seed)
    L = min(args.loop_queries, args.queries)
    out = {"queries": args.queries, "db": args.db, "bits": args.bits, "labels": args.labels,
           "relevant_fraction": float(((qL[:50] @ rL.T) > 0).mean()),
           "chunk_rows": max(1, hashing.CHUNK_ELEMENTS // args.db),
           "cpu_threads": torch.get_num_threads()}
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        m = hamming_map(qB, rB, qL, rL)
        t_x, c_x = time.perf_counter() - t0, time.process_time() - c0
    out.update({"map_all": m, "xmdist_cpu_s": t_x, "xmdist_cpu_process_time_s": c_x,
                "xmdist_cpu_peak_rss_increase_gb": mem.increase_gb})

    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ref = loop_ap(qB[:L], rB, qL[:L], rL)
    t_loop, c_loop = time.perf_counter() - t0, time.process_time() - c0
    loop_peak = tracemalloc.get_traced_memory()[1] / GB
    tracemalloc.stop()
    got = hamming_ap(qB[:L], rB, qL[:L], rL)
    loop_all = t_loop * args.queries / L
    out.update({
        "loop_queries": L, "loop_s_measured": t_loop, "loop_s_per_query": t_loop / L,
        "loop_s_extrapolated": loop_all,
        "loop_extrapolation": f"linear: time of the first {L} queries x {args.queries}/{L}",
        "speedup_cpu_vs_loop": loop_all / t_x,
        "loop_process_time_s_extrapolated": c_loop * args.queries / L,
        "speedup_cpu_process_time": c_loop * args.queries / L / c_x,
        "max_abs_diff_ap_on_loop_queries": float(np.abs(got - ref).max()),
        "abs_diff_map_on_loop_queries": abs(float(got.mean()) - float(ref.mean())),
        "loop_tracemalloc_peak_gb": loop_peak,
    })
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        data = [torch.from_numpy(x).to(dev) for x in (qB, rB, qL, rL)]
        hamming_map(data[0][:64], data[1], data[2][:64], data[3])   # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = _sync(dev)
        m_gpu = hamming_map(*data)
        t_gpu = _sync(dev) - t0
        out["gpu"] = {"device": torch.cuda.get_device_name(dev), "xmdist_s": t_gpu,
                      "speedup_vs_loop": loop_all / t_gpu, "speedup_vs_xmdist_cpu": t_x / t_gpu,
                      "abs_diff_map_vs_cpu": abs(m_gpu - m),
                      "max_memory_allocated_gb": (torch.cuda.max_memory_allocated(dev) - base) / GB}
        del data
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- COCO-5K
def coco_data(n_img: int, dim: int, cpi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.round(x * 1024) / np.float32(1024)   # 2^-10 grid: exact float32 dot products

    return unit(n_img), unit(n_img * cpi)


def loop_ranks(img: np.ndarray, cap: np.ndarray, n_i: int, n_t: int, cpi: int):
    """VSE++'s i2t / t2i loops, with a stable descending argsort (ties: lower index first)."""
    t0 = time.perf_counter()
    i2t = np.zeros(n_i, dtype=np.int64)
    for i in range(n_i):
        inds = np.argsort(-(cap @ img[i]), kind="stable")
        i2t[i] = min(np.where(inds == j)[0][0] for j in range(cpi * i, cpi * i + cpi))
    t1 = time.perf_counter()
    t2i = np.zeros(n_t, dtype=np.int64)
    for j in range(n_t):
        inds = np.argsort(-(img @ cap[j]), kind="stable")
        t2i[j] = np.where(inds == j // cpi)[0][0]
    t2 = time.perf_counter()
    return i2t, t2i, t1 - t0, t2 - t1


def bench_coco(args: argparse.Namespace) -> dict:
    cpi = 5
    img, cap = coco_data(args.coco_images, args.coco_dim, cpi, args.seed + 1)
    n_i = min(args.coco_loop_queries, len(img))
    n_t = min(args.coco_loop_queries, len(cap))
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        i2t, t2i = i2t_t2i_ranks(img, cap, cpi)
        res = summarize_ranks(i2t, t2i)
        t_x, c_x = time.perf_counter() - t0, time.process_time() - c0
    c0 = time.process_time()
    r_i2t, r_t2i, t_i, t_t = loop_ranks(img, cap, n_i, n_t, cpi)
    c_loop = time.process_time() - c0
    loop_all = t_i * len(img) / n_i + t_t * len(cap) / n_t
    out = {"images": len(img), "captions": len(cap), "dim": args.coco_dim,
           "rsum": res["rsum"], "i2t_r1": res["i2t_r1"], "t2i_r1": res["t2i_r1"],
           "xmdist_cpu_s": t_x, "xmdist_cpu_process_time_s": c_x,
           "xmdist_cpu_peak_rss_increase_gb": mem.increase_gb,
           "loop_images": n_i, "loop_captions": n_t, "loop_i2t_s_measured": t_i, "loop_t2i_s_measured": t_t,
           "loop_s_extrapolated": loop_all,
           "loop_extrapolation": f"linear per direction: i2t x {len(img)}/{n_i}, t2i x {len(cap)}/{n_t}",
           "speedup_cpu_vs_loop": loop_all / t_x,
           "loop_process_time_s_measured": c_loop,
           "max_abs_rank_diff_on_loop_queries": int(max(np.abs(i2t[:n_i].numpy() - r_i2t).max(),
                                                        np.abs(t2i[:n_t].numpy() - r_t2i).max()))}
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gi, gc = torch.from_numpy(img).to(dev), torch.from_numpy(cap).to(dev)
        i2t_t2i_ranks(gi[:100], gc[:500], cpi)                       # warm-up
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = _sync(dev)
        g_i2t, g_t2i = i2t_t2i_ranks(gi, gc, cpi)
        summarize_ranks(g_i2t, g_t2i)
        t_gpu = _sync(dev) - t0
        out["gpu"] = {"device": torch.cuda.get_device_name(dev), "xmdist_s": t_gpu,
                      "speedup_vs_loop": loop_all / t_gpu,
                      "ranks_equal_cpu": bool(torch.equal(g_i2t.cpu(), i2t) and torch.equal(g_t2i.cpu(), t2i)),
                      "max_memory_allocated_gb": (torch.cuda.max_memory_allocated(dev) - base) / GB}
    return out


# ----------------------------------------------------------------------------- entry points
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=2100, help="hashing queries (NUS-WIDE TC-21: 2100)")
    p.add_argument("--db", type=int, default=193734, help="hashing database items")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--noise", type=float, default=2.0, help="code noise (relative to label prototypes)")
    p.add_argument("--loop-queries", type=int, default=200, help="queries the numpy loop is timed on")
    p.add_argument("--coco-images", type=int, default=5000)
    p.add_argument("--coco-dim", type=int, default=1024)
    p.add_argument("--coco-loop-queries", type=int, default=100,
                   help="images (i2t) and captions (t2i) the per-query loop is timed on")
    p.add_argument("--skip-hashing", action="store_true")
    p.add_argument("--skip-coco", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    for name in ("queries", "db", "bits", "labels", "loop_queries", "coco_images", "coco_dim", "coco_loop_queries"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    result = {
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m_at_start": os.getloadavg()[0],
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "torch": torch.__version__, "numpy": np.__version__,
    }
    if not args.skip_hashing:
        result["hashing_map_all"] = bench_hashing(args)
    if not args.skip_coco:
        result["coco5k_recall"] = bench_coco(args)
    result["peak_rss_gb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    return result
