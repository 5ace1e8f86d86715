"""Write samples into byte-deterministic WebDataset tar shards plus an ``_info.json`` index.

A shard set is a directory holding ``{split}-{index:06d}.tar`` files and ``_info.json``
(format described in ``shards/README.md``). Each sample is a dict ``{extension: bytes}``
stored as tar members ``KEY.extension`` in sorted order. Tar headers carry no time, owner
or permission information from the machine, so the same samples give the same bytes.

Shards are written to ``NAME.tar.tmp`` and renamed when complete; ``_info.json`` is written
last, also atomically, so a directory with an ``_info.json`` always holds a complete set.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from xmdist.io import write_json_atomic

FORMAT_NAME = "xmdist-shards"
FORMAT_VERSION = 1
INFO_NAME = "_info.json"
SPLITS = ("train", "val", "test")

_SHARD_FILE = re.compile(r"^[a-z]+-\d{6}\.tar(\.tmp)?$")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """RGB JPEG bytes; 4:4:4 chroma so small saturated shapes keep their colour."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes (no pickle), loadable with ``np.load(..., allow_pickle=False)``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def is_shard_set_file(path: str | Path) -> bool:
    """True for files a shard set owns: shards, their temp files and an xmdist ``_info.json``."""
    path = Path(path)
    if path.name in (INFO_NAME, INFO_NAME + ".tmp"):
        try:  # an _info.json from some other tool is not ours to delete
            return json.loads(path.read_text()).get("format") == FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            return path.name.endswith(".tmp")
    return _SHARD_FILE.match(path.name) is not None


def foreign_files(out_dir: str | Path) -> list[str]:
    """Names of entries in ``out_dir`` that are not part of an xmdist shard set (sorted)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if not (p.is_file() and is_shard_set_file(p)))


def clear_shard_set(out_dir: str | Path) -> None:
    """Delete a previous shard set in ``out_dir`` (``_info.json`` first); other files are kept."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    info = out_dir / INFO_NAME
    if info.is_file() and is_shard_set_file(info):
        info.unlink()  # first, so a crash below never leaves an index pointing at missing shards
    for p in sorted(out_dir.iterdir()):
        if p.is_file() and is_shard_set_file(p):
            p.unlink()


class _Shard:
    """One tar file being written under a temporary name."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


class ShardSetWriter:
    """Write samples split by split into fixed-size tar shards and finish with ``_info.json``.

    Constructing the writer creates ``out_dir`` and deletes any previous shard set in it
    (see :func:`clear_shard_set`) so stale shards of a larger earlier run cannot survive.
    Samples of different splits may be interleaved; each split fills its own shards.
    Call :meth:`finish` at the end; used as a context manager, shards left unfinished (on an
    exception or without ``finish``) are removed.
    """

    def __init__(self, out_dir: str | Path, members: Iterable[str], samples_per_shard: int = 1000,
                 splits: Iterable[str] = SPLITS):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.members = sorted(members)
        self.samples_per_shard = samples_per_shard
        self.shards: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
        self._open: dict[str, _Shard] = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clear_shard_set(self.out_dir)

    def write(self, split: str, key: str, sample: Mapping[str, bytes]) -> None:
        """Append one sample (``{extension: bytes}``) with the given key to ``split``."""
        if split not in self.shards:
            raise ValueError(f"unknown split {split!r}; expected one of {list(self.shards)}")
        # WebDataset takes everything up to the first '.' of the member name as the key
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.' or '/'")
        if sorted(sample) != self.members:
            raise ValueError(f"sample {key} has members {sorted(sample)}, expected {self.members}")
        shard = self._open.get(split)
        if shard is None:
            shard = self._open[split] = _Shard(self.out_dir / shard_name(split, len(self.shards[split])))
        for ext in self.members:
            shard.add(f"{key}.{ext}", sample[ext])
        shard.num_samples += 1
        if shard.num_samples == self.samples_per_shard:
            self._close(split)

    def _close(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.close()
        self.shards[split].append({"name": shard.path.name, "num_samples": shard.num_samples})

    def counts(self) -> dict[str, int]:
        """Samples written so far per split (including the open shards)."""
        done = {s: sum(x["num_samples"] for x in shards) for s, shards in self.shards.items()}
        return {s: n + (self._open[s].num_samples if s in self._open else 0) for s, n in done.items()}

    def finish(self, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Close all shards and write ``_info.json`` = format header + ``fields`` + members + splits."""
        for split in list(self._open):
            self._close(split)
        info: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **(fields or {})}
        info["members"] = list(self.members)
        info["splits"] = {s: {"num_samples": sum(x["num_samples"] for x in shards), "shards": shards}
                          for s, shards in self.shards.items()}
        write_json_atomic(self.out_dir / INFO_NAME, info, indent=1)
        return info

    def abort(self) -> None:
        """Drop the shards still being written (completed shards stay, without an index)."""
        for shard in self._open.values():
            shard.abort()
        self._open.clear()

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # no-op after finish()
