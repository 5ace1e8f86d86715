"""Safe sample decoding and batching.

Only the members xmdist writes are ever decoded (JPEG/PNG images, UTF-8 JSON, pickle-free
``.npy``); nothing is unpickled. JPEGs are decoded by libjpeg-turbo (simplejpeg, at reduced
scale when the output size allows), PNGs by PIL; crops, flips and resizes work on uint8 arrays
and tensors (``torchvision.transforms.v2.functional``: its vectorised uint8 resize). The random
crop and flip are drawn from a seed derived from the sample key, so a batch is the same whether
or not a run was resumed.
"""
from __future__ import annotations

import functools
import io
import json
import math
import random
import warnings
import zlib

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from xmdist.data.vocab import Vocab, pad_captions

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# What a damaged sample raises: bad bytes, bad JSON, a missing member or field, an image past
# PIL's own decompression-bomb limit.
DECODE_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError,
                 Image.DecompressionBombError)
DEFAULT_MAX_PIXELS = 100_000_000  # data.max_pixels: width x height refused above it, before decoding


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit (a decompression bomb, or a
    scan far larger than training needs); refused before any pixel is decoded."""


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    if max_pixels and height * width > max_pixels:
        raise ImageTooLarge(f"image of {width} x {height} = {height * width:,} pixels is above data.max_pixels "
                            f"= {max_pixels:,} (refused before decoding)")


@functools.lru_cache(maxsize=1024)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a version 1-3 ``.npy`` header (magic to the end of the
    header dict), by numpy's own reader (a literal, never evaluated as code). A shard's members
    of one kind share one header, so the parse runs once per kind, not once per sample."""
    buf = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(buf)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """Header fields and the data offset of version 1-3 ``.npy`` bytes; None for anything else."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2, 3):
        return None
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    return (*_parse_npy_header(bytes(data[:start])), start)


def decode_npy(data: bytes) -> np.ndarray:
    """A writable array from pickle-free ``.npy`` bytes; ValueError for an object dtype, a
    truncated member or a damaged header (numpy's own loader handles every other format version)."""
    try:
        head = _npy_header(data)
    except ValueError:
        head = None
    if head is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, fortran, dtype, start = head
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = math.prod(shape)
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f".npy data truncated: {len(data) - start} bytes for {count} x {dtype}")
    return np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C").copy(order="K")


def npy_holds_objects(data: bytes) -> bool:
    """True when ``.npy`` bytes declare an object dtype (loading them would need unpickling).

    Reads the header only (a Python literal, parsed without evaluating code); a header that
    cannot be read is left to :func:`decode_npy` to reject."""
    try:
        head = _npy_header(data)
    except Exception:  # noqa: BLE001 - damaged: decoding fails and counts it
        return False
    return head is not None and bool(head[2].hasobject)


def _jpeg_scale(height: int, width: int, min_size: int) -> int:
    """The DCT scaling denominator (8, 4, 2 or 1) that keeps both sides >= ``min_size``."""
    if not min_size:
        return 1
    return next(s for s in (8, 4, 2, 1) if s == 1 or min(height // s, width // s) >= min_size)


def decode_with_pil(data: bytes, fmt: str | None = None, min_size: int = 0,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 RGB array (H, W, 3) by PIL: only as format ``fmt`` when given (else
    any format PIL reads); JPEGs in draft mode down to ``min_size``. The size is read from the
    header first: above ``max_pixels`` (0: no limit) :class:`ImageTooLarge`, nothing decoded."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":  # before PIL's own check opens it
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        check_pixels(height, width, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit here is ours
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt] if fmt else None)
        except Image.DecompressionBombError as e:  # past PIL's own hard limit: refused the same way
            raise ImageTooLarge(str(e)) from None
    with img:
        check_pixels(img.height, img.width, max_pixels)
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()  # a damaged image fails here, inside the caller's error handling
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_pixels(sample: dict, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The sample's image as a uint8 RGB array (H, W, 3).

    A member is decoded only as the format its name says. JPEGs much larger than ``min_size``
    are decoded at 1/2, 1/4 or 1/8 scale (DCT scaling: the decoder skips coefficients), never
    below ``min_size`` on either side; ``min_size=0`` decodes at full size. JPEGs go through
    libjpeg-turbo directly (simplejpeg); the few it cannot turn into RGB (CMYK, YCCK) and PNGs
    through PIL, with the same scaling. An image whose header declares more than ``max_pixels``
    (0: no limit) raises :class:`ImageTooLarge` before anything is decoded.
    """
    for key in IMAGE_KEYS:
        if key not in sample:
            continue
        data = sample[key]
        if key in ("png", "webp"):  # webp: shards written by img2dataset --output_format webp
            return decode_with_pil(data, key.upper(), max_pixels=max_pixels)
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # damaged data, which PIL names
            return decode_with_pil(data, "JPEG", min_size, max_pixels)
        check_pixels(height, width, max_pixels)
        try:
            s = _jpeg_scale(height, width, min_size)
            return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // s), min_width=-(-width // s))
        except ValueError:  # CMYK/YCCK, which PIL converts, or damaged data, which PIL names
            return decode_with_pil(data, "JPEG", min_size, max_pixels)
    raise KeyError(f"sample {sample.get('__key__')} has no image member ({'/'.join(IMAGE_KEYS)})")


def decode_rgb(sample: dict, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The sample's image as a uint8 tensor (3, H, W), channels-last in memory (see
    :func:`decode_pixels`)."""
    return hwc_to_tensor(decode_pixels(sample, min_size, max_pixels))


def hwc_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) array -> (3, H, W) tensor, channels-last in memory; copied only when
    torch cannot share it (a strided view, or read-only as PIL's arrays are)."""
    if not (pixels.flags.c_contiguous and pixels.flags.writeable):
        pixels = pixels.copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)


def resize_center_crop(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """The evaluation transform: shorter side to ``resize`` (antialiased bilinear), centre ``crop``."""
    image = v2.functional.resize(image, [resize], antialias=True)
    return v2.functional.center_crop(image, [crop, crop]).contiguous()


class RandomCropFlip:
    """Random resized crop and horizontal flip of an image, drawn from a seed.

    The crop is sampled as in the Inception/torchvision ``RandomResizedCrop``: an area fraction
    uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``, up to 10 tries, else the
    largest centred crop within ``ratio``. Parameters come from ``random.Random(seed)`` (no
    global generator), so the same seed gives the same crop on any device.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True):
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def params(self, height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
        """(top, left, crop height, crop width, flip) for an image of this size."""
        rng, area = random.Random(seed), height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                break
        else:
            lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
            if width / height < lo:
                w, h = width, round(width / lo)
            elif width / height > hi:
                w, h = round(height * hi), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        return top, left, h, w, self.hflip and rng.random() < 0.5

    def __call__(self, image: np.ndarray | torch.Tensor, seed: int) -> torch.Tensor:
        """A uint8 (H, W, 3) array from the CPU decoder (cropped and flipped before it becomes a
        tensor: less to copy) or a uint8 (3, H, W) tensor on any device -> uint8 (3, size, size)."""
        if isinstance(image, np.ndarray):  # flipped before resizing: the same result, cheaper
            top, left, h, w, flip = self.params(image.shape[0], image.shape[1], seed)
            crop = image[top:top + h, left:left + w]
            crop = hwc_to_tensor(crop[:, ::-1] if flip else crop)
            return v2.functional.resize(crop, [self.size, self.size], antialias=True)
        top, left, h, w, flip = self.params(image.shape[-2], image.shape[-1], seed)
        out = v2.functional.resize(image[..., top:top + h, left:left + w], [self.size, self.size], antialias=True)
        return out.flip(-1) if flip else out


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB batches (B, 3, H, W) -> float, ImageNet-normalised, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def decode_meta(sample: dict) -> dict:
    if "json" not in sample:
        raise KeyError(f"sample {sample.get('__key__')} has no json member")
    return json.loads(sample["json"].decode("utf-8"))


def checked_npy(sample: dict, name: str, shape: tuple[int, ...] | None = None,
                length: int | None = None) -> np.ndarray:
    """Member ``name`` of a feature-set sample, checked: present, of ``shape`` (or, flattened, of
    ``length`` values) and, for floats, finite; else KeyError / ValueError naming member and sample
    (a skipped, counted sample, never one stacked, truncated or trained on)."""
    key = sample.get("__key__")
    if name not in sample:
        raise KeyError(f"sample {key} has no {name} member")
    a = decode_npy(sample[name])
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} of sample {key} has shape {a.shape}; expected {tuple(shape)}")
    if length is not None:
        a = a.reshape(-1)
        if a.shape[0] != length:
            raise ValueError(f"{name} of sample {key} has {a.shape[0]} values; expected {length}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} of sample {key} holds non-finite values")
    return a


def checked_captions(meta: dict, sample: dict) -> list[str]:
    """The sample's ``captions``: a non-empty list of non-empty strings, else ValueError (a string
    where the list belongs would otherwise be read as one caption per letter)."""
    caps = meta.get("captions")
    key = sample.get("__key__")
    if not isinstance(caps, list) or not caps:
        raise ValueError(f"sample {key}: json 'captions' must be a non-empty list of strings, got "
                         f"{type(caps).__name__} {str(caps)[:40]!r}")
    bad = [i for i, c in enumerate(caps) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"sample {key}: caption {bad[0]} is empty or not a string ({caps[bad[0]]!r})")
    return caps


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch on ``device`` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class SampleDecoder:
    """Turns raw samples into training batches (one caption each) or evaluation batches (all)."""

    def __init__(self, vocab: Vocab, crop_size: int, eval_resize: int, crop_scale: tuple[float, float],
                 hflip: bool, max_words: int, draft: bool = True, gpu_decode: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.vocab, self.max_words, self.max_pixels = vocab, max_words, max_pixels
        self.draft, self.gpu_decode = draft, gpu_decode
        self.crop_size, self.eval_resize = crop_size, eval_resize
        # Batches stay uint8 (4x less to move between processes and to the GPU); the image
        # encoder normalises on its device (normalize_images).
        self.augment = RandomCropFlip(crop_size, crop_scale, hflip=hflip)

    def eval_image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> the evaluation view (3, crop, crop): resize and centre crop."""
        return resize_center_crop(image, self.eval_resize, self.crop_size)

    def eval_view(self, sample: dict) -> torch.Tensor:
        """The sample's image decoded (reduced scale down to ``eval_resize``) and :meth:`eval_image`."""
        return self.eval_image(decode_rgb(sample, self.eval_resize if self.draft else 0, self.max_pixels))

    def _seed(self, sample: dict, caption: int, salt: tuple) -> int:
        """Augmentation seed of one (epoch, sample, caption): the same in every run."""
        return zlib.crc32(f"{salt}-{sample['__key__']}-{caption}".encode())

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple:
        """One (image, caption) pair: augmented image (3, H, W), token ids, image id.

        With ``gpu_decode`` the image stays encoded: (JPEG bytes as uint8, seed) instead.
        """
        meta = decode_meta(sample)
        tokens = self.vocab.encode(checked_captions(meta, sample)[caption], self.max_words)
        seed = self._seed(sample, caption, salt)
        if self.gpu_decode:
            if "jpg" not in sample and "jpeg" not in sample:
                raise ValueError("data.gpu_decode reads JPEG members only")
            data = sample.get("jpg", sample.get("jpeg"))
            return (torch.frombuffer(bytearray(data), dtype=torch.uint8), seed), tokens, int(meta["id"])
        image = decode_pixels(sample, self.crop_size if self.draft else 0, self.max_pixels)
        return self.augment(image, seed), tokens, int(meta["id"])

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        images, captions, ids = zip(*items)
        tokens, lengths = pad_captions(list(captions))
        batch = {"tokens": tokens, "lengths": lengths, "image_ids": torch.tensor(ids, dtype=torch.long)}
        if self.gpu_decode:
            batch["jpeg"] = [data for data, _ in images]
            batch["seeds"] = torch.tensor([seed for _, seed in images], dtype=torch.long)
        else:
            # channels-last (B, 3, H, W): the items are HWC in memory, so stacking is a plain copy
            # (in a worker, straight into shared memory); the GPU's convolutions prefer it too
            batch["images"] = default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
        return batch

    def to_device(self, batch: dict, device: torch.device) -> dict:
        """A collated batch on ``device``; ``gpu_decode`` batches are decoded and augmented there."""
        if "jpeg" in batch:
            batch = self.decode_on_device(batch, device)
        return batch_to_device(batch, device)

    def decode_on_device(self, batch: dict, device: torch.device) -> dict:
        """Finish a ``gpu_decode`` batch: nvJPEG decode and the same seeded augmentation on ``device``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(batch.pop("jpeg"), mode=ImageReadMode.RGB, device=device)
        seeds = batch.pop("seeds").tolist()
        batch["images"] = torch.stack([self.augment(image, seed) for image, seed in zip(images, seeds)])
        return batch

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """``images`` (b, 3, H, W); ``tokens`` (b * ncap, L) with image i's captions at rows i*ncap..."""
        images, captions, ids = [], [], []
        for sample in samples:
            meta = decode_meta(sample)
            images.append(self.eval_view(sample))
            captions += [self.vocab.encode(c, self.max_words) for c in checked_captions(meta, sample)]
            ids.append(int(meta["id"]))
        tokens, lengths = pad_captions(captions)
        return {"images": torch.stack(images), "tokens": tokens, "lengths": lengths,
                "image_ids": torch.tensor(ids, dtype=torch.long)}


class FeatureDecoder:
    """Batches of precomputed image features, tag bag-of-words and labels (the hashing methods).

    ``feature`` is the member holding the image features (``fc7.npy`` in a set written by
    ``launch/extract_features.py --layer fc7``); ``labels`` selects label columns (the relevance
    used by evaluation: two items are relevant when they share a selected label). Features keep
    their array shape (``image_shape``: ``(4096,)`` for fc7, ``(49, 512)`` regions for pool5 at
    224 px); sizes are checked against the first sample's so one odd sample is skipped, not
    stacked.
    """

    def __init__(self, feature: str, image_shape: tuple[int, ...], text_dim: int, num_labels: int,
                 labels: list[int] | None = None, image_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.feature, self.image_shape, self.text_dim = feature, tuple(image_shape), text_dim
        self.max_pixels = max_pixels
        self.image_dim = math.prod(self.image_shape)
        self.labels, self.image_size = labels, image_size
        self.label_width = num_labels  # of labels.npy, before the selection
        self.num_labels = len(labels) if labels is not None else num_labels  # after the selection
        # image_size > 0: the sample's image (resized, centre crop, uint8) instead of features,
        # for a model that fine-tunes its CNN end to end

    def item(self, sample: dict) -> tuple:
        """Every array member is checked against the set's first sample (shape) and for NaN/inf:
        a sample that fails is skipped and counted, never stacked, truncated or trained on."""
        tags = checked_npy(sample, "tags.npy", length=self.text_dim).astype(np.float32)
        labels = checked_npy(sample, "labels.npy", length=self.label_width).astype(np.uint8)
        if self.image_size:
            image = resize_center_crop(decode_rgb(sample, self.image_size, self.max_pixels), self.image_size,
                                       self.image_size)
        else:
            image = torch.from_numpy(checked_npy(sample, self.feature, shape=self.image_shape).astype(np.float32))
        if self.labels is not None:
            labels = labels[self.labels]
        return image, torch.from_numpy(tags), torch.from_numpy(labels), int(decode_meta(sample)["id"])

    def train_item(self, sample: dict, caption: int, salt: tuple) -> tuple:
        return self.item(sample)

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        feats, tags, labels, ids = zip(*items)
        return {"images" if self.image_size else "features": default_collate(feats), "tags": torch.stack(tags),
                "labels": torch.stack(labels),
                "image_ids": torch.tensor(ids, dtype=torch.long)}

    def eval_batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate([self.item(s) for s in samples])

    def to_device(self, batch: dict, device: torch.device) -> dict:
        return batch_to_device(batch, device)
