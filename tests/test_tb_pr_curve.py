"""Hashing PR curves in TensorBoard's PR Curves tab, from pair counts over Hamming radius: the same
curve ``SummaryWriter.add_pr_curve`` draws from every (query, item) pair's relevance and similarity."""
from __future__ import annotations

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray
from torch.utils.tensorboard import SummaryWriter

from xmdist.eval.report import add_hamming_pr_curve
from xmdist.metrics.hashing import pr_counts


def _curve(logdir, tag: str) -> np.ndarray:
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(tag)
    return make_ndarray(event.tensor_proto)


def test_counts_draw_the_curve_add_pr_curve_draws_from_all_pairs(tmp_path):
    rng = np.random.default_rng(0)
    bits, nq, nd = 16, 37, 150
    q = np.where(rng.random((nq, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    db = np.where(rng.random((nd, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    db[:20] = q[0]  # exact matches: distance 0
    ql = (rng.random((nq, 4)) < 0.3).astype(np.float32)
    dl = (rng.random((nd, 4)) < 0.3).astype(np.float32)
    ql[5] = 0  # a query without relevant items
    hits, retrieved, relevant, pairs = pr_counts(q, db, ql, dl)
    dist = 0.5 * (bits - q @ db.T)
    rel = (ql @ dl.T) > 0
    for r in range(bits + 1):  # the counts themselves, against the naive definition
        assert hits[r] == int((rel & (dist <= r)).sum()) and retrieved[r] == int((dist <= r).sum())
    assert relevant == int(rel.sum()) and pairs == nq * nd
    with SummaryWriter(str(tmp_path / "ours")) as w:
        add_hamming_pr_curve(w, "pr", hits, retrieved, relevant, pairs, 0)
    with SummaryWriter(str(tmp_path / "tb")) as w:  # similarity 1 - d/K: exact in binary for K = 16
        w.add_pr_curve("pr", torch.from_numpy(rel.ravel()), torch.from_numpy(1 - dist.ravel() / bits), 0,
                       num_thresholds=bits + 1)
    ours, theirs = _curve(tmp_path / "ours", "pr"), _curve(tmp_path / "tb", "pr")
    assert ours.shape == theirs.shape == (6, bits + 1)  # TP, FP, TN, FN, precision, recall
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
