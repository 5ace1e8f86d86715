"""What a split holds, read in one pass in id order: sample ids, captions, display images."""
from __future__ import annotations

from typing import Iterable

import torch

from xmdist.data.decode import decode_meta
from xmdist.data.info import Split
from xmdist.data.loader import iter_raw_samples


def read_split_meta(split: Split) -> tuple[list[int], list[list[str]]]:
    """Sample ids and captions of a split, ordered by id (the order of the evaluation encoding)."""
    rows = []
    for sample in iter_raw_samples(list(split.paths)):
        meta = decode_meta(sample)
        rows.append((int(meta["id"]), [str(c) for c in meta["captions"]]))
    rows.sort(key=lambda r: r[0])
    return [r[0] for r in rows], [r[1] for r in rows]


def read_split_images(split: Split, ids: Iterable[int], decoder) -> dict[int, torch.Tensor]:
    """The evaluation view (``decoder.eval_view``: uint8, resized, centre crop) of samples ``ids``."""
    want, out = set(ids), {}
    for sample in iter_raw_samples(list(split.paths)):
        sid = int(decode_meta(sample)["id"])
        if sid in want:
            out[sid] = decoder.eval_view(sample)
            if len(out) == len(want):
                break
    return out
