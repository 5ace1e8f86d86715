#!/usr/bin/env python
"""Build an xmdist shard set (WebDataset tars + ``_info.json``, see shards/README.md).

    python launch/make_shards.py synthetic --out shards/synthetic --num 10000 --seed 0 --workers 2

One function per subcommand (``cmd_<name>``) plus its ``add_<name>_args``; sources for real
data sets (karpathy, dcmh, folder) plug in the same way.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Callable, Iterable, Iterator  # noqa: E402

from tqdm import tqdm  # noqa: E402

from xmdist.data import synthetic  # noqa: E402
from xmdist.data.writer import ShardSetWriter, foreign_files  # noqa: E402

Record = tuple[str, str, dict[str, bytes]]  # (key, split, members)


def _check_out_dir(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    """Refuse to write into a file or a directory holding anything but an old shard set."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    other = foreign_files(out)
    if other and not overwrite:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        parser.error(f"--out {out} contains files that are not an xmdist shard set ({shown}); "
                     "pass --overwrite to write there anyway (only old shards and _info.json are deleted)")


def _map_in_order(fn: Callable[[int], Record], ids: range, workers: int) -> Iterator[Record]:
    """``map(fn, ids)`` in order, on a process pool when workers > 1 (same output either way)."""
    if workers == 1:
        yield from map(fn, ids)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(fn, ids, chunksize=16)


def _write(args: argparse.Namespace, records: Iterable[Record], total: int, members: Iterable[str],
           fields: dict) -> None:
    """Write records to the shard set in ``--out`` with a progress bar, then print a summary."""
    start, out = time.time(), Path(args.out)
    with ShardSetWriter(out, members, args.samples_per_shard) as writer:
        for key, split, sample in tqdm(records, total=total, unit="sample", file=sys.stderr,
                                       desc=f"{args.command} -> {out}"):
            writer.write(split, key, sample)
        info = writer.finish(fields)
    counts = ", ".join(f"{name} {s['num_samples']}" for name, s in info["splits"].items())
    num_shards = sum(len(s["shards"]) for s in info["splits"].values())
    print(f"wrote {total} samples ({counts}) in {num_shards} shards to {out} ({time.time() - start:.1f}s)")


def add_synthetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num", type=int, required=True, help="total number of samples (all splits)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64, min 16)")
    p.add_argument("--val", type=int, default=None, help="validation samples (default min(1000, num // 10))")
    p.add_argument("--test", type=int, default=None, help="test samples (default min(1000, num // 10))")


def cmd_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Coloured-shapes data: ids [0, test) are test, [test, test + val) val, the rest train."""
    default_held_out = min(1000, max(args.num, 0) // 10)
    args.val = default_held_out if args.val is None else args.val
    args.test = default_held_out if args.test is None else args.test
    if args.num <= 0:
        parser.error(f"--num must be > 0, got {args.num}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.val < 0 or args.test < 0:
        parser.error(f"--val and --test must be >= 0, got {args.val} and {args.test}")
    if args.val + args.test >= args.num:
        parser.error(f"--val + --test ({args.val} + {args.test}) must be < --num ({args.num}) "
                     "so that train has at least one sample")
    if args.image_size < 16:
        parser.error(f"--image-size must be >= 16, got {args.image_size}")
    _check_out_dir(parser, Path(args.out), args.overwrite)

    job = partial(synthetic.make_record, seed=args.seed, image_size=args.image_size,
                  num_val=args.val, num_test=args.test)
    fields = {**synthetic.info_fields(args.seed, args.image_size),
              "generator": {"num": args.num, "val": args.val, "test": args.test,
                            "samples_per_shard": args.samples_per_shard}}
    _write(args, _map_in_order(job, range(args.num), args.workers), args.num, synthetic.MEMBERS, fields)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")
    for name, add_args, run, help_text in [
        ("synthetic", add_synthetic_args, cmd_synthetic, "deterministic coloured-shapes captions"),
    ]:
        p = commands.add_parser(name, help=help_text, description=run.__doc__)
        p.add_argument("--out", required=True, help="output directory for the shard set")
        p.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="default 1000")
        p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
        p.add_argument("--overwrite", action="store_true",
                       help="write into --out even if it holds other files (they are kept)")
        add_args(p)
        p.set_defaults(run=run, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args, args.parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
