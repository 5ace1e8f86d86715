"""Karpathy splits of COCO / Flickr30K / Flickr8K (``dataset_coco.json``, ``dataset_flickr30k.json``).

Input format (Karpathy & Fei-Fei, "Deep visual-semantic alignments", 2015)::

    {"dataset": "coco",
     "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"raw": "A man riding a bike.", "tokens": [...], ...}, ...],
                 "imgid": 0, "sentids": [...], "cocoid": 391895}, ...]}

The image file is ``ROOT/filepath/filename``, or ``ROOT/filename`` where an entry has no
``filepath`` (Flickr30K, Flickr8K).

Conventions (as in VSE++):

* sample id = the image's index in ``images``; each split keeps the JSON order;
* ``restval`` (COCO's 30,504 extra validation images) goes to ``train``, or is left out;
* exactly :data:`CAPTIONS_PER_IMAGE` captions: the first five ``raw`` sentences, stripped of
  surrounding white space (COCO has a few images with 6 or 7); fewer is an error;
* ``KEY.json`` = ``{"id", "split", "captions", "filename", "karpathy_split"}`` plus
  ``"filepath"``, ``"imgid"``, ``"cocoid"`` and the five captions' ``"sentids"`` where the
  source has them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmdist.data.converters import Conversion, ConversionError, Item, drop_missing_images, missing_warnings

CAPTIONS_PER_IMAGE = 5
MEMBERS = ("jpg", "json")
SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def load_json(path: Path) -> dict[str, Any]:
    """The parsed split file; it must be an object with an ``images`` list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"Karpathy split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read Karpathy split file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConversionError(f"{path} is not a Karpathy split file: expected an object with an 'images' list")
    return data


def _entry_item(index: int, entry: Any, root: Path, split: str) -> Item:
    """The item of ``images[index]``; raises ConversionError naming the entry when malformed."""
    where = f"images[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        raise ConversionError(f"{where} has no 'filename'")
    where += f" ({entry['filename']})"
    if not isinstance(entry.get("filepath", ""), str):
        raise ConversionError(f"{where}: 'filepath' must be a string")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                  for s in sentences):
        raise ConversionError(f"{where}: 'sentences' must be a list of objects with a 'raw' string")
    if len(sentences) < CAPTIONS_PER_IMAGE:
        raise ConversionError(f"{where} has {len(sentences)} sentences, fewer than {CAPTIONS_PER_IMAGE}")
    kept = sentences[:CAPTIONS_PER_IMAGE]
    meta: dict[str, Any] = {"captions": [s["raw"].strip() for s in kept], "filename": entry["filename"],
                            "karpathy_split": entry["split"]}
    meta.update((name, entry[name]) for name in ("filepath", "imgid", "cocoid") if name in entry)
    if all("sentid" in s for s in kept):
        meta["sentids"] = [s["sentid"] for s in kept]
    image = root / entry.get("filepath", "") / entry["filename"]
    return Item(index, split, image, meta)


def convert(json_path: Path, images_root: Path, restval_to_train: bool = True,
            skip_missing: bool = False) -> Conversion:
    """Plan the shard set of a Karpathy split file (see the module docstring).

    Every entry is validated and every image file checked for existence before anything is
    written; with ``skip_missing`` images whose file is missing are left out and counted.
    """
    data = load_json(json_path)
    if not images_root.is_dir():
        raise ConversionError(f"image directory {images_root} does not exist")
    items: list[Item] = []
    restval = 0
    for index, entry in enumerate(data["images"]):
        split = entry.get("split") if isinstance(entry, dict) else None
        if split not in KARPATHY_SPLITS:
            raise ConversionError(f"images[{index}] has split {split!r}; expected one of {list(KARPATHY_SPLITS)}")
        restval += split == "restval"
        if split == "restval" and not restval_to_train:
            continue
        items.append(_entry_item(index, entry, images_root, "train" if split == "restval" else split))
    if not items:
        raise ConversionError(f"{json_path} lists no images to convert")
    items, missing = drop_missing_images(items, skip_missing)
    dataset = str(data.get("dataset", "unknown"))
    notes = [f"{restval} restval images {'in train' if restval_to_train else 'left out'}"] if restval else []
    if missing:
        notes.append(f"{len(missing)} missing images skipped")
    fields = {"source": f"karpathy-{dataset}", "captions_per_image": CAPTIONS_PER_IMAGE,
              "label_names": [], "tag_vocab": [],
              "split": {"method": "karpathy", "restval": "train" if restval_to_train else "left out"},
              "skipped_missing": [str(Path(item.meta.get("filepath", ""), item.meta["filename"]))
                                  for item in missing]}
    return Conversion(items, len(items), MEMBERS, SPLITS, fields, missing_warnings(missing), "; ".join(notes))
