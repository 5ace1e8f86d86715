"""What a split holds, read in one pass in id order: sample ids, captions, display images."""
from __future__ import annotations

from typing import Iterable

import torch

from xmdist.data.decode import decode_meta
from xmdist.data.info import Split
from xmdist.data.loader import iter_raw_samples


def _meta(sample: dict) -> dict | None:
    """The sample's json, or None for a damaged sample (the evaluation skipped and counted it)."""
    try:
        meta = decode_meta(sample)
        return {"id": int(meta["id"]), "captions": [str(c) for c in meta["captions"]]}
    except Exception:  # noqa: BLE001 - any damage: the sample is not among the encoded ones
        return None


def read_split_meta(split: Split) -> tuple[list[int], list[list[str]]]:
    """Sample ids and captions of a split, ordered by id (the order of the evaluation encoding);
    damaged samples are left out, as the evaluation leaves them out."""
    rows = []
    for sample in iter_raw_samples(list(split.paths), fields=split.fields):
        meta = _meta(sample)
        if meta is not None:
            rows.append((meta["id"], meta["captions"]))
    rows.sort(key=lambda r: r[0])
    return [r[0] for r in rows], [r[1] for r in rows]


def read_split_captions(split: Split) -> dict[int, list[str]]:
    """Sample id -> captions of a split's readable samples."""
    return dict(zip(*read_split_meta(split)))


def read_split_images(split: Split, ids: Iterable[int], decoder) -> dict[int, torch.Tensor]:
    """The evaluation view (``decoder.eval_view``: uint8, resized, centre crop) of samples ``ids``."""
    want, out = set(ids), {}
    for sample in iter_raw_samples(list(split.paths), fields=split.fields):
        meta = _meta(sample)
        sid = meta["id"] if meta else None
        if sid in want:
            out[sid] = decoder.eval_view(sample)
            if len(out) == len(want):
                break
    return out
