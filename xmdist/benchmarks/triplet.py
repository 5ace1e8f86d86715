"""Triplet-loss benchmark: CMFAH's global-batch triplets for one rank, sorted prefix sums
against the naive n x N x N form (see launch/bench.py).

    python launch/bench.py triplet --global-batch 1024 4096 16384 65536 --local 256 --dim 512 --naive-max 2048

For each global batch N, one rank's share: ``n = --local`` anchors (with gradient) against N
gathered rows of which the first n are the anchors' own (within a modality, ``self_index``), no
process group; labels multi-hot with ``--labels`` columns at ``--label-density``. Each row times
:func:`xmdist.losses.cmfah.triplet_loss` forward + backward (``mining="all"``, the exact mean over
every valid triplet, and ``"hard"``) and, for N <= ``--naive-max``, the same loss computed as a
dense (n, N, N) hinge tensor. Every (N, form) runs in a fresh process; peak memory as
:mod:`xmdist.benchmarks.memory` measures it, inputs excluded (``inputs_gb``).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from xmdist.benchmarks.memory import GB, PeakMemory, in_fresh_process
from xmdist.losses.cmfah import triplet_loss


def naive_triplet(a: torch.Tensor, la: torch.Tensor, x: torch.Tensor, lx: torch.Tensor, margin: float,
                  self_index: torch.Tensor) -> torch.Tensor:
    """The mean over valid (a, p, q) of ``[m - s_ap + s_aq]+`` with an (n, N, N) tensor."""
    s = F.normalize(a, dim=1) @ F.normalize(x, dim=1).t()
    pos = (la @ lx.t()) > 0
    own = self_index[:, None] == torch.arange(x.shape[0], device=x.device)[None, :]
    pos, neg = pos & ~own, ~pos & ~own
    valid = pos[:, :, None] & neg[:, None, :]
    hinge = (margin - s[:, :, None] + s[:, None, :]).clamp_min(0) * valid
    return hinge.sum() / valid.sum().clamp_min(1)


def _measure(form: str, big_n: int, cfg: dict) -> dict:
    torch.manual_seed(cfg["seed"])
    dev = torch.device(cfg["device"])
    n = min(cfg["local"], big_n)

    def inputs(size: int) -> tuple:
        x = torch.randn(size, cfg["dim"], device=dev)
        labels = (torch.rand(size, cfg["labels"], device=dev) < cfg["label_density"]).float()
        return x, labels

    def step(x: torch.Tensor, labels: torch.Tensor) -> float:
        a = x[:n].clone().requires_grad_()
        others = torch.cat([a, x[n:]])
        own = torch.arange(n, device=dev)
        t0 = time.perf_counter()
        if form == "naive":
            loss = naive_triplet(a, labels[:n], others, labels, cfg["margin"], own)
        else:
            loss = triplet_loss(a, labels[:n], others, labels, cfg["margin"], self_index=own, mining=form)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    step(*inputs(min(2 * n, big_n)))  # warm-up
    x = inputs(big_n)
    with PeakMemory(dev) as peak:
        seconds = step(*x)
    return {"fwd_bwd_s": seconds, "peak_gb": peak.gb, "peak_exact": peak.exact,
            "inputs_gb": sum(t.numel() * t.element_size() for t in x) / GB}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--global-batch", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="N values")
    p.add_argument("--local", type=int, default=256, help="anchors on this rank (n)")
    p.add_argument("--dim", type=int, default=512, help="feature width (F_v, F_t: 512 in the paper)")
    p.add_argument("--labels", type=int, default=24, help="label columns (MIRFlickr: 24)")
    p.add_argument("--label-density", type=float, default=0.1)
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--naive-max", type=int, default=2048, help="largest N the (n, N, N) form runs at")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = {"local": args.local, "dim": args.dim, "labels": args.labels, "label_density": args.label_density,
           "margin": args.margin, "device": device, "seed": args.seed}
    result = {"machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_avg_1m_at_start": os.getloadavg()[0],
                          "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
              "torch": torch.__version__, "config": {**cfg, "naive_max": args.naive_max}, "rows": []}
    for big_n in sorted(args.global_batch):
        forms = ["all", "hard"] + (["naive"] if big_n <= args.naive_max else [])
        result["rows"].append({"N": big_n, **{f: in_fresh_process(_measure, f, big_n, cfg) for f in forms}})
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    return result
