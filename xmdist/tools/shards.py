"""Write shard sets (what ``launch/make_shards.py`` runs): check the output directory, turn
items into records on a process pool, write them with a progress bar and print a summary.

    check_out_dir(out, overwrite=False)                        # OutDirError if out is unusable
    write_synthetic(out, 10000, seed=0, image_size=64, num_val=1000, num_test=1000,
                    samples_per_shard=1000, workers=2)
    write_conversion(out, karpathy.convert(...), generator={...}, samples_per_shard=1000)

Any number of worker processes writes the same bytes as one.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar


from xmdist import progress
from xmdist.data import synthetic
from xmdist.data.converters import Conversion, Record, encode_item
from xmdist.data.writer import SPLITS, ShardSetWriter, foreign_files

T = TypeVar("T")


class OutDirError(ValueError):
    """The output directory is a file, or holds files that are not an xmdist shard set."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a file or a directory holding anything but an old shard set
    (unless ``overwrite``): raise :class:`OutDirError` with the message for ``--out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} exists and is not a directory")
    other = foreign_files(out)
    if other and not overwrite:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise OutDirError(f"--out {out} contains files that are not an xmdist shard set ({shown}); "
                          "pass --overwrite to write there anyway (only old shards and _info.json are deleted)")


def map_in_order(fn: Callable[[T], Record], items: Iterable[T], workers: int) -> Iterator[Record]:
    """``map(fn, items)`` in order, on a process pool when workers > 1 (same output either way).

    The pool works on one batch of items while the previous batch's results are consumed, so
    at most two batches (64 items per worker each) are in memory.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    iterator = iter(items)
    with multiprocessing.Pool(workers) as pool:
        pending = None
        while batch := list(islice(iterator, 64 * workers)):
            submitted = pool.map_async(fn, batch, chunksize=16)
            if pending is not None:
                yield from pending.get()
            pending = submitted
        if pending is not None:
            yield from pending.get()


def write_records(out: Path, records: Iterable[Record], total: int, members: Iterable[str], fields: dict,
                  samples_per_shard: int, splits: Iterable[str] = SPLITS, desc: str | None = None,
                  note: str = "") -> dict:
    """Write ``(key, split, sample)`` records to the shard set in ``out`` with a progress bar
    (stderr, labelled ``desc``; default ``-> out``), print a summary (plus ``note``) to stdout
    and return the written ``_info.json`` content."""
    start, out = time.time(), Path(out)
    with ShardSetWriter(out, members, samples_per_shard, splits) as writer:
        for key, split, sample in progress.bar(records, total, f"-> {out}" if desc is None else desc, "sample"):
            writer.write(split, key, sample)
        info = writer.finish(fields)
    counts = ", ".join(f"{name} {s['num_samples']}" for name, s in info["splits"].items())
    num_shards = sum(len(s["shards"]) for s in info["splits"].values())
    print(f"wrote {total} samples ({counts}) in {num_shards} shards to {out} ({time.time() - start:.1f}s)"
          + (f"; {note}" if note else ""))
    return info


def write_conversion(out: Path, conversion: Conversion, generator: dict[str, Any], samples_per_shard: int,
                     workers: int = 1, desc: str | None = None) -> dict:
    """Show the converter's warnings (stderr), then encode its items on ``workers`` processes and
    write them; ``generator`` (the converter's arguments; paths become strings) goes into
    ``_info.json``."""
    for warning in conversion.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    generator = {name: str(value) if isinstance(value, Path) else value for name, value in generator.items()}
    return write_records(out, map_in_order(encode_item, conversion.items, workers), conversion.total,
                         conversion.members, {**conversion.fields, "generator": generator}, samples_per_shard,
                         conversion.splits, desc, conversion.summary)


def synthetic_job(num: int, seed: int, image_size: int, num_val: int, num_test: int,
                  samples_per_shard: int) -> tuple[Callable[[int], Record], dict]:
    """The record of synthetic sample ``i`` as a picklable function of ``i``, and the
    ``_info.json`` fields of the ``num``-sample set (ids [0, num_test) are test, the next
    ``num_val`` val, the rest train)."""
    job = partial(synthetic.make_record, seed=seed, image_size=image_size, num_val=num_val, num_test=num_test)
    fields = {**synthetic.info_fields(seed, image_size),
              "generator": {"num": num, "val": num_val, "test": num_test, "samples_per_shard": samples_per_shard}}
    return job, fields


def write_synthetic(out: Path, num: int, seed: int, image_size: int, num_val: int, num_test: int,
                    samples_per_shard: int, workers: int = 1, desc: str | None = None) -> dict:
    """Write the synthetic coloured-shapes shard set of :func:`synthetic_job` to ``out``."""
    job, fields = synthetic_job(num, seed, image_size, num_val, num_test, samples_per_shard)
    return write_records(out, map_in_order(job, range(num), workers), num, synthetic.MEMBERS, fields,
                         samples_per_shard, desc=desc)
