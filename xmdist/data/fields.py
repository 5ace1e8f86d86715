"""Samples of WebDataset shards written by other tools, read as xmdist samples.

img2dataset (LAION, CC3M/CC12M, COYO, DataComp) and open_clip's training layout store per sample
``KEY.jpg`` (or ``jpeg``/``png``/``webp``), ``KEY.txt`` with one caption and ``KEY.json`` with
``caption``, ``url``, ``key``, ``width``, ``height``, ``status``. :meth:`SampleFields.adapt` turns
such a raw sample into the form xmdist's decoders read: one image member and a ``json`` member
``{"id": ..., "captions": [...]}``. Every other member is dropped unread (nothing is unpickled).

Conventions:
- image: ``data.image_key`` if set, else the first present of jpg, jpeg, png, webp;
- captions: ``data.caption_key`` if set (a member name such as ``txt``, or ``json:FIELD`` for a
  json field holding a string or a list of strings), else ``txt``, else json ``caption``, else
  json ``captions`` (a list); the first ``captions_per_image`` of them are used;
- a sample whose json says ``status`` other than ``success`` is skipped (img2dataset's failed
  downloads), as is one without an image or enough captions; each is counted by the stream;
- id: the key itself when it is a number (img2dataset's keys are), else a 62-bit hash of it; in
  a multi-source set the source index is hashed in (two sets' ``000000000`` stay distinct).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from xmdist.data.writer import encode_json

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = "txt, json 'caption', json 'captions'"


class Unusable(ValueError):
    """A sample that cannot be trained on: ``reason`` is ``status``, ``image`` or ``caption``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def sample_id(key: str, source: int = 0) -> int:
    """A non-negative int64 id of a sample key (see the module docstring)."""
    if source == 0 and key.isdigit() and len(key) <= 18:
        return int(key)
    digest = hashlib.blake2b(f"{source}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def _json(sample: dict) -> dict | None:
    if "json" not in sample:
        return None
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Unusable("caption", f"json member is not valid JSON: {e}") from None
    return meta if isinstance(meta, dict) else None


def _as_captions(value) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(c, str) and c.strip() for c in value):
        return [c.strip() for c in value]
    return None


@dataclass(frozen=True)
class SampleFields:
    """How the samples of a foreign shard set become xmdist samples (module docstring)."""
    image_key: str = ""  # "": the first of IMAGE_MEMBERS present
    caption_key: str = ""  # "": txt, json caption, json captions; else a member name or "json:FIELD"
    captions_per_image: int = 1
    sources: tuple[tuple[str, int], ...] = ()  # (shard url, source index) of a multi-source set
    open_retries: int = 2  # a remote shard that fails to open is tried this many more times, then skipped
    timeout_s: float = 60.0  # http(s): seconds without data before a read fails

    def image_member(self, sample: dict) -> str | None:
        if self.image_key:
            return self.image_key if self.image_key in sample else None
        return next((k for k in IMAGE_MEMBERS if k in sample), None)

    def captions(self, sample: dict, meta: dict | None) -> list[str] | None:
        key = self.caption_key
        if key.startswith("json:"):
            return _as_captions((meta or {}).get(key[5:]))
        if key:
            return _as_captions(bytes(sample[key]).decode("utf-8", "replace")) if key in sample else None
        if "txt" in sample:
            found = _as_captions(bytes(sample["txt"]).decode("utf-8", "replace"))
            if found:
                return found
        meta = meta or {}
        return _as_captions(meta.get("caption")) or _as_captions(meta.get("captions"))

    def adapt(self, sample: dict) -> dict:
        """The xmdist form of raw ``sample``; :class:`Unusable` when it cannot be trained on."""
        meta = _json(sample)
        if meta is not None and meta.get("status", "success") != "success":
            raise Unusable("status", f"status {meta.get('status')!r}")
        image = self.image_member(sample)
        if image is None:
            raise Unusable("image", f"no image member ({self.image_key or '/'.join(IMAGE_MEMBERS)})")
        captions = self.captions(sample, meta)
        if not captions or len(captions) < self.captions_per_image:
            raise Unusable("caption", f"{len(captions or [])} caption(s) in {self.caption_key or CAPTION_FIELDS}, "
                                      f"{self.captions_per_image} needed")
        fmt = image.rsplit(".", 1)[-1].lower()
        source = dict(self.sources).get(sample.get("__url__"), 0) if self.sources else 0
        return {"__key__": sample["__key__"], "__url__": sample.get("__url__"), fmt: sample[image],
                "json": encode_json({"id": sample_id(sample["__key__"], source),
                                     "captions": captions[:self.captions_per_image]})}

    def missing(self, sample: dict) -> str:
        """'' when ``sample`` has what training needs, else what is missing and which keys would work."""
        members = [k for k in sample if not k.startswith("__")]
        try:
            meta = _json(sample)
        except Unusable:
            meta = None
        if self.image_member(sample) is None:
            found = [k for k in members if k.rsplit(".", 1)[-1].lower() in IMAGE_MEMBERS]
            hint = f"; set data.image_key to one of {', '.join(found)}" if found else ""
            return (f"no image member {self.image_key or '/'.join(IMAGE_MEMBERS)} in the first sample "
                    f"(members: {', '.join(members)}){hint}")
        if not self.captions(sample, meta):
            texts = [k for k in members if k.endswith("txt") or k.endswith("text")]
            fields = [f"json:{k}" for k, v in (meta or {}).items() if _as_captions(v)]
            would = texts + fields
            hint = (f"; data.caption_key={would[0]} would work (candidates: {', '.join(would)})" if would else
                    "; no member or json field of it holds text")
            return (f"no caption field ({self.caption_key or CAPTION_FIELDS}) in the first sample "
                    f"(members: {', '.join(members)}{'; json keys: ' + ', '.join(meta) if meta else ''}){hint}")
        return ""
