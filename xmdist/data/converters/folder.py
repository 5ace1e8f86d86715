"""A folder of images plus a captions file (JSONL or CSV, chosen by the file extension).

JSONL (``.jsonl``/``.ndjson``), one object per line, blank lines ignored, each image once::

    {"image": "relative/path.jpg", "captions": ["...", ...], "labels": [0, 3], "split": "train"}

CSV or TSV (``.csv`` comma-separated, ``.tsv`` tab-separated, ``sep`` to override; UTF-8,
header row) with an ``image`` column and the captions either in a ``caption`` column, one row
per caption (the rows of an image are grouped, in file order; they need not be adjacent), or in
``caption_1`` .. ``caption_k`` columns (empty cells ignored). ``image_col`` and ``caption_col``
name other columns for the image and the one-per-row caption (e.g. open_clip's ``filepath`` and
``title``). Optional ``labels`` (``;``-separated) and ``split`` columns must then agree on all
rows of an image.

* ``image`` is relative to the image folder (by default the captions file's folder), or
  absolute; sample id = the image's position in the file (first appearance); samples are written
  in that order.
* ``labels`` (optional) are label indices (JSON integers; in CSV, when every label in the file
  is a decimal number) giving ``label_names`` ``"0" .. "max"``, or label names giving the sorted
  set of names; an image without labels gets an all-zero ``KEY.labels.npy`` (uint8 multi-hot).
* ``split`` (optional, lower-case letters) must be given for every image or for none; without
  it the images are split at random: a permutation from ``numpy.random.default_rng(seed)``,
  whose first ``round(test_frac * N)`` images are ``test``, the next ``round(val_frac * N)``
  ``val`` and the rest ``train``.
* ``captions_per_image`` is the number of captions every image has; when they differ, the
  smallest (evaluation uses the first that many of each image) and a warning.

``KEY.json`` = ``{"id", "split", "captions", "filename"}`` (captions stripped of surrounding
white space, ``filename`` as given in the captions file).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmdist.data.converters import Conversion, ConversionError, Item, drop_missing_images, missing_warnings

SPLITS = ("train", "val", "test")
LABEL_SEPARATOR = ";"
_SPLIT_NAME = re.compile(r"[a-z]+")
_CAPTION_COLUMN = re.compile(r"caption_(\d+)")


@dataclass
class Entry:
    """One image of the captions file; ``where`` locates it (``FILE:LINE``) for messages."""
    image: str
    captions: list[str]
    labels: list[int | str] | None
    split: str | None
    where: str


def read_jsonl(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise ConversionError(f"{where}: expected an object with an 'image' string")
            captions = obj.get("captions")
            if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
                raise ConversionError(f"{where}: 'captions' must be a list of non-empty strings")
            labels = obj.get("labels")
            if labels is not None and not (isinstance(labels, list) and all(
                    isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in labels)):
                raise ConversionError(f"{where}: 'labels' must be a list of label indices or names")
            split = obj.get("split")
            if split is not None and not isinstance(split, str):
                raise ConversionError(f"{where}: 'split' must be a string")
            entries.append(Entry(obj["image"], [c.strip() for c in captions], labels, split, where))
    return entries


def read_csv(path: Path, sep: str | None = None, image_col: str = "image", caption_col: str = "") -> list[Entry]:
    """A CSV/TSV captions file; ``sep`` default: tab for ``.tsv``, comma otherwise."""
    sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        found = f"(separator {sep!r}; the header has: {', '.join(columns)})"
        if caption_col:
            if image_col not in columns or caption_col not in columns:
                raise ConversionError(f"{path}: the header needs the image column {image_col!r} and the caption "
                                      f"column {caption_col!r} {found}")
            caption_columns = [caption_col]
        else:
            numbered = sorted((int(m.group(1)), c) for c in columns if (m := _CAPTION_COLUMN.fullmatch(c)))
            if image_col not in columns or ("caption" in columns) == bool(numbered):
                raise ConversionError(f"{path}: the header must have an {image_col!r} column and either a 'caption' "
                                      f"column or 'caption_1'..'caption_k' columns, or name the caption column "
                                      f"with --caption-col {found}")
            caption_columns = ["caption"] if "caption" in columns else [c for _, c in numbered]
        by_image: dict[str, Entry] = {}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise ConversionError(f"{where}: more fields than the header has columns")
            cells = {k: (v or "").strip() for k, v in row.items()}
            if not cells[image_col]:
                raise ConversionError(f"{where}: empty {image_col!r}")
            labels = [x.strip() for x in cells.get("labels", "").split(LABEL_SEPARATOR) if x.strip()]
            entry = Entry(cells[image_col], [cells[c] for c in caption_columns if cells[c]],
                          labels if "labels" in columns else None, cells.get("split") or None, where)
            first = by_image.setdefault(entry.image, entry)
            if first is not entry:
                if (first.labels, first.split) != (entry.labels, entry.split):
                    raise ConversionError(f"{where}: labels/split of {entry.image} differ from "
                                          f"its row at {first.where}")
                first.captions.extend(entry.captions)
    entries = list(by_image.values())
    if all(x.isdecimal() for e in entries for x in e.labels or []):
        for e in entries:
            e.labels = None if e.labels is None else [int(x) for x in e.labels]
    return entries


def read_entries(path: Path, sep: str | None = None, image_col: str = "image", caption_col: str = "") -> list[Entry]:
    """The images of a JSONL, CSV or TSV captions file (by extension), validated."""
    if not path.is_file():
        raise ConversionError(f"captions file {path} {'is not a file' if path.exists() else 'does not exist'}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise ConversionError(f"captions file {path} must end in .jsonl, .ndjson, .csv or .tsv")
    tabular = suffix in (".csv", ".tsv")
    if not tabular and (sep or image_col != "image" or caption_col):
        raise ConversionError(f"--sep, --image-col and --caption-col are for .csv and .tsv files, not {path.name}")
    try:
        entries = read_csv(path, sep, image_col, caption_col) if tabular else read_jsonl(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConversionError(f"cannot read captions file {path}: {e}") from None
    if not entries:
        raise ConversionError(f"captions file {path} lists no images")
    seen: dict[str, str] = {}
    for e in entries:
        if e.image in seen:
            raise ConversionError(f"{e.where}: image {e.image} is already listed at {seen[e.image]}")
        seen[e.image] = e.where
        if not e.captions:
            raise ConversionError(f"{e.where}: image {e.image} has no captions")
    return entries


def label_vocabulary(entries: list[Entry]) -> list[str]:
    """``label_names``: ``"0" .. "max"`` for indices, the sorted names for names."""
    values = [x for e in entries for x in e.labels or []]
    if all(isinstance(x, int) for x in values):
        if any(x < 0 for x in values):
            raise ConversionError("label indices must be >= 0")
        return [str(i) for i in range(max(values, default=-1) + 1)]
    if any(isinstance(x, int) for x in values):
        raise ConversionError("labels mix indices and names; use one or the other")
    return sorted(set(values))


def assign_splits(entries: list[Entry], val_frac: float, test_frac: float, seed: int) -> tuple[list[str], bool]:
    """``(split of each entry, whether they come from the file)``: its split field or a random one."""
    given = [e for e in entries if e.split is not None]
    if given:
        if len(given) < len(entries):
            missing = next(e for e in entries if e.split is None)
            raise ConversionError(f"{missing.where}: image {missing.image} has no split while others have one")
        bad = next((e for e in given if not _SPLIT_NAME.fullmatch(e.split)), None)
        if bad is not None:
            raise ConversionError(f"{bad.where}: split {bad.split!r} must be lower-case letters only")
        return [e.split for e in given], True
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ConversionError(f"val and test fractions must be >= 0 with a sum < 1, got {val_frac} and {test_frac}")
    n = len(entries)
    num_test, num_val = round(test_frac * n), round(val_frac * n)
    if num_test + num_val >= n:
        raise ConversionError(f"{n} images leave none for train with val {num_val} and test {num_test}")
    splits = [""] * n
    for rank, index in enumerate(np.random.default_rng(seed).permutation(n).tolist()):
        splits[index] = "test" if rank < num_test else "val" if rank < num_test + num_val else "train"
    return splits, False


def convert(images_root: Path | None, captions_path: Path, val_frac: float = 0.05, test_frac: float = 0.05,
            seed: int = 0, skip_missing: bool = False, sep: str | None = None, image_col: str = "image",
            caption_col: str = "") -> Conversion:
    """Plan the shard set of an image folder and its captions file (see the module docstring);
    ``images_root`` None: image paths are relative to the captions file's folder."""
    images_root = Path(captions_path).parent if images_root is None else images_root
    if not images_root.is_dir():
        raise ConversionError(f"image directory {images_root} does not exist")
    entries = read_entries(captions_path, sep, image_col, caption_col)
    has_labels = any(e.labels is not None for e in entries)
    label_names = label_vocabulary(entries) if has_labels else []
    label_index = {name: i for i, name in enumerate(label_names)}
    splits, from_file = assign_splits(entries, val_frac, test_frac, seed)
    items = []
    for sample_id, (entry, split) in enumerate(zip(entries, splits)):
        arrays: dict[str, np.ndarray] = {}
        if has_labels:
            arrays["labels.npy"] = np.zeros(len(label_names), np.uint8)
            arrays["labels.npy"][[label_index[str(x)] for x in entry.labels or []]] = 1
        items.append(Item(sample_id, split, images_root / entry.image,
                          {"captions": entry.captions, "filename": entry.image}, arrays))
    items, missing = drop_missing_images(items, skip_missing)
    counts = sorted({len(item.meta["captions"]) for item in items})
    warnings = missing_warnings(missing)
    if len(counts) > 1:
        warnings.append(f"images have {counts[0]} to {counts[-1]} captions; captions_per_image = {counts[0]}, "
                        "evaluation uses the first that many of each image")
    split_info: dict[str, Any] = {"method": "field"} if from_file else {
        "method": "random", "val_frac": val_frac, "test_frac": test_frac}
    fields: dict[str, Any] = {"source": "folder", "captions_per_image": counts[0], "label_names": label_names,
                              "tag_vocab": [], "split": split_info,
                              "skipped_missing": [item.meta["filename"] for item in missing]}
    if not from_file:
        fields["seed"] = seed
    members = ("jpg", "json", "labels.npy") if has_labels else ("jpg", "json")
    names = (*SPLITS, *sorted(set(splits) - set(SPLITS)))
    summary = f"{len(missing)} missing images skipped" if missing else ""
    return Conversion(items, len(items), members, names, fields, warnings, summary)
