"""The ``common`` protocol: common-space retrieval, R@1/5/10, medr, meanr and rsum both ways.

Every rank encodes its own share of the split (:func:`xmdist.eval.encode.encode_split`), the
embeddings are gathered once, and the metrics are computed on rank 0 and broadcast, so no rank
sits in a collective while another encodes the whole split alone. Images are queries for their
``captions_per_image`` captions (i2t) and captions for their image (t2i); ``folds=5`` is the
COCO-1K protocol (mean over 1,000-image folds).
"""
from __future__ import annotations

import logging
import time

import torch

from xmdist.data.info import Split
from xmdist.dist import DistEnv, on_main
from xmdist.eval.encode import encode_split as encode_outputs
from xmdist.eval.protocol import EvalRequest, Protocol, register_protocol
from xmdist.eval.report import CURVE_KS, common_examples, common_report
from xmdist.metrics import recall_at_k

log = logging.getLogger(__name__)


class _CaptionModel:
    """The evaluation side of a caption method, for a bare model with ``encode_image(images)``
    and ``encode_text(tokens, lengths)``."""

    @staticmethod
    def encode_batch(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"image": model.encode_image(batch["images"]),
                "text": model.encode_text(batch["tokens"], batch["lengths"])}


def encode_split(model: torch.nn.Module, split: Split, decoder, env: DistEnv, dim: int, batch_size: int,
                 num_workers: int, captions_per_image: int, max_images: int = 0,
                 autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption model's (img (n, dim), cap (n * cpi, dim)) of the whole split, ordered by image id."""
    out = encode_outputs(_CaptionModel, model, split, decoder, env, batch_size, min(num_workers, 2), max_images,
                         autocast)
    img, cap = out["image"], out["text"]
    if img.shape[1] != dim or len(cap) != len(img) * captions_per_image:
        raise ValueError(f"split '{split.name}': encoded {tuple(img.shape)} images and {tuple(cap.shape)} "
                         f"captions; expected width {dim} and {captions_per_image} captions per image")
    return img, cap


def evaluate(model: torch.nn.Module, split: Split, decoder, env: DistEnv, dim: int, batch_size: int,
             num_workers: int, captions_per_image: int, folds: int = 1, max_images: int = 0,
             autocast=None) -> dict[str, float]:
    """R@K (i2t and t2i), medr, meanr and rsum of ``split``; identical dict on every rank."""
    t0 = time.time()
    img, cap = encode_split(model, split, decoder, env, dim, batch_size, num_workers, captions_per_image,
                            max_images, autocast)
    return score_split(img, cap, split.name, env, captions_per_image, folds, t0)


def score_split(img: torch.Tensor, cap: torch.Tensor, name: str, env: DistEnv, captions_per_image: int,
                folds: int = 1, t0: float | None = None) -> dict[str, float]:
    """Metrics of gathered embeddings, computed on rank 0 and broadcast."""
    def score() -> dict[str, float]:
        n = len(img) - len(img) % folds  # the 1K-fold protocol uses whole folds
        metrics = recall_at_k(img[:n], cap[: n * captions_per_image], folds=folds,
                              captions_per_image=captions_per_image)
        metrics["num_images"] = float(n)
        took = f" in {time.time() - t0:.1f}s" if t0 is not None else ""
        log.info("eval %s (%d images, %d fold(s))%s: %s", name, n, folds, took, format_metrics(metrics))
        return metrics

    return on_main(score, env)


def format_metrics(m: dict[str, float]) -> str:
    return (f"i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} medr {m['i2t_medr']:.0f} | "
            f"t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} medr {m['t2i_medr']:.0f} | "
            f"rsum {m['rsum']:.1f}")


def recall_curve(img: torch.Tensor, cap: torch.Tensor, cpi: int, folds: int) -> dict[str, list[float]]:
    """Recall@K for K = 1..50, both directions."""
    n = len(img) - len(img) % folds
    m = recall_at_k(img[:n], cap[: n * cpi], ks=CURVE_KS, folds=folds, captions_per_image=cpi)
    return {d: [m[f"{d}_r{k}"] for k in CURVE_KS] for d in ("i2t", "t2i")}


@register_protocol
class CommonProtocol(Protocol):
    name = "common"
    score_key = "rsum"

    def run(self, req: EvalRequest) -> tuple[dict, dict]:
        t0 = time.time()
        cpi = req.shards.captions_per_image
        out = encode_outputs(req.method, req.model, req.split, req.decoder, req.env, req.batch_size,
                             min(req.num_workers, 2), req.max_items, req.autocast)
        metrics = score_split(out["image"], out["text"], req.split.name, req.env, cpi, req.folds, t0)
        return metrics, {"img": out["image"], "cap": out["text"], "ids": out["image_ids"]}

    def log(self, req: EvalRequest, metrics: dict, encoded: dict) -> None:
        """Retrieval examples (``{prefix}examples/...``) at each validation and the final test."""
        if req.logger.writer is not None and req.examples:  # rank 0 only
            common_examples(req.logger.writer, req.split, req.decoder, encoded, req.shards.captions_per_image, req.step,
                            f"step {req.step}", req.examples, prefix=req.prefix)

    def report(self, req: EvalRequest, metrics: dict, encoded: dict, writer, step: int, title: str,
               examples: int) -> dict:
        cpi = req.shards.captions_per_image
        curve = recall_curve(encoded["img"], encoded["cap"], cpi, req.folds)
        common_report(writer, req.split, req.decoder, metrics, encoded, curve, cpi, step, title, examples)
        return {"recall_curve": curve}

    def format(self, metrics: dict) -> str:
        return format_metrics(metrics)
