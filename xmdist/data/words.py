"""CMFAH samples: image regions (or pixels) and a word sequence with its mask.

The interface is :class:`~xmdist.data.decode.FeatureDecoder`'s (``train_item``, ``collate``,
``eval_batch``, ``to_device``). The image side keeps its array shape (``(49, 512)`` pool5 regions
of VGG19 at 224 px); the text side is the item's own tag words in index order, then its
semantic expansion (:class:`~xmdist.data.expansion.Expander`), at most ``max_words``, padded
with word id ``text_dim`` (an extra embedding row) and masked. Damaged input raises a
``ValueError``/``KeyError`` naming the member and the sample, so the loader skips and counts it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import default_collate

from xmdist.data.decode import (DEFAULT_MAX_PIXELS, batch_to_device, checked_npy, decode_meta, decode_rgb,
                                 resize_center_crop)
from xmdist.data.expansion import Expander


class WordRegionDecoder:
    """Batches of regions (B, *region_shape) float32 or images (B, 3, S, S) uint8, word ids
    (B, max_words) int64, ``word_mask`` (B, max_words) bool, labels (B, C) uint8 and image ids."""

    def __init__(self, feature: str, region_shape: tuple[int, ...], text_dim: int, num_labels: int,
                 labels: list[int] | None = None, expander: Expander | None = None, max_words: int = 32,
                 image_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.feature, self.region_shape, self.text_dim = feature, tuple(region_shape), text_dim
        self.labels, self.expander, self.max_words, self.image_size = labels, expander, max_words, image_size
        self.max_pixels = max_pixels
        self.label_width = num_labels  # of labels.npy, before the selection
        self.num_labels = len(labels) if labels is not None else num_labels
        self.pad = text_dim  # the padding word id: one row past the vocabulary

    # ---------------------------------------------------------------- one item

    def _regions(self, sample: dict) -> torch.Tensor:
        return torch.from_numpy(checked_npy(sample, self.feature, shape=self.region_shape).astype(np.float32))

    def _own_words(self, sample: dict) -> np.ndarray:
        return np.flatnonzero(checked_npy(sample, "tags.npy", length=self.text_dim))

    def _labels(self, sample: dict) -> torch.Tensor:
        labels = checked_npy(sample, "labels.npy", length=self.label_width).astype(np.uint8)
        return torch.from_numpy(labels[self.labels] if self.labels is not None else labels)

    def sequence(self, own_words: np.ndarray, item_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (max_words,) int64 padded with ``text_dim`` and the mask (max_words,) bool: own
        words, then the expansion when there is an expander and an ``item_id``."""
        own = np.unique(np.asarray(own_words, dtype=np.int64))
        if own.size and (own[0] < 0 or own[-1] >= self.text_dim):
            raise ValueError(f"word ids must be in 0..{self.text_dim - 1}")
        if self.expander is not None and item_id is not None:
            words = self.expander.words(own, item_id, self.max_words)
        else:
            words = own[:self.max_words]
        ids = torch.full((self.max_words,), self.pad, dtype=torch.long)
        ids[:len(words)] = torch.from_numpy(words)
        mask = torch.zeros(self.max_words, dtype=torch.bool)
        mask[:len(words)] = True
        return ids, mask

    def item(self, sample: dict) -> tuple:
        """(regions or image, word ids, mask, labels, id) of one raw sample."""
        item_id = int(decode_meta(sample)["id"])
        words, mask = self.sequence(self._own_words(sample), item_id)
        if not mask.any():
            raise ValueError(f"sample {sample.get('__key__')} has no words: tags.npy is all zero and the "
                             f"semantic expansion adds none")
        labels = self._labels(sample)
        image = self.eval_view(sample) if self.image_size else self._regions(sample)
        return image, words, mask, labels, item_id

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple:
        return self.item(sample)  # no augmentation: an item is the same in every epoch

    # ---------------------------------------------------------------- pixels (image_size > 0)

    def eval_image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> (3, S, S): resize the shorter side to S and centre crop (FeatureDecoder's)."""
        return resize_center_crop(image, self.image_size, self.image_size)

    def eval_view(self, sample: dict) -> torch.Tensor:
        return self.eval_image(decode_rgb(sample, self.image_size, self.max_pixels))

    # ---------------------------------------------------------------- batches

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        images, words, masks, labels, ids = zip(*items)
        return {"images" if self.image_size else "regions": default_collate(list(images)),
                "words": torch.stack(words), "word_mask": torch.stack(masks), "labels": torch.stack(labels),
                "image_ids": torch.tensor(ids, dtype=torch.long)}

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate([self.item(s) for s in samples])

    def text_batch(self, word_lists: list, item_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Encoded text queries: ``words`` (B, max_words), ``word_mask`` (B, max_words); expanded
        when ``item_ids`` are given (and there is an expander). A query without words is an error."""
        seqs = [self.sequence(w, None if item_ids is None else item_ids[i]) for i, w in enumerate(word_lists)]
        empty = [i for i, (_, mask) in enumerate(seqs) if not mask.any()]
        if empty:
            which = f"queries {empty} hold" if len(empty) > 1 else f"query {empty} holds"
            raise ValueError(f"text {which} no tag-vocabulary word")
        return {"words": torch.stack([s for s, _ in seqs]), "word_mask": torch.stack([m for _, m in seqs])}

    def to_device(self, batch: dict, device: torch.device) -> dict:
        return batch_to_device(batch, device)
