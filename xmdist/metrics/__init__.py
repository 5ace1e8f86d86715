"""Retrieval metrics.

* :mod:`xmdist.metrics.retrieval`: common-space image<->text R@K / medr / meanr (VSE++ conventions).
* :mod:`xmdist.metrics.hashing`: Hamming-ranking mAP (mAP@all and both mAP@k conventions), P@K
  and PR curves for cross-modal hashing.
"""
from xmdist.metrics.hashing import hamming_ap, hamming_map, pr_curve, precision_at_k, to_codes
from xmdist.metrics.retrieval import i2t_t2i_ranks, recall_at_k, summarize_ranks

__all__ = ["recall_at_k", "i2t_t2i_ranks", "summarize_ranks",
           "to_codes", "hamming_ap", "hamming_map", "precision_at_k", "pr_curve"]
