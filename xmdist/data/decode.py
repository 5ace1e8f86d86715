"""Safe sample decoding and batching.

Only the members xmdist writes are ever decoded (JPEG/PNG images, UTF-8 JSON, pickle-free
``.npy``); nothing is unpickled. Image augmentation uses ``torchvision.transforms.v2`` with a
seed derived from the sample key, so a batch is the same whether or not a run was resumed.
"""
from __future__ import annotations

import io
import json
import zlib

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from xmdist.data.vocab import Vocab, pad_captions

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_KEYS = ("jpg", "jpeg", "png")
# What a damaged sample raises: bad bytes, bad JSON, a missing member or field.
DECODE_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_rgb(sample: dict, min_size: int = 0) -> torch.Tensor:
    """The sample's image as a uint8 tensor (3, H, W).

    JPEGs much larger than ``min_size`` are decoded at a reduced scale (PIL draft mode: the
    decoder skips DCT coefficients), never below ``min_size`` on the shorter side.
    """
    for key in IMAGE_KEYS:
        if key in sample:
            with Image.open(io.BytesIO(sample[key])) as img:
                if min_size and img.format == "JPEG":
                    img.draft("RGB", (min_size, min_size))
                return v2.functional.pil_to_tensor(img.convert("RGB"))
    raise KeyError(f"sample {sample.get('__key__')} has no image member ({'/'.join(IMAGE_KEYS)})")


def decode_meta(sample: dict) -> dict:
    if "json" not in sample:
        raise KeyError(f"sample {sample.get('__key__')} has no json member")
    return json.loads(sample["json"].decode("utf-8"))


class SampleDecoder:
    """Turns raw samples into training batches (one caption each) or evaluation batches (all)."""

    def __init__(self, vocab: Vocab, crop_size: int, eval_resize: int, crop_scale: tuple[float, float],
                 hflip: bool, max_words: int):
        self.vocab, self.max_words = vocab, max_words
        self.crop_size, self.eval_resize = crop_size, eval_resize
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        self.train_tf = v2.Compose([v2.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True),
                                    *flip, *normalize])
        self.eval_tf = v2.Compose([v2.Resize(eval_resize, antialias=True), v2.CenterCrop(crop_size), *normalize])

    def _seeded_train_image(self, sample: dict, caption: int, salt: tuple) -> torch.Tensor:
        key = f"{salt}-{sample['__key__']}-{caption}".encode()
        torch.manual_seed(zlib.crc32(key))  # deterministic augmentation per (epoch, sample, caption)
        return self.train_tf(decode_rgb(sample, self.crop_size))

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple[torch.Tensor, list[int], int]:
        """One (image, caption) pair: augmented image (3, H, W), token ids, image id."""
        meta = decode_meta(sample)
        tokens = self.vocab.encode(meta["captions"][caption], self.max_words)
        return self._seeded_train_image(sample, caption, salt), tokens, int(meta["id"])

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, list[int], int]]) -> dict[str, torch.Tensor]:
        images, captions, ids = zip(*items)
        tokens, lengths = pad_captions(list(captions))
        return {"images": torch.stack(images), "tokens": tokens, "lengths": lengths,
                "image_ids": torch.tensor(ids, dtype=torch.long)}

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """``images`` (b, 3, H, W); ``tokens`` (b * ncap, L) with image i's captions at rows i*ncap..."""
        images, captions, ids = [], [], []
        for sample in samples:
            meta = decode_meta(sample)
            images.append(self.eval_tf(decode_rgb(sample, self.eval_resize)))
            captions += [self.vocab.encode(c, self.max_words) for c in meta["captions"]]
            ids.append(int(meta["id"]))
        tokens, lengths = pad_captions(captions)
        return {"images": torch.stack(images), "tokens": tokens, "lengths": lengths,
                "image_ids": torch.tensor(ids, dtype=torch.long)}
