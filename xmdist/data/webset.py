"""A shard set of another tool's WebDataset shards (img2dataset, open_clip), seen as xmdist sees its own.

:func:`open_shards` is what the trainer and the tools call with ``data``: an xmdist shard set
directory gives its :class:`ShardSet` (unchanged); anything else (:mod:`xmdist.data.sources`)
gives a :class:`WebShardSet` whose splits are ``data.shards`` (train), ``data.val_shards`` and
``data.test_shards``. Its splits carry the :class:`SampleFields` that adapt samples on the fly,
so the streams, the evaluation and the tools never need to know where shards came from.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from xmdist.data.fields import SampleFields
from xmdist.data.info import ShardError, ShardSet, Split
from xmdist.data.loader import _members, iter_raw_samples
from xmdist.data.sources import COUNT_OPTIONS, INDEX_FORMAT, Source, is_local, open_shard, parse_sources, read_index

log = logging.getLogger(__name__)

ROLES = {"train": "data.shards", "val": "data.val_shards", "test": "data.test_shards"}


def count_shard(url: str, fields: SampleFields) -> tuple[int, int]:
    """(usable samples, skipped samples or damage) of one shard, read once."""
    skipped = 0

    def skip(reason: str) -> None:
        nonlocal skipped
        skipped += 1

    usable = sum(1 for _ in iter_raw_samples([url], skip, fields))
    return usable, skipped


def first_raw_sample(url: str, key: str, timeout_s: float = 60.0) -> dict:
    """The first sample of a shard as it is stored (members as bytes), for checking its fields."""
    errors = []
    try:
        with open_shard(url, timeout_s) as stream:
            for sample in _members(stream, url, lambda e: errors.append(e) or True):
                return sample
    except (OSError, ValueError) as e:
        errors.append(e)
    raise ShardError(f"{key}: the first shard {url} could not be read"
                     f"{': ' + str(errors[0]) if errors else ' (it holds no sample)'}")


class WebShardSet:
    """Splits of foreign shards; the interface of :class:`ShardSet` that training uses."""

    def __init__(self, root: str, splits: dict[str, Split | None], captions_per_image: int,
                 keys: dict[str, str] | None = None):
        self.root, self._splits, self._keys = root, splits, keys or {}
        self.info: dict[str, Any] = {"captions_per_image": captions_per_image}

    @property
    def captions_per_image(self) -> int:
        return int(self.info["captions_per_image"])

    def has_split(self, name: str) -> bool:
        return self._splits.get(name) is not None

    def split(self, name: str) -> Split:
        split = self._splits.get(name)
        if split is None:
            key = self._keys.get(name, "data.val_shards or data.test_shards")
            raise ShardError(f"split '{name}': no shards given for it ({key})")
        return split


def _even(total: int, n: int) -> tuple[int, ...]:
    return tuple(total // n + (i < total % n) for i in range(n))


def shard_weights(sources: list[Source], mode: str = "upsampling") -> tuple[float, ...]:
    """Each shard's relative chance in resampled draws. ``upsampling`` (open_clip's
    ``--train-data-upsampling-factors``): the source's weight, so a source's share of the draws
    is weight x its shards / the weighted total; ``share``: the weight split over the source's
    shards, so its share is weight / the sum of weights, whatever its number of shards."""
    if mode == "share":
        return tuple(s.weight / len(s.urls) for s in sources for _ in s.urls)
    return tuple(float(s.weight) for s in sources for _ in s.urls)


def _split(name: str, sources: list[Source], fields: SampleFields, total: int = 0, weighted: bool = False,
           count_missing: bool = False, weight_mode: str = "upsampling") -> Split:
    urls = tuple(u for s in sources for u in s.urls)
    if not urls:
        raise ShardError(f"{ROLES.get(name, name)}: no shards")
    weights = shard_weights(sources, weight_mode) if weighted else ()
    if len(sources) > 1:
        fields = SampleFields(fields.image_key, fields.caption_key, fields.captions_per_image,
                              tuple((u, i) for i, s in enumerate(sources) for u in s.urls),
                              fields.open_retries, fields.timeout_s)
    if all(s.counts is not None for s in sources):
        counts = tuple(c for s in sources for c in s.counts)
        how = ", ".join(sorted({s.counted_by for s in sources}))
        log.info("%s: %d shard(s), %d samples (counts from %s)", ROLES.get(name, name), len(urls), sum(counts), how)
        return Split(name, urls, counts, fields, weights, exact=True)
    if total:
        log.info("%s: %d shard(s), per-shard counts unknown: data.train_num_samples=%d sizes the epoch (resampled "
                 "mode; `make_shards.py index` gives exact epochs)", ROLES.get(name, name), len(urls), total)
        return Split(name, urls, _even(total, len(urls)), fields, weights, exact=False)
    if count_missing:  # evaluation splits are read whole anyway: counted once here
        log.info("%s: counting the samples of %d shard(s) (no _info.json, sizes.json or *_stats.json)",
                 ROLES.get(name, name), len(urls))
        counts = tuple(count_shard(u, fields)[0] for u in urls)
        return Split(name, urls, counts, fields, weights, exact=True)
    unknown = [s.spec for s in sources if s.counts is None]
    raise ShardError(f"{ROLES.get(name, name)}: the number of samples of {unknown[0]} is unknown (no _info.json "
                     f"index, sizes.json or *_stats.json beside its shards). Either {COUNT_OPTIONS}")


def is_xmdist_set(spec: Any) -> bool:
    """True for a directory holding an ``_info.json`` that is not an index (xmdist's own set), or
    a plain path that does not exist (ShardSet.open reports it); False for the other sources."""
    if not isinstance(spec, str) or "::" in spec or not is_local(spec):
        return False
    if os.path.isdir(spec):
        info = os.path.join(spec, "_info.json")
        if os.path.isfile(info):
            return read_index(info) is None
        return not any(n.endswith(".tar") for n in os.listdir(spec))  # no shards: ShardSet.open says so
    looks_like_pattern = any(c in spec for c in "{*?[") or spec.endswith(".tar")
    return not os.path.exists(spec) and not looks_like_pattern


def describe(shards: ShardSet | WebShardSet) -> str:
    """Where a shard set lies, for results files: an absolute directory, else the spec."""
    return str(shards.root.resolve()) if isinstance(shards, ShardSet) else shards.root


def open_shards(d, override: str | None = None) -> ShardSet | WebShardSet:
    """The shard set of config section ``data`` (:class:`xmdist.config.DataConfig`); ``override``
    replaces ``data.shards`` (a tool's ``--shards``)."""
    if override:
        d = dataclasses.replace(d, shards=str(override))
    if is_xmdist_set(d.shards):
        if d.val_shards or d.test_shards:
            raise ShardError(f"data.val_shards / data.test_shards: {d.shards} is an xmdist shard set with its own "
                             f"splits (data.val_split, data.test_split); these keys are for other shard sets")
        return ShardSet.open(d.shards)
    cpi = d.captions_per_image or 1
    fields = SampleFields(d.image_key, d.caption_key, cpi, open_retries=d.open_retries, timeout_s=d.open_timeout_s)
    sources = parse_sources(d.shards, list(d.shard_weights))
    weighted = bool(d.shard_weights) or any(s.weight != 1.0 for s in sources)
    splits: dict[str, Split | None] = {"train": _split(d.train_split, sources, fields, d.train_num_samples, weighted,
                                                   weight_mode=d.weight_mode)}
    sample = first_raw_sample(splits["train"].paths[0], "data.shards", d.open_timeout_s)
    problem = fields.missing(sample)
    if problem:
        raise ShardError(f"data.shards: {splits['train'].paths[0]}: {problem}")
    for role, spec in (("val", d.val_shards), ("test", d.test_shards)):
        name = getattr(d, f"{role}_split")
        splits[role] = _split(name, parse_sources(spec, [], ROLES[role]), fields, count_missing=True) if spec else None
    root = d.shards if isinstance(d.shards, str) else " ".join(map(str, d.shards))
    # the trainer asks for splits by their configured names
    named = {d.train_split: splits["train"], d.val_split: splits["val"], d.test_split: splits["test"]}
    keys = {d.train_split: ROLES["train"], d.val_split: ROLES["val"], d.test_split: ROLES["test"]}
    return WebShardSet(root, named, cpi, keys)


__all__ = ["INDEX_FORMAT", "WebShardSet", "count_shard", "open_shards", "is_xmdist_set"]
