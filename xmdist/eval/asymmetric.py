"""The ``hamming_asymmetric`` protocol: ``hamming`` plus the asymmetric quantised distance.

Besides every metric of the ``hamming`` protocol (query sign codes against database codes), the
real-valued query outputs ``z_q`` rank the database codes ``B_x`` by the score ``z_q . B_x``
(higher is closer; :mod:`xmdist.metrics.hashing` ranks real-valued queries this way), as a
search with an uncompressed query does: the same metrics under the prefix ``asym_``
(``asym_map_i2t``, ``asym_map50_window_t2i``, ``asym_curves_i2t``, ...). The best checkpoint is
still picked by the Hamming mAP (``map``).
"""
from __future__ import annotations

from xmdist.eval.hamming import HammingProtocol, _codes, score
from xmdist.eval.protocol import EvalRequest, register_protocol


def _real(out: dict) -> dict:
    """Query outputs kept real-valued (float32 on the CPU), labels as they are."""
    return {"image": out["image"].float(), "text": out["text"].float(), "labels": out["labels"]}


@register_protocol
class AsymmetricProtocol(HammingProtocol):
    name = "hamming_asymmetric"
    query_post = staticmethod(_real)

    def score(self, q: dict, db: dict, req: EvalRequest) -> dict:
        metrics = score(_codes(q), db, topk=req.topk, curves=req.curves)
        asym = score(q, db, topk=req.topk, curves=req.curves)
        metrics.update({f"asym_{k}": v for k, v in asym.items() if k.startswith(("map", "curves_"))})
        return metrics

    def format(self, metrics: dict) -> str:
        return (super().format(metrics) + f" | asymmetric mAP@all i2t {metrics['asym_map_i2t']:.4f} "
                f"t2i {metrics['asym_map_t2i']:.4f}")
