"""Converters from public data set formats to xmdist shard sets (see shards/README.md).

Each converter module reads and validates its source, decides the splits and returns a
:class:`Conversion`: the :class:`Item` s to write, in output order, plus the ``_info.json``
fields. :func:`encode_item` turns an item into a ``(key, split, members)`` record for
:class:`~xmdist.data.writer.ShardSetWriter`; it is a plain module-level function so a process
pool can run it. Problems with the input raise :class:`ConversionError` with a message meant
for the user.

Images given as files are copied byte for byte when they already are RGB JPEGs, otherwise
(PNG, greyscale or CMYK JPEG, ...) re-encoded like images given as arrays: RGB JPEG,
quality :data:`JPEG_QUALITY`, 4:4:4 chroma. EXIF orientation is never applied, as when PIL or
torchvision load the original files.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from xmdist.data.writer import encode_jpeg, encode_json, encode_npy

JPEG_QUALITY = 95

Record = tuple[str, str, dict[str, bytes]]  # (key, split, {extension: bytes})


class ConversionError(ValueError):
    """The source data are missing, malformed or inconsistent (message names the culprit)."""


@dataclass(frozen=True)
class Item:
    """One sample to write.

    ``image`` is a file (copied or re-encoded, see the module docstring) or an ``(H, W, 3)``
    uint8 array; ``meta`` holds the ``KEY.json`` fields besides ``id`` and ``split``;
    ``arrays`` the ``.npy`` members by extension (``{"labels.npy": ...}``).
    """
    sample_id: int
    split: str
    image: Path | np.ndarray
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Conversion:
    """A converter's result: what :func:`encode_item` and the writer need, plus notes.

    ``items`` may be a lazy iterator (it is consumed once, in order); ``total`` is its length.
    ``warnings`` are shown before writing, ``summary`` is appended to the final report line.
    """
    items: Iterable[Item]
    total: int
    members: tuple[str, ...]
    splits: tuple[str, ...]
    fields: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    summary: str = ""


def sample_key(sample_id: int) -> str:
    """Tar key of a sample: its global id as 9 digits."""
    return f"{sample_id:09d}"


def image_file_bytes(path: Path) -> bytes:
    """The file's bytes if it is an RGB JPEG, else the image re-encoded as one."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and image.mode == "RGB":
                return data
            return encode_jpeg(image, JPEG_QUALITY)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConversionError(f"cannot read image {path}: {e}") from None


def encode_item(item: Item) -> Record:
    """The writer record of ``item``: ``jpg``, ``json`` (id, split, meta) and its arrays."""
    if isinstance(item.image, Path):
        jpg = image_file_bytes(item.image)
    else:
        jpg = encode_jpeg(Image.fromarray(item.image, "RGB"), JPEG_QUALITY)
    sample = {"jpg": jpg, "json": encode_json({"id": item.sample_id, "split": item.split, **item.meta})}
    sample.update((name, encode_npy(array)) for name, array in item.arrays.items())
    return sample_key(item.sample_id), item.split, sample


def drop_missing_images(items: list[Item], skip_missing: bool) -> tuple[list[Item], list[Item]]:
    """``(items whose image file exists, the others)``; every ``image`` must be a path.

    A missing file is an error unless ``skip_missing``; no file at all always is.
    """
    missing = [item for item in items if not Path(item.image).is_file()]
    if missing and (not skip_missing or len(missing) == len(items)):
        more = f" (and {len(missing) - 1} more of {len(items)})" if len(missing) > 1 else ""
        hint = "; pass --skip-missing to leave such images out" if not skip_missing else ""
        raise ConversionError(f"image file {missing[0].image} does not exist{more}{hint}")
    gone = {id(item) for item in missing}
    return [item for item in items if id(item) not in gone], missing


def missing_warnings(missing: list[Item]) -> list[str]:
    """The warning about the images :func:`drop_missing_images` left out, if any."""
    return [f"left out {len(missing)} images whose file is missing (first: {missing[0].image})"] if missing else []
