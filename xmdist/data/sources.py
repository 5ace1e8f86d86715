"""Where shards come from: a ``data.shards`` spec -> shard URLs, per-shard counts and origin.

Besides an xmdist shard set (a directory with xmdist's ``_info.json``, :class:`ShardSet`),
``data.shards`` (and ``data.val_shards`` / ``data.test_shards``) takes WebDataset shards written
by other tools, read where they lie:

- a brace pattern ``/data/cc3m/{00000..00331}.tar``, a glob ``/data/cc3m/*.tar``, one ``.tar``;
- a directory of ``.tar`` files (img2dataset's output folder);
- a URL: ``pipe:CMD`` (the command writes the tar to stdout: object stores through their
  command-line tools, ``pipe:aws s3 cp s3://bucket/shard-{0000..0099}.tar -``), ``http(s)://``;
- a list of these (one source), or several sources joined by ``::`` or given as a list of
  ``{shards: ..., weight: ...}`` (weights, in resampled mode: by default open_clip's upsampling
  factors, multiplying each of the source's shards' chance; with ``data.weight_mode: share`` each
  source's share of the draws; see ``xmdist.data.webset.shard_weights``).

Per-shard sample counts, first found: an ``_info.json`` index (``make_shards.py index``), an
open_clip ``sizes.json`` beside the shards, img2dataset's ``NAME_stats.json`` per shard
(``successes``). Without them only ``data.train_num_samples`` (the total) can size an epoch, and
training runs in resampled mode.
"""
from __future__ import annotations

import glob
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, IO

from braceexpand import braceexpand

from xmdist.data.info import ShardError, ShardSet, Split

INDEX_FORMAT = "xmdist-index"
URL_PREFIXES = ("pipe:", "http://", "https://")
COUNT_OPTIONS = ("write an index once with `python launch/make_shards.py index --shards SPEC --out DIR` and point "
                 "data.shards at DIR (exact epochs); put open_clip's sizes.json (or img2dataset's *_stats.json) "
                 "beside the shards; or set data.train_num_samples to the set's size (resampled mode)")


def is_local(url: str) -> bool:
    return not url.startswith(URL_PREFIXES) and "://" not in url


def open_shard(url: str, timeout_s: float = 60.0) -> IO[bytes]:
    """A binary stream of one shard: a local file, an http(s) download, or a ``pipe:`` command's stdout."""
    if is_local(url):
        return open(url, "rb", buffering=1 << 20)  # tarfile reads 10 KB at a time
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - the user's own data URL
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=1 << 20)
    raise ShardError(f"{url}: unknown URL scheme; read it through a command, e.g. pipe:aws s3 cp URL -")


def _first_existing_parent(pattern: str) -> str:
    path = Path(pattern.split("{")[0].split("*")[0].split("?")[0].split("[")[0])
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def expand(pattern: str, key: str) -> list[str]:
    """Shard URLs of one pattern (braces expanded, local globs matched), in order."""
    pattern = pattern.strip()
    if not pattern:
        raise ShardError(f"{key}: empty shard pattern")
    out = []
    for item in braceexpand(pattern):
        if not is_local(item):
            out.append(item)
        elif glob.has_magic(item):
            out += sorted(p for p in glob.glob(item) if os.path.isfile(p))
        elif os.path.isdir(item):
            tars = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not tars:
                raise ShardError(f"{key}: directory {item} holds no .tar shards and no _info.json")
            out += tars
        elif os.path.isfile(item):
            if not item.endswith(".tar"):
                raise ShardError(f"{key}: {item} is a file, not a .tar shard, a shard directory or a pattern")
            out.append(item)
        else:
            out.append(item)  # checked below, all at once
    missing = [u for u in out if is_local(u) and not os.path.isfile(u)]
    if not out or missing:
        what = f"{len(missing)} of {len(out)} shard(s) do not exist, first {missing[0]}" if missing else "nothing matched"
        raise ShardError(f"{key}: {pattern}: {what}; the nearest existing directory is {_first_existing_parent(pattern)}")
    return out


# ---------------------------------------------------------------- counts


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_index(path: str) -> dict | None:
    """An ``_info.json`` written by ``make_shards.py index`` (None for anything else)."""
    info = _read_json(path)
    return info if isinstance(info, dict) and info.get("format") == INDEX_FORMAT else None


def index_urls(index: dict, folder: str) -> list[tuple[str, int]]:
    """(url, samples) of an index's shards; names relative to the index's folder."""
    return [(s["url"] if not is_local(s["url"]) or os.path.isabs(s["url"]) else os.path.join(folder, s["url"]),
             int(s["num_samples"])) for s in index["shards"]]


def _local_counts(urls: list[str]) -> tuple[list[int] | None, str]:
    """Counts of local shards from an index, sizes.json or *_stats.json beside them."""
    if not all(is_local(u) for u in urls):
        return None, ""
    known: dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
        index = read_index(os.path.join(folder, "_info.json"))
        if index:
            known.update({os.path.abspath(u): n for u, n in index_urls(index, folder)})
    counts = [known.get(os.path.abspath(u)) for u in urls]
    if None not in counts:
        return counts, "_info.json"
    known = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
        sizes = _read_json(os.path.join(folder, "sizes.json"))
        if isinstance(sizes, dict):
            known.update({os.path.join(folder, k): int(v) for k, v in sizes.items()})
    counts = [known.get(os.path.abspath(u)) for u in urls]
    if None not in counts:
        return counts, "sizes.json"
    counts = []
    for u in urls:
        stats = _read_json(u[:-len(".tar")] + "_stats.json") if u.endswith(".tar") else None
        if not isinstance(stats, dict) or "successes" not in stats:
            return None, ""
        counts.append(int(stats["successes"]))
    return counts, "_stats.json"


@dataclass(frozen=True)
class Source:
    """One source of shards: its URLs, per-shard counts (None: unknown) and where they came from."""
    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    counted_by: str  # "_info.json", "sizes.json", "_stats.json" or ""
    weight: float = 1.0


def resolve(spec: str | list[str], key: str = "data.shards", weight: float = 1.0) -> Source:
    """The shards of one source: a pattern, a directory (plain tars or an index) or a list of patterns."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if len(patterns) == 1 and is_local(patterns[0]) and os.path.isdir(patterns[0]):
        folder = patterns[0]
        info_path = os.path.join(folder, "_info.json")
        index = read_index(info_path)
        if index:
            urls, counts = zip(*index_urls(index, folder)) if index["shards"] else ((), ())
            return Source(folder, tuple(urls), tuple(counts), "_info.json", weight)
        if os.path.isfile(info_path) and _read_json(info_path) is None:
            raise ShardError(f"{key}: {info_path} is not valid JSON")
        if os.path.isfile(info_path):
            raise ShardError(f"{key}: {folder} is an xmdist shard set: give it alone as data.shards (its splits "
                             f"are data.train_split / val_split / test_split)")
    urls = [u for p in patterns for u in expand(p, key)]
    counts, how = _local_counts(urls)
    return Source(" ".join(patterns), tuple(urls), tuple(counts) if counts else None, how, weight)


def parse_sources(shards: Any, weights: list[float], key: str = "data.shards") -> list[Source]:
    """``data.shards`` -> its sources (see the module docstring)."""
    if isinstance(shards, str) and "::" in shards:
        specs = [s for s in shards.split("::")]
        if weights and len(weights) != len(specs):
            raise ShardError(f"data.shard_weights: {len(weights)} weight(s) for {len(specs)} sources in {key}")
        return [resolve(s, key, w) for s, w in zip(specs, weights or [1.0] * len(specs))]
    if weights:
        raise ShardError(f"data.shard_weights: weights need several sources in {key} ('::'-joined)")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) for s in shards):
        out = []
        for i, s in enumerate(shards):
            unknown = sorted(set(s) - {"shards", "weight"})
            if unknown or "shards" not in s:
                raise ShardError(f"{key}[{i}]: a source is {{shards: PATTERN, weight: W}}, got keys {sorted(s)}")
            w = float(s.get("weight", 1.0))
            if not w > 0:
                raise ShardError(f"{key}[{i}].weight: must be > 0, got {s.get('weight')}")
            out.append(resolve(s["shards"], f"{key}[{i}]", w))
        return out
    if isinstance(shards, list) and not all(isinstance(s, str) for s in shards):
        raise ShardError(f"{key}: a list of patterns (strings) or of {{shards, weight}} sources, not a mix")
    return [resolve(shards, key)]
