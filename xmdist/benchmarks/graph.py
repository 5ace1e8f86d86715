"""Graph benchmark: SGRN graph + loss and DJSRH target for one rank, sparse vs dense N x N (see launch/bench.py).

    python launch/bench.py graph --global-batch 1024 4096 16384 65536 --local 256 \\
        --dim-i 4096 --dim-t 1386 --bits 64 --k 64 --dense-max 16384

For each global batch N, one rank's share: ``n = --local`` rows against N gathered rows, no
process group. Inputs: image features ``relu(randn)`` (N, dim_i), binary bag-of-words text
(N, dim_t) with ``--text-density`` ones, hash-layer outputs (N, bits) of which the first n are
this rank's leaves (with gradient) and the rest stand in for the other ranks' gathered rows.
Each row times the graph/target construction and the loss forward + backward (down to the
local hash-layer outputs), for:

- ``sgrn.sparse``: :func:`xmdist.losses.hashing.sgrn_graph` (top-k of local rows, sparse CSR
  graphs). Its all-gathers of per-row tensors (k-NN lists, theta, row norms) return this rank's
  rows followed by random rows "as if gathered" (random neighbour indices, values in [0.5, 1)),
  so the graph has the real size (~2 N k entries) but only the local rows are true k-NN lists.
- ``sgrn.dense``: :func:`~xmdist.losses.hashing.sgrn_graph_dense` on all N rows (every matrix
  N x N, O(N^3) products), then its first n rows; only for N <= ``--dense-max``.
- ``djsrh.low_memory``: :func:`~xmdist.losses.hashing.djsrh_target` (local rows, O(n N + n d));
  ``djsrh.dense``: ``djsrh_target_dense`` (N x N) then its first n rows (N <= ``--dense-max``).

Memory: every (N, method) runs in a fresh spawned process, after a small warm-up; the peak over
the measured block as :mod:`xmdist.benchmarks.memory` measures it. Inputs (features, hidden
outputs) are allocated before the block and reported separately (``inputs_gb``); a real rank
holds them too.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from xmdist.benchmarks.memory import GB, PeakMemory, in_fresh_process
from xmdist.losses import hashing

SGRN = dict(tau=0.05, eta=0.4, beta=0.9, lam=0.3, gamma=0.5, mu=1.5)
DJSRH = dict(beta=0.9, eta=0.4, mu=1.5)
METHODS = {"sgrn": ("sparse", "dense"), "djsrh": ("low_memory", "dense")}


class _AsIfGathered:
    """Stand-in all-gather: this rank's rows first, then random rows for the other ranks."""

    def __init__(self, big_n: int):
        self.big_n = big_n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.big_n - x.shape[0],) + tuple(x.shape[1:])
        if x.dtype == torch.int64:
            rest = torch.randint(0, self.big_n, shape, device=x.device)
        else:
            rest = torch.rand(shape, dtype=x.dtype, device=x.device) / 2 + 0.5
        return torch.cat([x, rest])


def _inputs(big_n: int, cfg: dict, dev: torch.device, dtype: torch.dtype) -> dict:
    fi = torch.randn(big_n, cfg["dim_i"], device=dev, dtype=dtype).relu_()
    ft = torch.rand(big_n, cfg["dim_t"], device=dev, dtype=dtype).lt_(cfg["text_density"])
    h = torch.randn(2, big_n, cfg["bits"], device=dev, dtype=dtype)
    return {"fi": fi, "ft": ft, "h": h}


def _step(method: str, impl: str, x: dict, n: int, cfg: dict, sync) -> tuple[float, float]:
    """Build this rank's target, then loss forward + backward; returns (target_s, loss_s)."""
    fi, ft, big_n = x["fi"], x["ft"], x["fi"].shape[0]
    t0 = sync()
    if method == "sgrn" and impl == "sparse":
        target = hashing.sgrn_graph(fi[:n], ft[:n], fi, ft, 0, cfg["k"], **SGRN,
                                    gather_rows=_AsIfGathered(big_n))
    elif method == "sgrn":
        full = hashing.sgrn_graph_dense(fi, ft, cfg["k"], **SGRN)
        target = hashing.SGRNGraph(full.S[:n].clone(), full.S_I[:n].clone(), full.S_T[:n].clone())
        del full
    elif impl == "low_memory":
        target = hashing.djsrh_target(fi[:n], ft[:n], fi, ft, **DJSRH)
    else:
        target = hashing.djsrh_target_dense(fi, ft, **DJSRH)[:n].clone()
    t1 = sync()
    hi, ht = (x["h"][m, :n].clone().requires_grad_() for m in (0, 1))
    hi_all, ht_all = (torch.cat([h, x["h"][m, n:]]) for m, h in ((0, hi), (1, ht)))
    bi, bt, bi_all, bt_all = (hashing.hash_codes(h, 2.0) for h in (hi, ht, hi_all, ht_all))
    if method == "sgrn":
        loss = hashing.sgrn_loss(hi, ht, hi_all, ht_all, bi, bt, bi_all, bt_all, target, rho=0.5)["loss"]
    else:
        loss = hashing.djsrh_loss(bi, bt, bi_all, bt_all, target, l1=0.1, l2=0.1)["loss"]
    loss.backward()
    return t1 - t0, sync() - t1


def _measure(method: str, impl: str, big_n: int, cfg: dict) -> dict:
    """One configuration, in a fresh process: warm-up at N = 2n, then the measured step."""
    torch.manual_seed(cfg["seed"])
    dev, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    cuda = dev.type == "cuda"

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    n = min(cfg["local"], big_n)
    _step(method, impl, _inputs(min(2 * n, big_n), cfg, dev, dtype), n, cfg, sync)
    x = _inputs(big_n, cfg, dev, dtype)
    out = {"inputs_gb": sum(t.numel() * t.element_size() for t in x.values()) / GB}
    with PeakMemory(dev) as peak:
        target_s, loss_s = _step(method, impl, x, n, cfg, sync)
    if not cuda:
        out["peak_exact"] = peak.exact
    out.update({"target_s": target_s, "loss_fwd_bwd_s": loss_s, "total_s": target_s + loss_s,
                "peak_gb": peak.gb})
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--global-batch", type=int, nargs="+", default=[1024, 4096, 16384], help="N values")
    p.add_argument("--local", type=int, default=256, help="rows on this rank (n)")
    p.add_argument("--dim-i", type=int, default=4096, help="image feature dimension")
    p.add_argument("--dim-t", type=int, default=1386, help="bag-of-words dimension")
    p.add_argument("--text-density", type=float, default=0.02, help="fraction of ones in the BoW")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--k", type=int, default=64, help="k-NN size (self included)")
    p.add_argument("--dense-max", type=int, default=16384, help="largest N the dense references run at")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = {"local": args.local, "dim_i": args.dim_i, "dim_t": args.dim_t, "bits": args.bits,
           "k": args.k, "text_density": args.text_density, "dtype": args.dtype, "device": device,
           "seed": args.seed}
    result = {"machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_avg_1m_at_start": os.getloadavg()[0],
                          "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
              "torch": torch.__version__, "config": {**cfg, "sgrn": SGRN, "djsrh": DJSRH,
                                                      "dense_max": args.dense_max},
              "rows": []}
    for big_n in sorted(args.global_batch):
        row = {"N": big_n}
        for method, impls in METHODS.items():
            row[method] = {impl: in_fresh_process(_measure, method, impl, big_n, cfg)
                           for impl in impls if impl != "dense" or big_n <= args.dense_max}
        result["rows"].append(row)
    sparse = [(r["N"], r["sgrn"]["sparse"].get("peak_gb")) for r in result["rows"]]
    result["sgrn_sparse_peak_gb_per_million_rows"] = {
        n: peak / n * 1e6 for n, peak in sparse if peak is not None}   # ~constant if linear in N
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]  # other processes skew CPU times
    return result
