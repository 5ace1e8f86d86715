"""Distributed cross-modal hashing evaluation: query split against a retrieval database.

Every rank encodes its share of both splits; the sign codes (0 -> +1) and labels are gathered
once and scored on rank 0 with :mod:`xmdist.metrics.hashing` (METHODS.md section 4): mAP@all,
mAP@k in both conventions (``window``: DJSRH/DCMH; ``first``: AGAH/DGCPN), P@K and the PR
curve over Hamming radius; ``chance`` is the fraction of relevant (query, item) pairs, the mAP
of a random ranking. ``i2t`` ranks the database's texts for image queries, ``t2i`` the reverse.
"""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from xmdist.data.info import Split
from xmdist.data.loader import EvalStream, make_loader
from xmdist.dist import DistEnv, broadcast_object, gather_variable
from xmdist.metrics.hashing import hamming_map, pr_curve, precision_at_k, to_codes

log = logging.getLogger(__name__)

PK_POINTS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)


@torch.no_grad()
def encode_codes(model: torch.nn.Module, split: Split, decoder, env: DistEnv, batch_size: int,
                 max_items: int = 0, autocast=None) -> dict[str, torch.Tensor]:
    """All ranks -> {"image", "text"} sign codes (n, K) and "labels" (n, L) of ``split``, by id."""
    was_training = model.training
    model.eval()
    stream = EvalStream(split, decoder, batch_size, env.rank, env.world_size, max_items)
    parts: dict[str, list] = {"ids": [], "image": [], "text": [], "labels": []}
    # Decoded in this process: feature rows are cheap, and forking a loader right after the query
    # split's loader shut down can deadlock the child in CPython 3.11 (a thread of the old loader
    # exiting while fork() runs holds the interpreter's thread-list lock).
    for batch in make_loader(stream, 0, pin_memory=False):
        with autocast() if autocast else contextlib.nullcontext():
            hi = model.encode_image(batch["features" if "features" in batch else "images"].to(env.device))
            ht = model.encode_text(batch["tags"].to(env.device))
        parts["ids"].append(batch["image_ids"])
        parts["image"].append(to_codes(hi.float()).cpu())
        parts["text"].append(to_codes(ht.float()).cpu())
        parts["labels"].append(batch["labels"])
    model.train(was_training)
    empty = {"ids": torch.zeros(0, dtype=torch.long), "image": torch.zeros(0, model.bits),
             "text": torch.zeros(0, model.bits), "labels": torch.zeros(0, decoder.num_labels, dtype=torch.uint8)}
    local = {k: (torch.cat(v) if v else empty[k]) for k, v in parts.items()}  # a rank may get no sample
    out = {k: gather_variable(v.to(env.device)).cpu() for k, v in local.items()}
    order = torch.argsort(out.pop("ids"))
    return {k: v[order] for k, v in out.items()}


def score(query: dict[str, torch.Tensor], db: dict[str, torch.Tensor], topk: int = 50,
          curves: bool = False) -> dict:
    """Hashing metrics of ``query`` against ``db`` (outputs of :func:`encode_codes`)."""
    ql, dl = query["labels"].float(), db["labels"].float()
    m: dict = {"num_queries": float(len(ql)), "num_database": float(len(dl)), "bits": float(query["image"].shape[1]),
               "chance": float(((ql @ dl.T) > 0).float().mean())}
    for name, q, d in (("i2t", query["image"], db["text"]), ("t2i", query["text"], db["image"])):
        m[f"map_{name}"] = hamming_map(q, d, ql, dl)
        m[f"map{topk}_window_{name}"] = hamming_map(q, d, ql, dl, topk=topk, mode="window")
        m[f"map{topk}_first_{name}"] = hamming_map(q, d, ql, dl, topk=topk, mode="first_relevant")
        if curves:
            ks = [k for k in PK_POINTS if k <= len(dl)]
            prec, rec = pr_curve(q, d, ql, dl)
            m[f"curves_{name}"] = {"k": ks, "precision_at_k": precision_at_k(q, d, ql, dl, ks).tolist(),
                                   "radius": list(range(len(prec))), "pr_precision": _nan_to_none(prec),
                                   "pr_recall": _nan_to_none(rec)}
    m["map"] = (m["map_i2t"] + m["map_t2i"]) / 2
    return m


def _nan_to_none(x: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in x]


def bit_balance(codes: torch.Tensor) -> torch.Tensor:
    """Per bit, the mean of the +-1 codes: 0 is a balanced bit, +-1 a constant (useless) one."""
    return codes.float().mean(0)


def evaluate_hashing(model: torch.nn.Module, query: Split, database: Split, decoder, env: DistEnv,
                     batch_size: int, max_queries: int = 0, autocast=None,
                     curves: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metrics, {"image", "text"} per-bit balance of the database codes); the metrics dict is
    identical on every rank."""
    t0 = time.time()
    q = encode_codes(model, query, decoder, env, batch_size, max_queries, autocast)
    db = encode_codes(model, database, decoder, env, batch_size, 0, autocast)
    metrics = None
    if env.is_main:
        metrics = score(q, db, curves=curves)
        log.info("eval %s -> %s (%d queries, %d items, %d bits) in %.1fs: %s", query.name, database.name,
                 len(q["labels"]), len(db["labels"]), q["image"].shape[1], time.time() - t0,
                 format_hashing(metrics))
    balance = {k: bit_balance(db[k]) for k in ("image", "text")}
    return broadcast_object(metrics), balance


def format_hashing(m: dict) -> str:
    return (f"mAP@all i2t {m['map_i2t']:.4f} t2i {m['map_t2i']:.4f} | mAP@50 (window) i2t "
            f"{m['map50_window_i2t']:.4f} t2i {m['map50_window_t2i']:.4f} | chance {m['chance']:.4f}")
