"""Reading a shard set: ``_info.json`` plus the ``*.tar`` files it lists (see shards/README.md)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEAD_BYTES = 1 << 16  # bytes of each shard hashed by the fingerprint


class ShardError(RuntimeError):
    """A shard set is missing, incomplete or not in xmdist's format."""


@dataclass(frozen=True)
class Split:
    name: str
    paths: tuple[str, ...]  # shard files (or URLs, see xmdist.data.sources), in _info.json order
    counts: tuple[int, ...]  # samples per shard (estimates when not ``exact``)
    fields: Any = None  # xmdist.data.fields.SampleFields of a foreign set; None: xmdist's own samples
    weights: tuple[float, ...] = ()  # resampled mode: draw weight of each shard (empty: uniform)
    exact: bool = True  # counts known per shard (else only their total: resampled mode)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class ShardSet:
    root: Path
    info: dict

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        if not root.is_dir():
            raise ShardError(f"shard directory {root} does not exist (data.shards); create one with "
                             f"`python launch/make_shards.py synthetic --out {root}`")
        info_path = root / "_info.json"
        if not info_path.is_file():
            tars = sorted(p.name for p in root.glob("*.tar"))
            hint = f" ({len(tars)} .tar files found without it)" if tars else " (the directory has no shards)"
            raise ShardError(f"{info_path} is missing{hint}: shards must be written by launch/make_shards.py")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{info_path} is not valid JSON: {e}") from None
        for key in ("splits", "captions_per_image"):
            if key not in info:
                raise ShardError(f"{info_path} has no '{key}' entry")
        return cls(root, info)

    @property
    def captions_per_image(self) -> int:
        return int(self.info["captions_per_image"])

    def split(self, name: str) -> Split:
        """The split's shards; every listed file must exist and the split must be non-empty."""
        splits = self.info["splits"]
        if name not in splits:
            raise ShardError(f"split '{name}' not in {self.root / '_info.json'} (has: {', '.join(splits)})")
        shards = splits[name]["shards"]
        paths = tuple(str(self.root / s["name"]) for s in shards)
        counts = tuple(int(s["num_samples"]) for s in shards)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ShardError(f"split '{name}': {len(missing)} shard file(s) missing, first: {missing[0]}")
        if sum(counts) == 0:
            raise ShardError(f"split '{name}' in {self.root} has no samples")
        return Split(name, paths, counts)


def fingerprint(split: Split, seed=None) -> dict:
    """What a resumed run must find again: each shard's name, size, sample count and the SHA-1 of
    its first 64 KB (one small read per shard), plus the set's generator seed. Plain types, so it
    travels in a checkpoint loaded with ``weights_only``."""
    shards = []
    for path, count in zip(split.paths, split.counts):
        if not os.path.isfile(path):  # a URL: its name and count (reading it would cost a download)
            shards.append([path, None, count, None])
            continue
        with open(path, "rb") as f:
            head = hashlib.sha1(f.read(HEAD_BYTES)).hexdigest()
        name = os.path.basename(path) if split.fields is None else path  # sources may share names
        shards.append([name, os.path.getsize(path), count, head])
    return {"split": split.name, "seed": seed, "shards": shards}


def fingerprint_changes(old: dict, new: dict, limit: int = 5) -> list[str]:
    """What differs between two :func:`fingerprint` results, in words ([] when nothing does)."""
    out = []
    if old.get("seed") != new.get("seed"):
        out.append(f"the set's seed {old.get('seed')} -> {new.get('seed')}")
    was, now = {s[0]: s[1:] for s in old["shards"]}, {s[0]: s[1:] for s in new["shards"]}
    added, removed = sorted(set(now) - set(was)), sorted(set(was) - set(now))
    if added:
        out.append(f"{len(added)} shard(s) added ({', '.join(added[:limit])})")
    if removed:
        out.append(f"{len(removed)} shard(s) gone ({', '.join(removed[:limit])})")
    for name in sorted(set(was) & set(now)):
        (size0, n0, h0), (size1, n1, h1) = was[name], now[name]
        if (size0, n0, h0) != (size1, n1, h1):
            what = [f"size {size0} -> {size1} bytes"] if size0 != size1 else []
            what += [f"samples {n0} -> {n1}"] if n0 != n1 else []
            what += ["content"] if h0 != h1 and not what else []
            out.append(f"{name}: {', '.join(what)}")
            if len(out) >= 3 * limit:
                out.append("...")
                break
    return out
