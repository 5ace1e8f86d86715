"""``make_shards.py index``: count another tool's shards once, write an ``_info.json`` index.

The index (``format: xmdist-index``) lists each shard's URL (relative to the index's folder
when it lies there) and its number of usable samples (status success, with an image and a
caption: what training reads), plus the samples skipped. No sample is copied: the shards stay
where they are and ``data.shards`` names the index's folder.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from xmdist import progress
from xmdist.data.fields import SampleFields
from xmdist.data.info import ShardError
from xmdist.data.sources import INDEX_FORMAT, is_local, parse_sources
from xmdist.data.webset import count_shard
from xmdist.io import write_json_atomic


class ShardIndexError(ValueError):
    """The shards cannot be indexed (nothing matched, no folder to write into)."""


def _count(job: tuple[str, SampleFields]) -> tuple[int, int]:
    return count_shard(*job)


def write_index(specs: list[str], out: str | None, workers: int = 1, image_key: str = "", caption_key: str = "",
                captions_per_image: int = 1) -> dict:
    try:
        sources = [s for spec in specs for s in parse_sources(spec, [], "--shards")]
    except ShardError as e:
        raise ShardIndexError(str(e)) from None
    urls = [u for s in sources for u in s.urls]
    folders = {os.path.dirname(os.path.abspath(u)) for u in urls if is_local(u)}
    if out is None:
        if len(folders) != 1 or not all(is_local(u) for u in urls):
            raise ShardIndexError("--out DIR is needed: the shards are URLs or lie in several directories")
        out = folders.pop()
    out_dir = Path(out).absolute()
    if (out_dir / "_info.json").is_file() and not (out_dir / "_info.json").read_text().count(INDEX_FORMAT):
        raise ShardIndexError(f"{out_dir / '_info.json'} exists and is not an index: choose another --out")
    fields = SampleFields(image_key, caption_key, captions_per_image)
    jobs = [(u, fields) for u in urls]
    t0 = time.monotonic()
    if workers > 1:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            counts = list(progress.bar(pool.imap(_count, jobs), len(jobs), "index", "shards", every_s=10))
    else:
        counts = list(progress.bar(map(_count, jobs), len(jobs), "index", "shards", every_s=10))

    def name(u: str) -> str:
        if is_local(u) and os.path.dirname(os.path.abspath(u)) == str(out_dir):
            return os.path.basename(u)
        return os.path.abspath(u) if is_local(u) else u

    shards = [{"url": name(u), "num_samples": n, "skipped": k} for u, (n, k) in zip(urls, counts)]
    info = {"format": INDEX_FORMAT, "version": 1, "shards_spec": specs,
            "fields": {"image_key": image_key, "caption_key": caption_key, "captions_per_image": captions_per_image},
            "num_samples": sum(n for n, _ in counts), "skipped": sum(k for _, k in counts), "shards": shards}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "_info.json", info, indent=1)
    print(f"indexed {len(shards)} shard(s): {info['num_samples']} samples ({info['skipped']} skipped) in "
          f"{time.monotonic() - t0:.1f} s -> {out_dir / '_info.json'}")
    return info
