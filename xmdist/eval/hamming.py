"""The ``hamming`` protocol: cross-modal hashing, a query split against a retrieval database.

Every rank encodes its share of both splits; the sign codes (0 -> +1) and labels are gathered
once and scored on rank 0 with :mod:`xmdist.metrics.hashing` (METHODS.md section 4): mAP@all,
mAP@k in both conventions (``window``: DJSRH/DCMH; ``first``: AGAH/DGCPN), P@K and the PR
curve over Hamming radius; ``chance`` is the fraction of relevant (query, item) pairs, the mAP
of a random ranking. ``i2t`` ranks the database's texts for image queries, ``t2i`` the reverse.
Relevance: a query and an item are relevant when they share a label (``encode_batch``'s
``labels``).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from xmdist.dist import on_main
from xmdist.eval.encode import encode_split
from xmdist.eval.protocol import EvalRequest, Protocol, register_protocol
from xmdist.eval.report import hamming_pr_curves, hamming_report, hashing_examples
from xmdist.metrics.hashing import hamming_map, pr_curve, precision_at_k, to_codes

log = logging.getLogger(__name__)

PK_POINTS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)


def _codes(out: dict) -> dict:
    """Sign codes of the real-valued outputs; labels as they are (kept per batch: 1 bit per value
    would do, a byte is what the metrics take)."""
    return {"image": to_codes(out["image"].float()), "text": to_codes(out["text"].float()), "labels": out["labels"]}


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


def format_hashing(m: dict) -> str:
    return (f"mAP@all i2t {m['map_i2t']:.4f} t2i {m['map_t2i']:.4f} | mAP@50 (window) i2t "
            f"{m['map50_window_i2t']:.4f} t2i {m['map50_window_t2i']:.4f} | chance {m['chance']:.4f}")


@register_protocol
class HammingProtocol(Protocol):
    name = "hamming"
    score_key = "map"  # mean of mAP@all i2t and t2i

    def run(self, req: EvalRequest) -> tuple[dict, dict]:
        t0, cfg = time.time(), req.method.cfg
        database = req.shards.split(req.database or cfg.eval.database_split or cfg.data.train_split)
        # Decoded in this process (no loader workers): feature rows are cheap, and forking a loader
        # right after the query split's loader shut down can deadlock the child in CPython 3.11 (a
        # thread of the old loader exiting while fork() runs holds the interpreter's thread-list lock).
        q, db = (encode_split(req.method, req.model, split, req.decoder, req.env, req.batch_size, 0, cap,
                              req.autocast, post=post)
                 for split, cap, post in ((req.split, req.max_items, self.query_post), (database, 0, _codes)))

        def scored() -> dict:
            metrics = self.score(q, db, req)
            log.info("eval %s -> %s (%d queries, %d items, %d bits) in %.1fs: %s", req.split.name, database.name,
                     len(q["labels"]), len(db["labels"]), q["image"].shape[1], time.time() - t0,
                     format_hashing(metrics))
            return metrics

        metrics = on_main(scored, req.env)
        metrics["database_split"] = database.name
        return metrics, {"query": _codes(q), "db": db}

    query_post = staticmethod(_codes)  # what is kept of each query batch (subclasses: real values)

    def score(self, q: dict, db: dict, req: EvalRequest) -> dict:
        """Metrics of the gathered query outputs against the database codes (rank 0)."""
        return score(q, db, topk=req.topk, curves=req.curves)

    def log(self, req: EvalRequest, metrics: dict, encoded: dict) -> None:
        """Each bit's balance over the database, TensorBoard PR curves per direction and code
        length, retrieval examples; with curves, the PR and P@K curves as scalars and tables."""
        for k in ("image", "text"):
            req.logger.histogram(f"{req.prefix}bit_balance_{k}", bit_balance(encoded["db"][k]), req.step)
        if req.logger.writer is not None:  # rank 0 only
            hamming_pr_curves(req.logger.writer, encoded, req.prefix, req.step)
        if req.logger.writer is not None and req.examples:
            names = req.method.cfg.data.labels or req.shards.info.get("label_names", [])
            for name, q_mod, db_mod in (("i2t", "image", "text"), ("t2i", "text", "image")):
                req.logger.text(f"{req.prefix}examples/{name}",
                                hashing_examples(encoded, q_mod, db_mod, names, req.examples), req.step)
        for name in ("i2t", "t2i"):
            curves = metrics.get(f"curves_{name}")
            if curves:
                pre = f"{req.prefix}pr_{name}"
                req.logger.curve(f"{pre}/precision_by_radius", curves["radius"], curves["pr_precision"], req.step)
                req.logger.curve(f"{pre}/recall_by_radius", curves["radius"], curves["pr_recall"], req.step)
                req.logger.curve(f"{req.prefix}precision_at_k_{name}", curves["k"], curves["precision_at_k"],
                                 req.step)

    def report(self, req: EvalRequest, metrics: dict, encoded: dict, writer, step: int, title: str,
               examples: int) -> dict:
        cfg = req.method.cfg
        names = cfg.data.labels or req.shards.info.get("label_names", [])
        balance = {k: bit_balance(encoded["db"][k]) for k in ("image", "text")}
        hamming_report(writer, req.split, metrics, encoded, balance, names, step, title, examples)
        return {}

    def format(self, metrics: dict) -> str:
        return format_hashing(metrics)
