"""Write a split of an xmdist shard set again in img2dataset's output layout (tests, benchmarks).

img2dataset writes ``00000.tar, 00001.tar, ...`` holding per sample ``KEY.jpg``, ``KEY.txt``
(the caption) and ``KEY.json`` (``caption``, ``url``, ``key``, ``status``, ``error_message``,
``width``, ``height``, ``original_width``, ``original_height``, ``exif``, ``sha256``), and per shard
``00000_stats.json`` (``count``, ``successes``, ``failed_to_download``, ...). The JPEG bytes are
copied unchanged, so both layouts hold the same images; keys are ``{shard:05d}{index:04d}``, as
img2dataset numbers them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import simplejpeg
from webdataset import TarWriter

from xmdist.data.decode import decode_meta
from xmdist.data.info import Split
from xmdist.data.loader import iter_raw_samples


def write_img2dataset(split: Split, out: str | Path, per_shard: int = 100, failed_every: int = 0,
                      sizes: bool = False) -> list[dict]:
    """Rewrite ``split`` into ``out``; every ``failed_every``-th key (0: none) is a failed download
    (json only, ``status: failed_to_download``) and takes no sample's place. Returns, in stream
    order, ``{"key", "id", "caption"}`` of the successful samples. ``sizes``: an open_clip
    ``sizes.json`` too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, stats, shard, index, writer = [], {}, 0, 0, None
    samples = iter_raw_samples(list(split.paths))

    def close() -> None:
        if writer is not None:
            writer.close()
            name = f"{shard:05d}"
            (out / f"{name}_stats.json").write_text(json.dumps({
                "count": stats["count"], "successes": stats["successes"],
                "failed_to_download": stats["count"] - stats["successes"], "failed_to_resize": 0,
                "status_dict": {"success": stats["successes"]}}, indent=1))

    for sample in samples:
        while True:
            if writer is None or index == per_shard:
                close()
                shard, index = (shard + 1, 0) if writer is not None else (0, 0)
                writer = TarWriter(str(out / f"{shard:05d}.tar"))
                stats = {"count": 0, "successes": 0}
            key = f"{shard:05d}{index:04d}"
            index += 1
            stats["count"] += 1
            if failed_every and int(key) % failed_every == failed_every - 1:
                writer.write({"__key__": key, "json": json.dumps({
                    "url": f"http://example.com/{key}.jpg", "key": key, "status": "failed_to_download",
                    "error_message": "HTTP Error 404", "caption": "a lost image"}).encode()})
                continue
            break
        meta = decode_meta(sample)
        caption = meta["captions"][0]
        jpg = sample["jpg"]
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpg)
        writer.write({"__key__": key, "jpg": jpg, "txt": caption.encode(), "json": json.dumps({
            "url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
            "caption": caption, "width": width, "height": height, "original_width": width,
            "original_height": height,
            "exif": "{}", "sha256": hashlib.sha256(jpg).hexdigest()}).encode()})
        stats["successes"] += 1
        written.append({"key": key, "id": int(key), "caption": caption, "source_id": int(meta["id"])})
    close()
    if sizes:
        counts: dict[str, int] = {}
        for w in written:
            name = f"{w['key'][:5]}.tar"
            counts[name] = counts.get(name, 0) + 1
        (out / "sizes.json").write_text(json.dumps(counts))
    return written
