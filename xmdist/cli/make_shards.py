#!/usr/bin/env python
"""Build an xmdist shard set (WebDataset tars + ``_info.json``, see shards/README.md).

    python launch/make_shards.py synthetic --out shards/synthetic --num 10000 --seed 0 --workers 2
    python launch/make_shards.py karpathy --json dataset_coco.json --images COCO_ROOT --out shards/coco
    python launch/make_shards.py dcmh --images mirflickr25k-iall.mat --tags mirflickr25k-yall.mat \
        --labels mirflickr25k-lall.mat --protocol dcmh --out shards/mirflickr
    python launch/make_shards.py folder --images DIR --captions captions.jsonl --out shards/mine
    python launch/make_shards.py index --shards '/data/cc3m/{00000..00331}.tar' --workers 8

``index`` writes no shards: it counts the samples of a WebDataset shard set written by another
tool (img2dataset, open_clip) once and writes an ``_info.json`` beside the shards (or into
``--out``), so that training on them has exact epochs.

One function per subcommand (``cmd_<name>``) plus its ``add_<name>_args``. The converters of
real data sets (``xmdist.data.converters``) read and split their source; problems with it
are reported as ``error: ...`` with exit status 2.
"""
import argparse
import sys
from pathlib import Path
from typing import Callable

from xmdist.data.converters import Conversion, ConversionError, dcmh, folder, karpathy
from xmdist.tools.shards import OutDirError, check_out_dir, write_conversion, write_synthetic


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse reports "invalid int value" for non-numbers
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _convert(args: argparse.Namespace, conversion: Conversion) -> None:
    """Write a converter's items to ``--out``; ``generator`` records the arguments."""
    generator = {name: value for name, value in vars(args).items()
                 if name not in ("command", "run", "parser", "out", "overwrite", "workers")}
    write_conversion(Path(args.out), conversion, generator, args.samples_per_shard, args.workers,
                     desc=f"{args.command} -> {Path(args.out)}")


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
    check_out_dir(Path(args.out), args.overwrite)
    write_synthetic(Path(args.out), args.num, args.seed, args.image_size, args.val, args.test,
                    args.samples_per_shard, args.workers, desc=f"{args.command} -> {Path(args.out)}")


def add_karpathy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, required=True, help="Karpathy split file (dataset_coco.json, ...)")
    p.add_argument("--images", type=Path, required=True,
                   help="image root: files are ROOT/filepath/filename (COCO) or ROOT/filename (Flickr)")
    restval = p.add_mutually_exclusive_group()
    restval.add_argument("--restval-to-train", dest="restval_to_train", action="store_true", default=True,
                         help="put COCO's restval images into train (default)")
    restval.add_argument("--no-restval", dest="restval_to_train", action="store_false",
                         help="leave restval images out")
    p.add_argument("--skip-missing", action="store_true", help="leave out images whose file is missing")


def cmd_karpathy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Karpathy splits of COCO / Flickr30K: train (+ restval), val and test with 5 captions each;
    JPEG files are copied as they are."""
    check_out_dir(Path(args.out), args.overwrite)
    _convert(args, karpathy.convert(args.json, args.images, args.restval_to_train, args.skip_missing))


def add_dcmh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="MAT file with IAll (H x W x 3 x N uint8)")
    p.add_argument("--tags", type=Path, required=True, help="MAT file with YAll (N x T bag of words)")
    p.add_argument("--labels", type=Path, required=True, help="MAT file with LAll (N x L 0/1 labels)")
    p.add_argument("--protocol", choices=sorted(dcmh.DEFAULT_NUM_TRAIN), default="dcmh",
                   help="dcmh: uniform random splits; djsrh: label-stratified (default dcmh)")
    p.add_argument("--num-query", type=_positive_int, default=2000, help="query items (default 2000)")
    p.add_argument("--num-train", type=_positive_int, default=None,
                   help="training items drawn from retrieval (default 10000 for dcmh, 5000 for djsrh)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="split seed (default 0)")
    p.add_argument("--drop-unlabeled", action=argparse.BooleanOptionalAction, default=True,
                   help="drop items without any label before splitting (default on)")


def cmd_dcmh(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """DCMH-format MAT files (MIRFlickr-25K, NUS-WIDE, IAPR TC-12): query and retrieval
    (disjoint) and train (drawn from retrieval), with labels and tags."""
    check_out_dir(Path(args.out), args.overwrite)
    _convert(args, dcmh.convert(args.images, args.tags, args.labels, args.protocol, args.num_query,
                                args.num_train, args.seed, args.drop_unlabeled))


def add_folder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path,
                   help="image folder the paths in the captions file are relative to (default: the captions "
                        "file's folder)")
    p.add_argument("--captions", type=Path, required=True,
                   help="captions file: .jsonl (image, captions, labels?, split?), .csv or .tsv "
                        "(image, caption or caption_1..caption_k, labels?, split?)")
    p.add_argument("--image-col", default="image", help=".csv/.tsv: the column of the image paths")
    p.add_argument("--caption-col", default="",
                   help=".csv/.tsv: the column of the captions, one per row (default: 'caption' or 'caption_1'..)")
    p.add_argument("--sep", default=None, help=".csv/.tsv: the field separator (default: ',' for .csv, tab for .tsv)")
    p.add_argument("--val-frac", type=float, default=0.05, help="validation fraction without a split field (0.05)")
    p.add_argument("--test-frac", type=float, default=0.05, help="test fraction without a split field (0.05)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random split seed (default 0)")
    p.add_argument("--skip-missing", action="store_true", help="leave out images whose file is missing")


def cmd_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """An image folder with a JSONL or CSV captions file; splits from its split field or random."""
    check_out_dir(Path(args.out), args.overwrite)
    sep = {"\\t": "\t", "tab": "\t"}.get(args.sep, args.sep)  # --sep '\t' from a shell
    if sep is not None and len(sep) != 1:
        parser.error(f"--sep: one character, got {args.sep!r}")
    _convert(args, folder.convert(args.images, args.captions, args.val_frac, args.test_frac, args.seed,
                                  args.skip_missing, sep, args.image_col, args.caption_col))


def cmd_index(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Count the samples of other shards (patterns, URLs) and write an _info.json index."""
    from xmdist.tools.shard_index import ShardIndexError, write_index

    try:
        write_index(args.shards, args.out, args.workers, args.image_key, args.caption_key, args.captions_per_image)
    except ShardIndexError as e:
        parser.error(str(e))


def add_index_parser(commands) -> None:
    p = commands.add_parser("index", help="count the samples of img2dataset / open_clip shards (no copy)",
                            description=cmd_index.__doc__)
    p.add_argument("--shards", required=True, action="append",
                   help="a brace pattern, glob, .tar, directory of .tar files or pipe:/http(s) URL (repeatable)")
    p.add_argument("--out", default=None,
                   help="directory for _info.json (default: the shards' directory; required for URLs); then "
                        "train with data.shards=DIR")
    p.add_argument("--workers", type=_positive_int, default=1, help="shards read in parallel (default 1)")
    p.add_argument("--image-key", default="", help="image member (default: the first of jpg, jpeg, png, webp)")
    p.add_argument("--caption-key", default="", help="caption member or json:FIELD (default: txt, json caption, "
                                                     "json captions)")
    p.add_argument("--captions-per-image", type=_positive_int, default=1, help="default 1")
    p.set_defaults(run=cmd_index, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")
    for name, add_args, run, help_text in [
        ("synthetic", add_synthetic_args, cmd_synthetic, "deterministic coloured-shapes captions"),
        ("karpathy", add_karpathy_args, cmd_karpathy, "COCO / Flickr30K with Karpathy's split file"),
        ("dcmh", add_dcmh_args, cmd_dcmh, "MIRFlickr-25K / NUS-WIDE MAT files (DCMH release)"),
        ("folder", add_folder_args, cmd_folder, "image folder + JSONL/CSV captions"),
    ]:
        p = commands.add_parser(name, help=help_text, description=run.__doc__)
        p.add_argument("--out", required=True, help="output directory for the shard set")
        p.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="default 1000")
        p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
        p.add_argument("--overwrite", action="store_true",
                       help="write into --out even if it holds other files (they are kept)")
        add_args(p)
        p.set_defaults(run=run, parser=p)
    add_index_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args, args.parser)
    except (ConversionError, OutDirError) as e:
        args.parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
