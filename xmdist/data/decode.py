"""Safe sample decoding and batching.

Only the members xmdist writes are ever decoded (JPEG/PNG images, UTF-8 JSON, pickle-free
``.npy``); nothing is unpickled. Image augmentation uses ``torchvision.transforms.v2`` with a
seed derived from the sample key, so a batch is the same whether or not a run was resumed.
"""
from __future__ import annotations

import io
import json
import warnings
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


def npy_holds_objects(data: bytes) -> bool:
    """True when ``.npy`` bytes declare an object dtype (loading them would need unpickling).

    Reads the header only (a Python literal, parsed without evaluating code); a header that
    cannot be read is left to :func:`decode_npy` to reject."""
    buf = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        _, _, dtype = read(buf)
    except Exception:  # noqa: BLE001 - damaged: decoding fails and counts it
        return False
    return bool(dtype.hasobject)


def decode_image(sample: dict, min_size: int = 0) -> Image.Image:
    """The sample's image as an RGB PIL image.

    JPEGs much larger than ``min_size`` are decoded at a reduced scale (PIL draft mode: the
    decoder skips DCT coefficients), never below ``min_size`` on the shorter side.
    """
    for key in IMAGE_KEYS:
        if key in sample:
            img = Image.open(io.BytesIO(sample[key]))
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            return img.convert("RGB")
    raise KeyError(f"sample {sample.get('__key__')} has no image member ({'/'.join(IMAGE_KEYS)})")


def decode_rgb(sample: dict, min_size: int = 0) -> torch.Tensor:
    """The sample's image as a uint8 tensor (3, H, W) (see :func:`decode_image`)."""
    return v2.functional.pil_to_tensor(decode_image(sample, min_size))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB batches (B, 3, H, W) -> float, ImageNet-normalised, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def decode_meta(sample: dict) -> dict:
    if "json" not in sample:
        raise KeyError(f"sample {sample.get('__key__')} has no json member")
    return json.loads(sample["json"].decode("utf-8"))


class SampleDecoder:
    """Turns raw samples into training batches (one caption each) or evaluation batches (all)."""

    def __init__(self, vocab: Vocab, crop_size: int, eval_resize: int, crop_scale: tuple[float, float],
                 hflip: bool, max_words: int, draft: bool = True, gpu_decode: bool = False):
        self.vocab, self.max_words = vocab, max_words
        self.draft, self.gpu_decode = draft, gpu_decode
        self.crop_size, self.eval_resize = crop_size, eval_resize
        # Batches stay uint8 (4x less to move between processes and to the GPU); the image
        # encoder normalises on its device (normalize_images).
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        self.augment = v2.Compose([v2.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True), *flip])
        self.eval_tf = v2.Compose([v2.Resize(eval_resize, antialias=True), v2.CenterCrop(crop_size),
                                   v2.PILToTensor()])

    def _seed(self, sample: dict, caption: int, salt: tuple) -> int:
        """Augmentation seed of one (epoch, sample, caption): the same in every run."""
        return zlib.crc32(f"{salt}-{sample['__key__']}-{caption}".encode())

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple:
        """One (image, caption) pair: augmented image (3, H, W), token ids, image id.

        With ``gpu_decode`` the image stays encoded: (JPEG bytes as uint8, seed) instead.
        """
        meta = decode_meta(sample)
        tokens = self.vocab.encode(meta["captions"][caption], self.max_words)
        seed = self._seed(sample, caption, salt)
        if self.gpu_decode:
            if "jpg" not in sample and "jpeg" not in sample:
                raise ValueError("data.gpu_decode reads JPEG members only")
            data = sample.get("jpg", sample.get("jpeg"))
            return (torch.frombuffer(bytearray(data), dtype=torch.uint8), seed), tokens, int(meta["id"])
        torch.default_generator.manual_seed(seed)  # v2 transforms draw from the CPU generator
        image = self.augment(decode_image(sample, self.crop_size if self.draft else 0))
        return v2.functional.pil_to_tensor(image), tokens, int(meta["id"])

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        images, captions, ids = zip(*items)
        tokens, lengths = pad_captions(list(captions))
        batch = {"tokens": tokens, "lengths": lengths, "image_ids": torch.tensor(ids, dtype=torch.long)}
        if self.gpu_decode:
            batch["jpeg"] = [data for data, _ in images]
            batch["seeds"] = torch.tensor([seed for _, seed in images], dtype=torch.long)
        else:
            batch["images"] = torch.stack(images)
        return batch

    def decode_on_device(self, batch: dict, device: torch.device) -> dict:
        """Finish a ``gpu_decode`` batch: nvJPEG decode and the same seeded augmentation on ``device``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(batch.pop("jpeg"), mode=ImageReadMode.RGB, device=device)
        out = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for image, seed in zip(images, batch.pop("seeds").tolist()):
                torch.default_generator.manual_seed(seed)
                out.append(self.augment(image))
        batch["images"] = torch.stack(out)
        return batch

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """``images`` (b, 3, H, W); ``tokens`` (b * ncap, L) with image i's captions at rows i*ncap..."""
        images, captions, ids = [], [], []
        for sample in samples:
            meta = decode_meta(sample)
            images.append(self.eval_tf(decode_image(sample, self.eval_resize if self.draft else 0)))
            captions += [self.vocab.encode(c, self.max_words) for c in meta["captions"]]
            ids.append(int(meta["id"]))
        tokens, lengths = pad_captions(captions)
        return {"images": torch.stack(images), "tokens": tokens, "lengths": lengths,
                "image_ids": torch.tensor(ids, dtype=torch.long)}


class FeatureDecoder:
    """Batches of precomputed image features, tag bag-of-words and labels (the hashing methods).

    ``feature`` is the member holding the image features (``fc7.npy`` in a set written by
    ``launch/extract_features.py --layer fc7``); ``labels`` selects label columns (the relevance
    used by evaluation: two items are relevant when they share a selected label). Shapes are
    checked against the first sample's so one odd sample is skipped, not stacked.
    """

    def __init__(self, feature: str, image_dim: int, text_dim: int, num_labels: int,
                 labels: list[int] | None = None, image_size: int = 0):
        self.feature, self.image_dim, self.text_dim = feature, image_dim, text_dim
        self.labels, self.image_size = labels, image_size
        self.num_labels = len(labels) if labels is not None else num_labels  # after the selection
        # image_size > 0: the sample's image (resized, centre crop, uint8) instead of features,
        # for a model that fine-tunes its CNN end to end
        self.image_tf = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                                    v2.PILToTensor()]) if image_size else None

    def item(self, sample: dict) -> tuple:
        tags = decode_npy(sample["tags.npy"]).astype(np.float32).reshape(-1)
        labels = decode_npy(sample["labels.npy"]).astype(np.uint8).reshape(-1)
        if tags.shape[0] != self.text_dim:
            raise ValueError(f"tags.npy has {tags.shape[0]} values; expected {self.text_dim}")
        if self.image_tf is not None:
            image = self.image_tf(decode_image(sample, self.image_size))
        else:
            feat = decode_npy(sample[self.feature]).astype(np.float32).reshape(-1)
            if feat.shape[0] != self.image_dim:
                raise ValueError(f"{self.feature} has {feat.shape[0]} values; expected {self.image_dim}")
            if not np.isfinite(feat).all():
                raise ValueError(f"{self.feature} holds non-finite values")
            image = torch.from_numpy(feat)
        if self.labels is not None:
            labels = labels[self.labels]
        return image, torch.from_numpy(tags), torch.from_numpy(labels), int(decode_meta(sample)["id"])

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple:
        return self.item(sample)

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        feats, tags, labels, ids = zip(*items)
        return {"images" if self.image_tf else "features": torch.stack(feats), "tags": torch.stack(tags),
                "labels": torch.stack(labels),
                "image_ids": torch.tensor(ids, dtype=torch.long)}

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate([self.item(s) for s in samples])
