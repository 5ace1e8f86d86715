"""Distributed common-space evaluation.

Every rank encodes its own share of the split (shards or samples dealt out by rank), the
embeddings are gathered once, and the metrics are computed on rank 0 and broadcast, so no rank
sits in a collective while another encodes the whole split alone.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from xmdist.data.decode import SampleDecoder
from xmdist.data.info import Split
from xmdist.data.loader import EvalStream, make_loader
from xmdist.dist import DistEnv, broadcast_object, gather_variable
from xmdist.metrics import recall_at_k

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_split(model: torch.nn.Module, split: Split, decoder: SampleDecoder, env: DistEnv, dim: int,
                 batch_size: int, num_workers: int, captions_per_image: int, max_images: int = 0,
                 autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks -> (img (n, dim), cap (n * cpi, dim)) of the whole split, ordered by image id."""
    was_training = model.training
    model.eval()
    stream = EvalStream(split, decoder, batch_size, env.rank, env.world_size, max_images)
    loader = make_loader(stream, min(num_workers, 2), pin_memory=env.device.type == "cuda")
    ids, imgs, caps = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dim)], [torch.zeros(0, captions_per_image, dim)]
    for batch in loader:
        with autocast() if autocast else contextlib.nullcontext():
            img = model.encode_image(batch["images"].to(env.device, non_blocking=True))
            cap = model.encode_text(batch["tokens"].to(env.device), batch["lengths"].to(env.device))
        ids.append(batch["image_ids"])
        imgs.append(img.float().cpu())
        caps.append(cap.float().cpu().view(len(batch["image_ids"]), captions_per_image, dim))
    model.train(was_training)
    local = [torch.cat(t).to(env.device) for t in (ids, imgs, caps)]
    all_ids, all_img, all_cap = (gather_variable(t).cpu() for t in local)
    order = torch.argsort(all_ids)
    if len(torch.unique(all_ids)) != len(all_ids):
        raise RuntimeError(f"split '{split.name}': duplicate image ids across shards")
    return all_img[order], all_cap[order].reshape(-1, dim)


def evaluate(model: torch.nn.Module, split: Split, decoder: SampleDecoder, env: DistEnv, dim: int,
             batch_size: int, num_workers: int, captions_per_image: int, folds: int = 1,
             max_images: int = 0, autocast=None) -> dict[str, float]:
    """R@K (i2t and t2i), medr, meanr and rsum of ``split``; identical dict on every rank."""
    t0 = time.time()
    img, cap = encode_split(model, split, decoder, env, dim, batch_size, num_workers,
                            captions_per_image, max_images, autocast)
    return score_split(img, cap, split.name, env, captions_per_image, folds, t0)


def score_split(img: torch.Tensor, cap: torch.Tensor, name: str, env: DistEnv, captions_per_image: int,
                folds: int = 1, t0: float | None = None) -> dict[str, float]:
    """Metrics of gathered embeddings (:func:`encode_split`), computed on rank 0 and broadcast."""
    metrics = None
    if env.is_main:
        n = len(img) - len(img) % folds  # the 1K-fold protocol uses whole folds
        metrics = recall_at_k(img[:n], cap[: n * captions_per_image], folds=folds,
                              captions_per_image=captions_per_image)
        metrics["num_images"] = float(n)
        took = f" in {time.time() - t0:.1f}s" if t0 is not None else ""
        log.info("eval %s (%d images, %d fold(s))%s: %s", name, n, folds, took, format_metrics(metrics))
    return broadcast_object(metrics)


def format_metrics(m: dict[str, float]) -> str:
    return (f"i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} medr {m['i2t_medr']:.0f} | "
            f"t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} medr {m['t2i_medr']:.0f} | "
            f"rsum {m['rsum']:.1f}")
