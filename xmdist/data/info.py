"""Reading a shard set: ``_info.json`` plus the ``*.tar`` files it lists (see shards/README.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ShardError(RuntimeError):
    """A shard set is missing, incomplete or not in xmdist's format."""


@dataclass(frozen=True)
class Split:
    name: str
    paths: tuple[str, ...]  # shard files, in _info.json order
    counts: tuple[int, ...]  # samples per shard

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
